"""Data: a source, tokenized once into a token store on disk, read back as deterministic batches.

    store = open_store(config)                # prepared the first time (lmjax/token_store.py)
    Batches(store.split("train"), ...).batch(k)   # a pure function of (data.seed, k)

`build_data(config)` does all of it. The rows of a split are windows of its flat token stream:
row i covers tokens i*L .. i*L + L (L + 1 tokens: inputs are the first L, targets the last L), so
every token but the first is a target exactly once per epoch, and the rows are read straight
from the memory-mapped store (memory and start-up time do not grow with the corpus).

Two ways to read the rows (`data.packing`):
  'stream' (nanoGPT): one long text; rows see whatever came before in the window.
  'documents': each row carries `segment_ids` (1, 2, .. per document piece in the row, 0 for
    padding) and `positions` that restart at each document, so that attention never crosses
    documents (`model.Transformer`), and the target that starts a new document is masked out
    of the loss (nothing in its own document precedes it).
  'auto' (default): 'documents' when the split has more than one document, else 'stream'.

Because `batch(k)` depends on nothing but the seed and the step, a run resumed at step k sees
exactly the batches an uninterrupted run would have seen, and every process of a multi-host run
computes the same global batch, reading from disk only its own rows.

Why `np.memmap` and not grain + ArrayRecord (MaxText's, nanodo's loader): rows are contiguous
windows of one flat array, so a row is one slice of a memory map and the loader's whole state is
the step number (nothing to checkpoint, no second copy of the corpus). Measured side by side
(`benchmarks/data_pipeline.py --loader_only --grain`, GPT-2 124M's micro-batch of 12 x 1024
with segment ids, 2 shared cores at load ~15): `Batches.batch` 132-140 batches/s on 20 and
100 MB corpora; grain's MapDataset over the same `row`s 223 and 28 batches/s (its prefetch
threads, unsteady under load); MaxText's recipe (documents as ArrayRecord records, shuffled,
`FirstFitPackIterDataset`) 15-16 batches/s after a 26.5 s copy per 100 MB. Any of them is far
above a GPT-2 124M step's rate (~0.2 steps/s here); the simplest stays.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, Protocol, Sequence

import ml_collections
import numpy as np

from lmjax import sources, token_store, tokenizers
from lmjax.sources import SHAKESPEARE_VAL_WORKS, shakespeare_works  # noqa: F401 (re-exported)

__all__ = ["SHAKESPEARE_VAL_WORKS", "shakespeare_works"]

PACKING = ("auto", "documents", "stream")


class TokenSource(Protocol):
    """What batches read: a flat token stream with document boundaries (`token_store.Split`,
    or `ArraySplit` in memory)."""

    num_tokens: int
    num_docs: int

    def read(self, start: int, stop: int) -> np.ndarray:
        ...

    def doc_ids(self, start: int, stop: int) -> np.ndarray:
        ...


class ArraySplit:
    """A token stream held in memory, with the documents starting at `doc_starts`."""

    def __init__(self, tokens: np.ndarray, doc_starts: Sequence[int] = (0,)):
        self.tokens = np.asarray(tokens)
        self.starts = np.asarray(doc_starts, np.int64)
        self.num_tokens, self.num_docs = len(self.tokens), len(self.starts)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop].astype(np.int32)

    def doc_ids(self, start: int, stop: int) -> np.ndarray:
        return np.searchsorted(self.starts, np.arange(start, stop), side="right") - 1


# ----------------------------------------------------------------------------------------------
# Documents in memory (small corpora, notebooks).


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


def load_texts(data_config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """Training and validation documents of `config.data`, in memory (small corpora only; training
    reads the token store instead). Empty documents are dropped.

    shakespeare: the embedded works, `SHAKESPEARE_VAL_WORKS` held out. files / jsonl: the
    documents of `train_files` and `val_files`; without val_files, the last `val_fraction` of the
    training text (`split_docs`). tfds: the `tfds_train_split` and `tfds_val_split` of
    `tfds_name`; tfds_val_split '' splits off val_fraction of the training text.
    """
    splits = sources.source_splits(sources.source_spec(data_config))
    texts = {name: [doc for unit in units for doc in sources.read_unit(unit)]
             for name, units in splits.items()}
    train, val = texts.get("train", []), texts.get("val", [])
    if "val" not in texts:
        train, val = split_docs(train, data_config.get("val_fraction", 0.1))
    if not train:
        raise ValueError(f"The training corpus of data.source={data_config.source!r} is empty.")
    if not val:
        raise ValueError(f"The validation corpus of data.source={data_config.source!r} is empty.")
    return train, val


# ----------------------------------------------------------------------------------------------
# Batches.


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """Epoch `epoch`'s row permutation, computed once (4 bytes a row for up to 2^31 rows)."""
    order = np.arange(num_rows, dtype=np.int32 if num_rows < 2 ** 31 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(order)  # = .permutation(num_rows), in place
    return order


@dataclasses.dataclass(frozen=True)
class Batches:
    """Deterministic batches of rows (windows of L + 1 tokens) of tokens start .. stop - 1 of
    `source`.

    Training (`shuffle=True`) walks through one permutation of the rows per epoch, epoch e using
    `np.random.default_rng([seed, e]).permutation(N)`; batch k takes positions k*B .. k*B+B-1 of
    the concatenated epoch permutations. So `batch(k)` is computed directly from (seed, k), no
    replay of batches 0..k-1. `shuffle=False` keeps the rows in order.

    process_index/process_count: a process of a multi-host run reads only its rows of each
    global batch, rows p*B/P .. (p+1)*B/P - 1 (what `sharding.put_batch` keeps); the others
    stay zero.
    """

    source: TokenSource
    batch_size: int
    seq_len: int
    seed: int = 0
    shuffle: bool = True
    packing: bool = False  # segment_ids and positions per row (see the module docstring)
    pad_id: int = 0
    start: int = 0
    stop: int | None = None  # None: the end of the source
    process_index: int = 0
    process_count: int = 1

    @property
    def num_tokens(self) -> int:
        return (self.source.num_tokens if self.stop is None else self.stop) - self.start

    @property
    def num_rows(self) -> int:
        return -(-max(self.num_tokens - 1, 0) // self.seq_len)

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
            order = _epoch_order(self.seed, int(epoch), self.num_rows)
            rows[epochs == epoch] = order[offsets[epochs == epoch]]
        return rows

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Row i: inputs, targets int32[L], mask float32[L] (0 on padding, and with packing on
        each target that starts a document); with packing, segment_ids and positions int32[L]."""
        L = self.seq_len
        a = self.start + i * L
        b = min(a + L + 1, self.start + self.num_tokens)
        window, n = self.source.read(a, b), b - a - 1  # n real targets
        out = {name: np.zeros(L, np.int32) for name in ("inputs", "targets")}
        out["inputs"][:] = out["targets"][:] = self.pad_id
        out["inputs"][:n], out["targets"][:n] = window[:-1], window[1:]
        mask = np.zeros(L, np.float32)
        mask[:n] = 1.0
        if self.packing:
            docs = self.source.doc_ids(a, b)
            mask[:n] *= docs[1:] == docs[:-1]  # a target in another document than its input
            firsts = np.flatnonzero(np.diff(docs[:-1], prepend=-1))  # where each piece starts
            lengths = np.diff(np.append(firsts, n))
            out["segment_ids"] = np.zeros(L, np.int32)
            out["segment_ids"][:n] = np.repeat(np.arange(1, len(firsts) + 1), lengths)
            out["positions"] = np.zeros(L, np.int32)
            out["positions"][:n] = np.arange(n) - np.repeat(firsts, lengths)
        out["mask"] = mask
        return out

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows as one batch; rows of other processes (multi-host) are left zero."""
        per_process = len(rows) // self.process_count
        mine = range(self.process_index * per_process, (self.process_index + 1) * per_process)
        names = ("inputs", "targets", "mask") + (("segment_ids", "positions") if self.packing
                                                 else ())
        batch = {name: np.zeros((len(rows), self.seq_len),
                                np.float32 if name == "mask" else np.int32) for name in names}
        for k in (mine if self.process_count > 1 else range(len(rows))):
            if rows[k] < 0:  # filler row of the last eval batch
                continue
            for name, value in self.row(int(rows[k])).items():
                batch[name][k] = value
        return batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step`: inputs, targets int32[B, L]; mask float32[B, L] (+ segment_ids,
        positions int32[B, L] with packing)."""
        return self._gather(self.row_indices(step))

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order (or the first max_batches batches: a fixed set of windows);
        the last batch is filled up with mask-0 rows of zeros."""
        num_batches = -(-self.num_rows // self.batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for k in range(num_batches):
            rows = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
            # Keep the shape static so a jitted eval step does not recompile.
            yield self._gather(np.where(rows < self.num_rows, rows, -1))


# ----------------------------------------------------------------------------------------------
# Everything together.


@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: tokenizers.Tokenizer
    train: Batches
    val: Batches
    train_tokens: int
    val_tokens: int
    store: token_store.TokenStore | None = None


def _check_data_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks of `config.data`, before reading or tokenizing anything."""
    for field in ("seq_len", "batch_size"):  # data.source: sources.source_spec, just after
        value = config[field]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"data.{field} must be a positive int, got {value!r}.")
    if config.get("packing", "auto") not in PACKING:
        raise ValueError(f"data.packing must be one of {PACKING}, got {config.packing!r}.")
    workers = config.get("prepare_workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"data.prepare_workers must be an int >= 0 (0 = one per CPU), "
                         f"got {workers!r}.")


def open_store(config: ml_collections.ConfigDict, workdir: str | None = None,
               progress: bool = True) -> token_store.TokenStore:
    """The token store of `config.data` + `config.tokenizer`, prepared first if missing.

    It lives in `data.store_dir`, or ('' ) in `token_store.default_store_dir` (keyed by the source
    and tokenizer). A workdir that already holds a tokenizer (a resumed run, or init_from's)
    must read a store of that very tokenizer: the default store if its tokenizer is that one,
    else a store keyed by the tokenizer's fingerprint (prepared with it).
    """
    data_config = config.data
    _check_data_config(data_config)
    tokenizers.check_config(config.tokenizer)
    source = sources.source_spec(data_config)
    tokenizer_spec = token_store.tokenizer_spec(config.tokenizer)
    fixed = (tokenizers.load_tokenizer(workdir)
             if workdir and tokenizers.has_saved_tokenizer(workdir) else None)
    path = data_config.get("store_dir", "") or token_store.default_store_dir(source,
                                                                           tokenizer_spec)
    if fixed is not None and not data_config.get("store_dir", ""):
        manifest = os.path.join(path, token_store.MANIFEST)
        fingerprint = token_store.tokenizer_fingerprint(fixed)
        if not (os.path.exists(manifest)
                and token_store.TokenStore(path).fingerprint == fingerprint):
            path = token_store.default_store_dir(source, {"fingerprint": fingerprint})
    return token_store.prepare(source, config.tokenizer, path, tokenizer=fixed,
                               num_workers=data_config.get("prepare_workers", 0) or None,
                               progress=progress)


def build_data(config: ml_collections.ConfigDict, workdir: str | None = None,
               process_index: int = 0, process_count: int = 1) -> Data:
    """Tokenizer and batches for the experiment `config` (sections `data`, `tokenizer`), read
    from its token store (prepared on first use, `open_store`).

    With a `workdir`, the tokenizer is saved there, or loaded from there when resuming.
    Validation is the store's val split, or (files/jsonl without val_files, tfds without a val
    split) the last `data.val_fraction` of the training tokens.
    """
    data_config = config.data
    store = open_store(config, workdir)
    tokenizer = store.tokenizer()
    if workdir and not tokenizers.has_saved_tokenizer(workdir):
        tokenizer.save(workdir)
    elif workdir:
        tokenizer = tokenizers.load_tokenizer(workdir)
    train_source = store.split("train")
    if "val" in store.split_names:
        val_source, train_range, val_range = store.split("val"), (0, None), (0, None)
    else:
        val_fraction = data_config.get("val_fraction", 0.1)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}.")
        n = int(train_source.num_tokens * (1 - val_fraction))
        val_source, train_range, val_range = train_source, (0, n), (n, None)

    packing = data_config.get("packing", "auto")
    packed = packing == "documents" or (packing == "auto" and train_source.num_docs > 1)
    common = dict(batch_size=data_config.batch_size, seq_len=data_config.seq_len,
                  seed=data_config.get("seed", 0), packing=packed,
                  pad_id=0 if tokenizer.pad_id is None else tokenizer.pad_id,
                  process_index=process_index, process_count=process_count)
    train = Batches(train_source, shuffle=True, start=train_range[0], stop=train_range[1],
                    **common)
    val = Batches(val_source, shuffle=False, start=val_range[0], stop=val_range[1], **common)
    seq_len, batch_size = data_config.seq_len, data_config.batch_size
    if train.num_rows < batch_size:
        raise ValueError(
            f"The training data has {train.num_tokens} tokens, which pack into "
            f"{train.num_rows} rows of data.seq_len={seq_len}: fewer than one batch of "
            f"data.batch_size={batch_size} rows (needs at least "
            f"{(batch_size - 1) * seq_len + 2} tokens).")
    if val.num_rows == 0:
        raise ValueError(f"The validation data has {val.num_tokens} tokens: too few for one row.")
    return Data(tokenizer=tokenizer, train=train, val=val, train_tokens=train.num_tokens,
                val_tokens=val.num_tokens, store=store)
