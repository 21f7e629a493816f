"""Tokenizers: text <-> integer ids.

Four implementations of one small interface:

* `CharTokenizer`: one id per character seen in training (nanoGPT's shakespeare_char).
* `ByteTokenizer`: UTF-8 bytes 0..255 plus pad/bos/eos; needs no training.
* `SentencePieceTokenizer`: BPE or unigram subwords trained with the `sentencepiece` library,
  set up so that `decode(encode(text)) == text` for any text (whitespace kept verbatim, unseen
  characters fall back to bytes).
* `HFTokenizer`: the tokenizer of a Hugging Face model folder (`tokenizer.json` through the
  `tokenizers` library, or a SentencePiece `tokenizer.model`), with the folder's bos/eos/pad ids.

A tokenizer is saved into a directory as `lmjax_tokenizer.json` (plus `tokenizer.model` for
SentencePiece, the Hugging Face files for `HFTokenizer`) and read back with `load_tokenizer`, so a
resumed run uses the very same ids.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Iterable, Iterator, Protocol, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm

TOKENIZER_KINDS = ("char", "byte", "sentencepiece", "wordpiece")  # built or trained by lmjax
HF_KIND = "hf"  # loaded from a Hugging Face folder (tokenizer.path)
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")
CONFIG_FILE = "lmjax_tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    """What the rest of lmjax needs from a tokenizer."""

    kind: str  # 'char' | 'byte' | 'sentencepiece' | 'hf'
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Special ids (bos/eos/pad) are dropped."""
        ...

    def save(self, directory: str) -> None:
        """Writes lmjax_tokenizer.json (+ tokenizer.model for SentencePiece) into `directory`."""
        ...


def write_files(directory: str, files: dict[str, bytes]) -> None:
    """Writes a tokenizer's files into `directory`, lmjax_tokenizer.json last (its presence
    means a saved tokenizer), each through a temporary file and a rename: the processes of a
    multi-host run share the workdir, and none may read a half-written tokenizer."""
    os.makedirs(directory, exist_ok=True)
    for name in sorted(files, key=lambda name: name == CONFIG_FILE):
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")  # unique across hosts
        with open(tmp, "wb") as f:
            f.write(files[name])
        os.replace(tmp, os.path.join(directory, name))


def _json(content: dict) -> bytes:
    return json.dumps(content, ensure_ascii=False, indent=1).encode("utf-8")


def _special_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}


