"""The token store: a corpus tokenized once, on disk, read back with `np.memmap`.

    store = prepare(sources.source_spec(config.data), config.tokenizer, "stores/owt")  # once
    tokens = store.split("train").read(0, 1025)               # any range, straight from disk

A source is a dict (`sources.source_spec(config.data)`) whose splits are cut into units of about
`shard_mb` MB of text (lmjax/sources.py); each unit becomes one shard, tokenized by a pool of
worker processes. A store folder holds:

    manifest.json             written last: its presence means the store is complete
    tokenizer/                the tokenizer (lmjax_tokenizer.json, ...), trained here if needed
    train-00000.tokens        flat token ids, raw, in the manifest's dtype (uint16 when the
                              vocabulary fits, else uint32); each document ends with eos when the
                              tokenizer has one
    train-00000.docs.npy      int64 offsets (into the shard) where each document starts
    train-00000.json          that shard's counts and sha256, written after its files: a
                              shard with its .json is finished, and an interrupted prepare keeps it

Every file is written to a temporary name and renamed, so a reader never sees half a file.
The manifest records the source, the tokenizer (kind, vocab size, fingerprint = sha256 of its
files), the dtype and, per split and shard, token/document/byte counts and checksums.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from typing import Any

import numpy as np

from lmjax import sources, tokenizers

FORMAT = "lmjax-token-store/1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
# Text read to train a SentencePiece tokenizer (it samples input_sentence_size lines of it).
SENTENCEPIECE_SAMPLE_BYTES = 200 << 20


# ----------------------------------------------------------------------------------------------
# Small helpers: atomic writes, checksums.


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_bytes(content: Any) -> bytes:
    return json.dumps(content, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: uint16 up to 65,536 ids."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_fingerprint(tokenizer: tokenizers.Tokenizer) -> str:
    """sha256 over the files `tokenizer.save` writes (name and contents), so equal = same ids."""
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lmjax-tok-{uuid.uuid4().hex}")
    try:
        tokenizer.save(tmp)
        digest = hashlib.sha256()
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read() + b"\0")
        return digest.hexdigest()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_spec(tokenizer_config) -> dict:
    """The part of `config.tokenizer` that decides the ids (paths made absolute)."""
    spec = {k: tokenizer_config.get(k) for k in ("kind", "vocab_size", "model_type", "path")}
    if spec["kind"] not in ("sentencepiece", "wordpiece") or spec["path"]:
        spec.pop("vocab_size"), spec.pop("model_type")  # only SentencePiece training uses them
    spec["path"] = os.path.abspath(spec["path"]) if spec["path"] else ""
    return spec


def default_store_dir(source: dict, tokenizer: dict) -> str:
    """`$LMJAX_TOKEN_STORES` (default ~/.cache/lmjax/token_stores) / KIND-TOKENIZER-HASH, the hash
    of the source and tokenizer specs: the same source and tokenizer share one store."""
    root = os.environ.get("LMJAX_TOKEN_STORES") or os.path.join(
        os.path.expanduser("~"), ".cache", "lmjax", "token_stores")
    key = hashlib.sha256(_json_bytes([source, tokenizer])).hexdigest()[:16]
    name = source.get("name", source["kind"]) if source["kind"] == "tfds" else source["kind"]
    return os.path.join(root, f"{name}-{tokenizer.get('kind', 'tok')}-{key}")


# ----------------------------------------------------------------------------------------------
# Prepare: tokenizer, then every unit -> one shard (worker processes), then the manifest.


def _encode_array(tokenizer: tokenizers.Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """A document's ids followed by eos (if any). Bytes and characters go through NumPy directly:
    a 100 MB document as a Python list of ints would take several GB."""
    if isinstance(tokenizer, tokenizers.ByteTokenizer):
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(dtype)
    elif isinstance(tokenizer, tokenizers.CharTokenizer):
        code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        table = tokenizer._table  # noqa: SLF001 - its own lookup table; encode() checks unknowns
        if code_points.max(initial=0) >= len(table) or (table[code_points] < 0).any():
            tokenizer.encode(text)  # raises, naming the unknown character
        ids = table[code_points].astype(dtype)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype)
    if tokenizer.eos_id is not None:
        ids = np.append(ids, np.asarray(tokenizer.eos_id, dtype))
    return ids


_WORKER_TOKENIZER: dict[str, tokenizers.Tokenizer] = {}


def _worker_tokenizer(store_dir: str) -> tokenizers.Tokenizer:
    if store_dir not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[store_dir] = tokenizers.load_tokenizer(
            os.path.join(store_dir, TOKENIZER_DIR))
    return _WORKER_TOKENIZER[store_dir]


def _write_shard(job: tuple) -> dict:
    """Tokenizes one unit into `NAME.tokens` + `NAME.docs.npy`, then writes `NAME.json` (the
    finished mark). Runs in a worker process."""
    store_dir, name, unit, dtype_name = job
    tokenizer, dtype = _worker_tokenizer(store_dir), np.dtype(dtype_name)
    parts, starts, text_bytes, count = [], [], 0, 0
    for doc in sources.read_unit(unit):
        ids = _encode_array(tokenizer, doc, dtype)
        starts.append(count)
        parts.append(ids)
        count += len(ids)
        text_bytes += len(doc.encode("utf-8"))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    base = os.path.join(store_dir, name)
    _write_atomic(base + ".tokens", tokens.tobytes())
    tmp = f"{base}.{uuid.uuid4().hex}.tmp.npy"
    np.save(tmp, np.asarray(starts, np.int64))
    os.replace(tmp, base + ".docs.npy")
    meta = {"name": name, "tokens": int(count), "documents": len(starts),
            "text_bytes": int(text_bytes), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    _write_atomic(base + ".json", _json_bytes(meta))
    return meta


def _finished_shard(store_dir: str, name: str) -> dict | None:
    base = os.path.join(store_dir, name)
    if not all(os.path.exists(base + ext) for ext in (".json", ".tokens", ".docs.npy")):
        return None
    with open(base + ".json", encoding="utf-8") as f:
        return json.load(f)


def _char_vocab(units: list[dict]) -> str:
    chars: set[str] = set()
    for unit in units:
        for doc in sources.read_unit(unit):
            chars.update(doc)
    if not chars:
        raise ValueError("Cannot build a char tokenizer from empty text.")
    return "".join(sorted(chars))


def _build_tokenizer(tokenizer_config, splits: dict[str, list[dict]]) -> tokenizers.Tokenizer:
    """The tokenizer the config asks for; char and SentencePiece learn it from the text here
    (char: every character of every split, as nanoGPT; SentencePiece: the first
    SENTENCEPIECE_SAMPLE_BYTES of the training split)."""
    kind, path = tokenizer_config.kind, tokenizer_config.get("path", "")
    if kind == "char" and not path:
        return tokenizers.CharTokenizer(_char_vocab([u for us in splits.values() for u in us]))
    sample: list[str] = []
    if kind in ("sentencepiece", "wordpiece") and not path:
        size = 0
        for unit in splits["train"]:
            for doc in sources.read_unit(unit):
                sample.append(doc)
                size += len(doc)
                if size >= SENTENCEPIECE_SAMPLE_BYTES:
                    break
            if size >= SENTENCEPIECE_SAMPLE_BYTES:
                break
    return tokenizers.build_tokenizer(tokenizer_config, sample)


def _store_tokenizer(store_dir: str, tokenizer_config, splits,
                     tokenizer: tokenizers.Tokenizer | None) -> tokenizers.Tokenizer:
    """The store's tokenizer: already in the folder (a resumed prepare), else `tokenizer`, else
    built from the config; saved into `store_dir/tokenizer` through a renamed temporary folder."""
    folder = os.path.join(store_dir, TOKENIZER_DIR)
    if tokenizers.has_saved_tokenizer(folder):
        saved = tokenizers.load_tokenizer(folder)
        if tokenizer is not None and tokenizer_fingerprint(saved) != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{store_dir} is (being) prepared with another tokenizer than "
                             "this run's: remove it or set data.store_dir to another folder.")
        return saved
    tokenizer = tokenizer or _build_tokenizer(tokenizer_config, splits)
    tmp = f"{folder}.{uuid.uuid4().hex}.tmp"
    tokenizer.save(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process saved it first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizers.load_tokenizer(folder)


def _run_jobs(jobs: list[tuple], num_workers: int, progress: bool, chunk: int) -> None:
    """Runs `_write_shard` over the jobs, printing one progress line: shards, tokens/s, MB/s of
    text, ETA. In worker processes when num_workers > 1 and there is more than one shard of
    text (`chunk` bytes) to do: starting a spawned worker takes about a second."""
    start, done, tokens, text = time.time(), 0, 0, 0

    def report(meta):
        nonlocal done, tokens, text
        done, tokens, text = done + 1, tokens + meta["tokens"], text + meta["text_bytes"]
        if progress:
            elapsed = max(time.time() - start, 1e-9)
            eta = elapsed / done * (len(jobs) - done)
            end = "\n" if done == len(jobs) else ""
            print(f"\rprepare: {done}/{len(jobs)} shards, {tokens:,} tokens, "
                  f"{tokens / elapsed:,.0f} tokens/s, {text / elapsed / 1e6:.1f} MB/s, "
                  f"ETA {eta:.0f}s   ", end=end, file=sys.stderr, flush=True)

    if num_workers <= 1 or len(jobs) <= 1 or sum(job[2]["bytes"] for job in jobs) <= chunk:
        for job in jobs:
            report(_write_shard(job))
        return
    # 'spawn': the caller may be a training process with JAX's threads running (fork is unsafe).
    with multiprocessing.get_context("spawn").Pool(min(num_workers, len(jobs))) as pool:
        for meta in pool.imap_unordered(_write_shard, jobs):
            report(meta)


def prepare(source: dict, tokenizer_config, store_dir: str,
            tokenizer: tokenizers.Tokenizer | None = None, num_workers: int | None = None,
            progress: bool = True) -> "TokenStore":
    """Tokenizes `source` (`source_spec`) into a token store at `store_dir` and opens it.

    A complete store (its manifest exists) is opened as is: preparing twice is a no-op.
    An interrupted prepare resumes: finished shards are kept. `tokenizer`: use this one (e.g. a
    resumed run's) instead of building `tokenizer_config`'s. num_workers: worker processes
    (default: the CPU count).
    """
    if os.path.exists(os.path.join(store_dir, MANIFEST)):
        store = TokenStore(store_dir)
        if tokenizer is not None and store.fingerprint != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"The token store {store_dir} was prepared with another tokenizer "
                             "than this run's (fingerprints differ): set data.store_dir to "
                             "another folder, or remove it.")
        return store
    os.makedirs(store_dir, exist_ok=True)
    _WORKER_TOKENIZER.pop(store_dir, None)  # in-process jobs load the tokenizer saved below
    splits = sources.source_splits(source)
    if not splits.get("train"):
        raise ValueError(f"The training corpus of data.source={source['kind']!r} is empty.")
    tok = _store_tokenizer(store_dir, tokenizer_config, splits, tokenizer)
    dtype = token_dtype(tok.vocab_size)
    names = {split: [f"{split}-{i:05d}" for i in range(len(units))]
             for split, units in splits.items()}
    jobs = [(store_dir, name, unit, dtype.name) for split, units in splits.items()
            for name, unit in zip(names[split], units) if _finished_shard(store_dir, name) is None]
    _run_jobs(jobs, num_workers or os.cpu_count() or 1, progress,
              int(source.get("shard_mb", 64) * (1 << 20)))
    manifest = {
        "format": FORMAT, "source": source, "dtype": dtype.name,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "pad_id": tok.pad_id, "fingerprint": tokenizer_fingerprint(tok)},
        "splits": {}}
    for split, shard_names in names.items():
        shards = [_finished_shard(store_dir, name) for name in shard_names]
        manifest["splits"][split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "text_bytes": sum(s["text_bytes"] for s in shards), "shards": shards}
    _write_atomic(os.path.join(store_dir, MANIFEST), _json_bytes(manifest))
    return TokenStore(store_dir)


# ----------------------------------------------------------------------------------------------
# Reading.


class Split:
    """One split of a store: token ids and document starts, memory-mapped shard by shard.

    `read(a, b)` returns tokens a..b-1 of the split's flat stream as int32; `doc_ids(a, b)` the
    index of the document each of them belongs to. Only the pages touched are read from disk.
    """

    def __init__(self, store_dir: str, info: dict, dtype: np.dtype):
        self.num_tokens, self.num_docs = info["tokens"], info["documents"]
        self._tokens, self._docs, token_base, doc_base = [], [], [], []
        t = d = 0
        for shard in info["shards"]:
            base = os.path.join(store_dir, shard["name"])
            size = os.path.getsize(base + ".tokens")
            if size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"{base}.tokens has {size} bytes, its manifest entry says "
                                 f"{shard['tokens']} tokens of {dtype.name}: the store is damaged.")
            if shard["tokens"]:
                self._tokens.append(np.memmap(base + ".tokens", dtype, mode="r"))
                self._docs.append(np.load(base + ".docs.npy", mmap_mode="r"))
                token_base.append(t)
                doc_base.append(d)
            t, d = t + shard["tokens"], d + shard["documents"]
        self._token_base = np.asarray(token_base + [t], np.int64)
        self._doc_base = np.asarray(doc_base, np.int64)

    def _pieces(self, start: int, stop: int):
        """(shard, local start, local stop, offset in the output) of the range's pieces."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens {start}..{stop} outside the split's {self.num_tokens}")
        shard = int(np.searchsorted(self._token_base, start, side="right")) - 1
        out = 0
        while start < stop:
            local = start - self._token_base[shard]
            n = min(stop, self._token_base[shard + 1]) - start
            yield shard, int(local), int(local + n), out
            start, out, shard = start + n, out + n, shard + 1

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, np.int32)
        for shard, a, b, o in self._pieces(start, stop):
            out[o:o + b - a] = self._tokens[shard][a:b]
        return out

    def documents(self, limit: int | None = None) -> list[np.ndarray]:
        """The split's documents (the first `limit`), each its int32 ids as stored (ending with
        eos when the tokenizer has one). Empty documents of a tokenizer without eos have no
        tokens and are left out."""
        docs = []
        for shard, starts in enumerate(self._docs):
            ends = np.append(starts[1:], len(self._tokens[shard]))
            for a, b in zip(starts, ends):
                if limit is not None and len(docs) >= limit:
                    return docs
                if b > a:
                    docs.append(np.asarray(self._tokens[shard][a:b], np.int32))
        return docs

    def doc_ids(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, np.int64)
        for shard, a, b, o in self._pieces(start, stop):
            local = np.searchsorted(self._docs[shard], np.arange(a, b), side="right") - 1
            out[o:o + b - a] = self._doc_base[shard] + local
        return out


class TokenStore:
    """A prepared store (see the module docstring): its manifest, tokenizer and splits."""

    def __init__(self, store_dir: str):
        path = os.path.join(store_dir, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{store_dir} is not a prepared token store (no {MANIFEST}); "
                                    "run `lmjax prepare` or training with this data config.")
        with open(path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT}")
        self.path = store_dir
        self.dtype = np.dtype(self.manifest["dtype"])
        self.fingerprint = self.manifest["tokenizer"]["fingerprint"]
        self._splits: dict[str, Split] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.load_tokenizer(os.path.join(self.path, TOKENIZER_DIR))

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = Split(self.path, self.manifest["splits"][name], self.dtype)
        return self._splits[name]

    def verify(self) -> None:
        """Re-hashes every shard against the manifest (reads the whole store)."""
        for split in self.manifest["splits"].values():
            for shard in split["shards"]:
                path = os.path.join(self.path, shard["name"] + ".tokens")
                if _sha256_file(path) != shard["sha256"]:
                    raise ValueError(f"{path}: checksum differs from the manifest's.")