# ----------------------------------------------------------------------------------------------
# Characters.


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of training characters."""

    kind = "char"
    bos_id = None
    eos_id = None
    pad_id = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("CharTokenizer needs sorted, distinct characters.")
        self.chars = chars
        self.vocab_size = len(chars)
        # Lookup table from code point to id (-1 = unknown).
        code_points = np.array([ord(c) for c in chars], dtype=np.int64)
        self._table = np.full(int(code_points.max(initial=0)) + 1, -1, dtype=np.int32)
        self._table[code_points] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def train(cls, texts: Sequence[str]) -> "CharTokenizer":
        """Vocabulary = sorted set of all characters in `texts`."""
        chars = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise ValueError("Cannot build a char tokenizer from empty text.")
        return cls("".join(sorted(chars)))

    def encode(self, text: str) -> list[int]:
        # Vectorised: a table lookup over the code points, fast for millions of characters.
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        in_table = code_points < len(self._table)
        ids = np.where(in_table, self._table[np.where(in_table, code_points, 0)], -1)
        if (ids < 0).any():
            unknown = text[int(np.argmax(ids < 0))]
            raise ValueError(
                f"Character {unknown!r} (U+{ord(unknown):04X}) is not in the char tokenizer's "
                f"vocabulary of {self.vocab_size} characters seen in training.")
        return ids.tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: str) -> None:
        write_files(directory, {CONFIG_FILE: _json({"kind": self.kind, "chars": self.chars})})


# ----------------------------------------------------------------------------------------------
# Bytes.


class ByteTokenizer:
    """UTF-8 bytes 0..255, then pad=256, bos=257, eos=258."""

    kind = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Generated byte sequences need not be valid UTF-8: show U+FFFD instead of failing.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        write_files(directory, {CONFIG_FILE: _json({"kind": self.kind})})


# ----------------------------------------------------------------------------------------------
# SentencePiece.

# Ids of the special pieces in every SentencePiece model trained here.
_SP_PAD, _SP_UNK, _SP_BOS, _SP_EOS = 0, 1, 2, 3
# SentencePiece trains on "sentences" of at most `max_sentence_length` bytes and silently skips
# longer ones, so long lines are cut into chunks of this many characters (at most 4 bytes each).
_SP_CHUNK_CHARS = 4096
_SP_MAX_SENTENCE_BYTES = 4 * _SP_CHUNK_CHARS


def _training_sentences(texts: Sequence[str]) -> Iterator[str]:
    """Lines of the training texts; newlines are a user-defined piece, so lines are boundaries."""
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _SP_CHUNK_CHARS):
                yield line[start:start + _SP_CHUNK_CHARS]


class SentencePieceTokenizer:
    """A SentencePiece model; `decode(encode(text)) == text` for any text."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.processor.get_piece_size()
        # Models loaded from elsewhere may lack some specials: SentencePiece reports those as -1.
        self.bos_id = self._id_or_none(self.processor.bos_id())
        self.eos_id = self._id_or_none(self.processor.eos_id())
        self.pad_id = self._id_or_none(self.processor.pad_id())

    @staticmethod
    def _id_or_none(i: int) -> int | None:
        return None if i < 0 else i

    @classmethod
    def from_file(cls, model_file: str) -> "SentencePieceTokenizer":
        with open(model_file, "rb") as f:
            return cls(f.read())

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, model_type: str = "bpe",
              input_sentence_size: int = 2_000_000, seed: int = 0) -> "SentencePieceTokenizer":
        """Trains a BPE or unigram model on `texts` in memory."""
        if model_type not in SENTENCEPIECE_MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type must be one of {SENTENCEPIECE_MODEL_TYPES}, "
                             f"got {model_type!r}.")
        spm.set_random_generator_seed(seed)  # The sentence sampling below is then reproducible.
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            # Every character seen is a piece; anything else falls back to its UTF-8 bytes.
            character_coverage=1.0,
            byte_fallback=True,
            # Keep the text verbatim: no NFKC, no dummy leading space, no squashing of spaces.
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            # Training sentences are lines, so a newline gets its own piece.
            user_defined_symbols=["\n"],
            pad_id=_SP_PAD, unk_id=_SP_UNK, bos_id=_SP_BOS, eos_id=_SP_EOS,
            # Sample at most this many lines, for speed on big corpora.
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=_SP_MAX_SENTENCE_BYTES,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # Quiet: only errors.
        )
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        specials = _special_ids(self)
        return self.processor.decode([int(i) for i in ids if i not in specials])

    def save(self, directory: str) -> None:
        write_files(directory, {
            SENTENCEPIECE_FILE: self.model_proto,
            CONFIG_FILE: _json({"kind": self.kind, "model_file": SENTENCEPIECE_FILE})})


# ----------------------------------------------------------------------------------------------
# Hugging Face.

HF_TOKENIZER_FILE = "tokenizer.json"
# Files of a Hugging Face tokenizer folder that HFTokenizer keeps and writes back verbatim.
HF_TOKENIZER_FILES = (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json")


class HFTokenizer:
    """The tokenizer of a Hugging Face model folder.

    `tokenizer.json` is run by the `tokenizers` library (as `transformers`' fast tokenizers do);
    without it, `tokenizer.model` by `sentencepiece`. The bos/eos/pad ids are those named in
    `tokenizer_config.json` or `special_tokens_map.json`, else the model's `config.json`
    `*_token_id` (the first, for a list), else (SentencePiece) the model's own.

    `encode(text)` adds no special tokens, like the other lmjax tokenizers (training text has
    none); `encode(text, add_special_tokens=True)` adds what `transformers` would (e.g. LLaMA's
    bos). `decode` drops the bos/eos/pad ids and, unlike `transformers`, does not "clean up"
    spaces, so that `decode(encode(text)) == text` wherever the tokenizer allows it.
    """

    kind = HF_KIND

    def __init__(self, files: dict[str, bytes], special_ids: dict[str, int | None] | None = None):
        """files: file name -> contents (of HF_TOKENIZER_FILES); special_ids: 'bos'/'eos'/'pad' ->
        id, overriding the tokenizer files (e.g. from config.json)."""
        self.files = dict(files)
        if HF_TOKENIZER_FILE in files:
            import tokenizers  # the Hugging Face library (not this module)

            self.backend = tokenizers.Tokenizer.from_str(files[HF_TOKENIZER_FILE].decode("utf-8"))
            self.backend.no_truncation()  # a tokenizer.json may truncate or pad: lmjax never does
            self.backend.no_padding()
            self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
            token_to_id = self.backend.token_to_id
            own_ids = {}
        elif SENTENCEPIECE_FILE in files:
            self.backend = spm.SentencePieceProcessor(model_proto=files[SENTENCEPIECE_FILE])
            self.vocab_size = self.backend.get_piece_size()
            pieces = {self.backend.id_to_piece(i): i for i in range(self.vocab_size)}
            token_to_id = pieces.get
            own_ids = {"bos": self.backend.bos_id(), "eos": self.backend.eos_id(),
                       "pad": self.backend.pad_id()}
        else:
            raise ValueError(f"HFTokenizer needs {HF_TOKENIZER_FILE} or {SENTENCEPIECE_FILE}, "
                             f"got files {sorted(files)}")
        self.config = self._json("tokenizer_config.json")
        special_map = self._json("special_tokens_map.json")
        ids = {}
        for name in ("bos", "eos", "pad"):
            token = self.config.get(f"{name}_token") or special_map.get(f"{name}_token")
            if isinstance(token, dict):  # a serialized AddedToken
                token = token.get("content")
            token_id = token_to_id(token) if isinstance(token, str) else None
            if special_ids and special_ids.get(name) is not None:
                token_id = special_ids[name]
            if token_id is None and own_ids.get(name, -1) >= 0:
                token_id = own_ids[name]
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name} id {token_id} is outside the tokenizer's vocabulary of "
                                 f"{self.vocab_size}")
            ids[name] = token_id
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    def _json(self, name: str) -> dict:
        return json.loads(self.files[name].decode("utf-8")) if name in self.files else {}

    @staticmethod
    def in_folder(folder: str) -> bool:
        """Whether `folder` holds a Hugging Face tokenizer (tokenizer.json or tokenizer.model)."""
        return any(os.path.isfile(os.path.join(folder, name))
                   for name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE))

    @classmethod
    def from_folder(cls, folder: str) -> "HFTokenizer":
        """Loads the tokenizer of a Hugging Face folder (e.g. one written by `save_pretrained`)."""
        if not cls.in_folder(folder):
            raise FileNotFoundError(f"No Hugging Face tokenizer in {folder!r}: it has neither "
                                    f"{HF_TOKENIZER_FILE} nor {SENTENCEPIECE_FILE}.")
        files = {}
        for name in HF_TOKENIZER_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        # The model's config.json names ids only: they count when the tokenizer files name none.
        fallback = {}
        config_path = os.path.join(folder, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                model_config = json.load(f)
            for name in ("bos", "eos", "pad"):
                value = model_config.get(f"{name}_token_id")
                fallback[name] = value[0] if isinstance(value, list) and value else value
        tokenizer = cls(files)
        missing = {name: i for name, i in fallback.items() if isinstance(i, int)
                   and getattr(tokenizer, f"{name}_id") is None}
        return cls(files, missing) if missing else tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if isinstance(self.backend, spm.SentencePieceProcessor):
            ids = self.backend.encode(text)
            if add_special_tokens:
                if self.config.get("add_bos_token", True) and self.bos_id is not None:
                    ids = [self.bos_id] + ids
                if self.config.get("add_eos_token", False) and self.eos_id is not None:
                    ids = ids + [self.eos_id]
            return ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        specials = _special_ids(self)
        ids = [int(i) for i in ids if i not in specials]
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str) -> None:
        """Writes the Hugging Face files verbatim, and lmjax_tokenizer.json with the ids."""
        write_files(directory, {**self.files, CONFIG_FILE: _json({
            "kind": self.kind, "files": sorted(self.files), "bos_id": self.bos_id,
            "eos_id": self.eos_id, "pad_id": self.pad_id})})

    @classmethod
    def load(cls, directory: str, saved: dict):
        """Reads what `save` wrote (`saved` is its lmjax_tokenizer.json)."""
        files = {}
        for name in saved["files"]:
            with open(os.path.join(directory, name), "rb") as f:
                files[name] = f.read()
        tokenizer = cls(files)
        for name in ("bos", "eos", "pad"):  # the ids as saved, None included
            setattr(tokenizer, f"{name}_id", saved[f"{name}_id"])
        return tokenizer


WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 when trained


class WordPieceTokenizer(HFTokenizer):
    """BERT's WordPiece tokenizer trained by lmjax (`tokenizers`' BertWordPieceTokenizer:
    BERT's normaliser, pre-tokeniser and [CLS] A [SEP] B [SEP] post-processor); saved as
    tokenizer.json + tokenizer_config.json, which `transformers`' BertTokenizerFast reads.
    lmjax/wordpiece.py encodes sentence pairs with it."""

    kind = "wordpiece"

    @classmethod
    def from_backend(cls, backend, lowercase: bool = True) -> "WordPieceTokenizer":
        """Wraps a `tokenizers.Tokenizer` with BERT's special tokens."""
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                  "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}
        return cls({HF_TOKENIZER_FILE: backend.to_str().encode("utf-8"),
                    "tokenizer_config.json": _json(config)})

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, lowercase: bool = True,
              min_frequency: int = 2) -> "WordPieceTokenizer":
        """A vocabulary of `vocab_size` WordPieces learned from `texts` by `tokenizers`'
        WordPiece trainer, with [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
        from tokenizers import BertWordPieceTokenizer

        tokenizer = BertWordPieceTokenizer(lowercase=lowercase)
        tokenizer.train_from_iterator(list(texts), vocab_size=vocab_size,
                                      min_frequency=min_frequency,
                                      special_tokens=list(WORDPIECE_SPECIALS), show_progress=False)
        from tokenizers.processors import BertProcessing  # [CLS] A [SEP] (B [SEP]), as BERT's
        backend = tokenizer._tokenizer
        backend.post_processor = BertProcessing(("[SEP]", backend.token_to_id("[SEP]")),
                                                ("[CLS]", backend.token_to_id("[CLS]")))
        return cls.from_backend(backend, lowercase)


# ----------------------------------------------------------------------------------------------
# Saving, loading, building from a config.


def has_saved_tokenizer(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def load_tokenizer(directory: str) -> Tokenizer:
    """Reads a tokenizer written by `Tokenizer.save(directory)`."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No saved tokenizer in {directory!r}: {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved["kind"] == "char":
        return CharTokenizer(saved["chars"])
    if saved["kind"] == "byte":
        return ByteTokenizer()
    if saved["kind"] == "sentencepiece":
        return SentencePieceTokenizer.from_file(os.path.join(directory, saved["model_file"]))
    if saved["kind"] in (HF_KIND, WordPieceTokenizer.kind):
        return (HFTokenizer if saved["kind"] == HF_KIND else WordPieceTokenizer).load(directory,
                                                                                 saved)
    raise ValueError(f"{path}: unknown tokenizer kind {saved['kind']!r}, "
                     f"expected one of {TOKENIZER_KINDS + (HF_KIND,)}.")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming the field for bad tokenizer settings, before any training."""
    if config.kind not in TOKENIZER_KINDS + (HF_KIND,):
        raise ValueError(f"tokenizer.kind must be one of {TOKENIZER_KINDS}, got {config.kind!r} "
                         f"(or {HF_KIND!r} with tokenizer.path = a Hugging Face folder).")
    path = config.get("path", "")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer.path = {path!r} does not exist.")
    if config.kind == HF_KIND and not (path and os.path.isdir(path) and (
            HFTokenizer.in_folder(path) or has_saved_tokenizer(path))):
        raise ValueError(f"tokenizer.kind = {HF_KIND!r} needs tokenizer.path = a folder with "
                         f"{HF_TOKENIZER_FILE} or {SENTENCEPIECE_FILE}, got {path!r}.")
    if config.kind == "wordpiece" and not path and not (
            isinstance(config.vocab_size, int) and config.vocab_size > len(WORDPIECE_SPECIALS)):
        raise ValueError(f"tokenizer.vocab_size must be an int > {len(WORDPIECE_SPECIALS)} for "
                         f"WordPiece, got {config.vocab_size!r}.")
    if config.kind == "sentencepiece" and not path:
        model_type = config.get("model_type", "bpe")
        if model_type not in SENTENCEPIECE_MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type must be one of {SENTENCEPIECE_MODEL_TYPES}, "
                             f"got {model_type!r}.")
        # 4 specials, 256 byte pieces and the newline piece are always there; learn at least one.
        minimum = 4 + 256 + 1 + 1
        if not isinstance(config.vocab_size, int) or config.vocab_size < minimum:
            raise ValueError(f"tokenizer.vocab_size must be an int >= {minimum} for SentencePiece "
                             f"with byte fallback, got {config.vocab_size!r}.")


def _load_checked(directory: str, kind: str) -> Tokenizer:
    """Loads a saved tokenizer, insisting it is of the configured kind."""
    tokenizer = load_tokenizer(directory)
    if tokenizer.kind != kind and not (kind == HF_KIND and isinstance(tokenizer, HFTokenizer)):
        raise ValueError(f"tokenizer.kind = {kind!r}, but {directory} holds a saved "
                         f"{tokenizer.kind!r} tokenizer.")
    return tokenizer


def build_tokenizer(config: ml_collections.ConfigDict, train_text: str | Sequence[str],
                    workdir: str | None = None) -> Tokenizer:
    """Makes the tokenizer described by the `config.tokenizer` section.

    Args:
      config: fields `kind` ('char' | 'byte' | 'sentencepiece' | 'hf'), `vocab_size` and
        `model_type` ('bpe' | 'unigram') for SentencePiece training, `path` ('' = train on
        `train_text`, else an existing SentencePiece `.model` file or a directory written by
        `save`; for 'hf', a Hugging Face folder with tokenizer.json or tokenizer.model).
      train_text: the training text, one string or a sequence of documents.
      workdir: if given, a tokenizer already saved there is loaded (a resumed run must use the
        very same tokenizer); otherwise the new tokenizer is saved there.
    """
    check_config(config)
    if workdir and has_saved_tokenizer(workdir):
        return _load_checked(workdir, config.kind)

    texts = [train_text] if isinstance(train_text, str) else list(train_text)
    path = config.get("path", "")
    if config.kind == HF_KIND and not has_saved_tokenizer(path):
        tokenizer = HFTokenizer.from_folder(path)
    elif path and os.path.isdir(path):
        tokenizer = _load_checked(path, config.kind)
    elif path:
        if config.kind != "sentencepiece":
            raise ValueError(f"tokenizer.path = {path!r} is a file, which only works with "
                             f"tokenizer.kind = 'sentencepiece' (got {config.kind!r}).")
        tokenizer = SentencePieceTokenizer.from_file(path)
    elif config.kind == "char":
        tokenizer = CharTokenizer.train(texts)
    elif config.kind == "byte":
        tokenizer = ByteTokenizer()
    elif config.kind == "wordpiece":
        tokenizer = WordPieceTokenizer.train(texts, config.vocab_size)
    else:
        tokenizer = SentencePieceTokenizer.train(texts, config.vocab_size,
                                                 config.get("model_type", "bpe"))

    if workdir:
        tokenizer.save(workdir)
    return tokenizer
