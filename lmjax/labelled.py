"""Labelled examples for sequence classification: files in, deterministic padded batches out.

    data = build_data(config, workdir)     # model.head='classifier' runs (train.py)

Files (data.train_files / data.val_files, by extension): GLUE-style `.tsv` (a header row,
tab-separated), `.csv` (a header row) or `.jsonl` (one object a line). `data.text_fields` names
the text column, or two columns for sentence pairs ('sentence1,sentence2'); `data.label_field`
the label. Labels are mapped to ids in sorted order of their names (numbers sort numerically),
saved as `labels.json` in the workdir; model.num_labels=1 reads them as numbers (regression).
Without data.val_files, the last data.val_fraction of the training examples validate.
data.source='shakespeare' is the genre task of the embedded corpus (`shakespeare_genre`);
data.source='tfds' reads data.tfds_name (e.g. 'glue/sst2': text_fields 'sentence'), its
ClassLabel names becoming the label names.

Each example is encoded once as [CLS] text [SEP] (pair [SEP]) with token types, cut to
data.seq_len tokens. A batch is padded to the smallest bucket (16, 32, 64, ... data.seq_len)
that holds its longest example, so a run compiles at most a handful of shapes. Batch k is a
pure function of (data.seed, k) (one permutation per epoch, as data.Batches), so a resumed run
sees the same batches. Every array is [B, L] or [B, 1] (the batch sharding splits axis 0).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Iterator, Sequence

import numpy as np

from lmjax import data as data_lib
from lmjax import sources
from lmjax import tokenizers as tokenizers_lib
from lmjax import wordpiece

LABELS_FILE = "labels.json"
FORMATS = (".tsv", ".csv", ".jsonl")

# The genre task (data.source='shakespeare' with model.head='classifier'): passages of the
# embedded corpus's plays labelled with the First Folio's genre (its three sections); the poems
# and Pericles (not in the Folio) are left out. Whole plays are held out, so no play is in two
# splits: two of each genre validate, two others test (benchmarks/encoder_quality.py).
GENRES = {
    "comedy": ("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor",
               "measure_for_measure", "comedy_of_errors", "much_ado_about_nothing",
               "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
               "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
                "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_iii",
                "henry_viii"),
    "tragedy": ("troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus",
                "romeo_and_juliet", "timon_of_athens", "julius_caesar", "macbeth", "hamlet",
                "lear", "othello", "antony_and_cleopatra", "cymbeline"),
}
GENRE_SPLITS = {"val": ("twelfth_night", "merchant_of_venice", "henry_v", "john", "macbeth",
                        "lear"),
                "test": ("tempest", "as_you_like_it", "richard_ii", "henry_viii", "hamlet",
                         "othello")}
PASSAGE_LINES = 8  # non-empty lines per genre-task passage


def shakespeare_genre(split: str, passage_lines: int = PASSAGE_LINES
                      ) -> list[tuple[tuple[str], str]]:
    """[((passage,), genre)] of the genre task's 'train', 'val' or 'test' plays: each play cut
    into passages of `passage_lines` non-empty lines, in order."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not one of train, val, test")
    works = sources.shakespeare_works()
    held_out = {w for plays in GENRE_SPLITS.values() for w in plays}
    examples = []
    for genre, plays in GENRES.items():
        for play in plays:
            if (play in GENRE_SPLITS.get(split, ())) if split != "train" else play not in held_out:
                lines = [line.strip() for line in works[play].splitlines() if line.strip()]
                examples += [((" ".join(lines[i:i + passage_lines]),), genre)
                             for i in range(0, len(lines) - passage_lines + 1, passage_lines)]
    return examples


def read_examples(path: str, text_fields: Sequence[str], label_field: str
                  ) -> list[tuple[tuple[str, ...], str]]:
    """[((text, [pair]), label)] of a .tsv, .csv or .jsonl file; ValueError naming the file
    and the missing field."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: labelled data files must end in {', '.join(FORMATS)}")
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",",
                                       quoting=csv.QUOTE_NONE if ext == ".tsv"
                                       else csv.QUOTE_MINIMAL))
    examples = []
    for i, row in enumerate(rows):
        for field in (*text_fields, label_field):
            if field not in row:
                raise ValueError(f"{path}: row {i + 1} has no field {field!r} (data.text_fields="
                                 f"{','.join(text_fields)!r}, data.label_field={label_field!r};"
                                 f" its fields: {sorted(row)})")
        examples.append((tuple(str(row[f]) for f in text_fields), str(row[label_field])))
    return examples


def label_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels in sorted order (numerically when they are all numbers)."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


def save_label_names(workdir: str, names: list[str]) -> None:
    with open(os.path.join(workdir, LABELS_FILE), "w", encoding="utf-8") as f:
        json.dump({"labels": names}, f, indent=1)


def load_label_names(workdir: str) -> list[str] | None:
    path = os.path.join(workdir, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["labels"]


def bucket_length(length: int, seq_len: int) -> int:
    """The padded length of a batch whose longest example has `length` tokens."""
    bucket = 16
    while bucket < length:
        bucket *= 2
    return min(bucket, seq_len)


def encode_examples(tokenizer, texts: Sequence[tuple[str, ...]], seq_len: int):
    """(ids, token types) lists of [CLS] text [SEP] (pair [SEP]), cut to seq_len."""
    return wordpiece.encode_batch(tokenizer, list(texts), seq_len)


def pad_batch(ids: Sequence[list[int]], types: Sequence[list[int]], seq_len: int,
              pad_id: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """inputs, token_types int32 and mask float32 [B, bucket]; weight [B, 1] (0 for the
    filler rows that bring the batch up to `batch_size`)."""
    B = batch_size or len(ids)
    L = bucket_length(max(len(x) for x in ids), seq_len)
    batch = {"inputs": np.full((B, L), pad_id, np.int32), "token_types": np.zeros((B, L),
                                                                                   np.int32),
             "mask": np.zeros((B, L), np.float32), "weight": np.zeros((B, 1), np.float32)}
    for row, (x, t) in enumerate(zip(ids, types)):
        batch["inputs"][row, :len(x)], batch["token_types"][row, :len(t)] = x, t
        batch["mask"][row, :len(x)] = batch["weight"][row] = 1.0
    return batch


@dataclasses.dataclass(frozen=True)
class LabelledBatches:
    """Deterministic padded batches of encoded examples (see the module docstring)."""

    ids: list
    types: list
    labels: np.ndarray  # float32 [num_examples]: class ids, or targets (regression)
    batch_size: int
    seq_len: int
    pad_id: int = 0
    seed: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        real = rows[rows >= 0]
        batch = pad_batch([self.ids[i] for i in real], [self.types[i] for i in real],
                          self.seq_len, self.pad_id, self.batch_size)
        batch["labels"] = np.zeros((self.batch_size, 1), np.float32)
        batch["labels"][:len(real), 0] = self.labels[real]
        return batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Training batch `step`: positions step*B .. step*B + B - 1 of the epochs'
        permutations, epoch e's from np.random.default_rng([seed, e])."""
        n = len(self.ids)
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, n)
        rows = np.array([data_lib._epoch_order(self.seed, int(e), n)[o]
                         for e, o in zip(epochs, offsets)])
        return self._gather(rows)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in order; the last batch filled with weight-0 rows."""
        num_batches = -(-len(self.ids) // self.batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for k in range(num_batches):
            rows = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
            yield self._gather(np.where(rows < len(self.ids), rows, -1))


@dataclasses.dataclass(frozen=True)
class LabelledData:
    tokenizer: tokenizers_lib.Tokenizer
    train: LabelledBatches
    val: LabelledBatches
    label_names: list[str]
    train_tokens: int
    val_tokens: int


def tfds_examples(data_config, split: str) -> tuple[list, list[str] | None]:
    """([((text, [pair]), label)], the label feature's class names or None) of a TFDS split
    (`data.tfds_name`, e.g. 'glue/sst2', prepared in `data.tfds_data_dir` or downloaded by
    TFDS), read with random access from its ArrayRecord files. A ClassLabel label is named by
    its class name; examples with label -1 (GLUE's unlabelled test splits) are an error."""
    tfds = sources._open_tfds()
    builder = sources._tfds_builder(tfds, {"name": data_config.tfds_name,
                                           "data_dir": data_config.tfds_data_dir})
    text_fields = [f.strip() for f in data_config.text_fields.split(",") if f.strip()]
    features = builder.info.features
    for field in (*text_fields, data_config.label_field):
        if field not in features:
            raise ValueError(f"data.tfds_name={data_config.tfds_name!r} has no feature "
                             f"{field!r} (data.text_fields / data.label_field); its features "
                             f"are {sorted(features)}")
    label = features[data_config.label_field]
    names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    examples = []
    for record in builder.as_data_source(split=split):
        value = int(record[data_config.label_field]) if names else record[data_config.label_field]
        if names and value < 0:
            raise ValueError(f"{data_config.tfds_name} split {split!r} has unlabelled examples "
                             "(label -1): use a labelled split")
        examples.append((tuple(sources._to_str(record[f]) for f in text_fields),
                         names[value] if names else str(sources._to_str(value))))
    return examples, names


def _examples(data_config, field: str):
    text_fields = [f.strip() for f in data_config.text_fields.split(",") if f.strip()]
    if not 1 <= len(text_fields) <= 2:
        raise ValueError(f"data.text_fields={data_config.text_fields!r} must name one text "
                         "column or two (a sentence pair), comma-separated")
    return [e for path in sources.expand_globs(data_config[field], field)
            for e in read_examples(path, text_fields, data_config.label_field)]


def build_data(config, workdir: str | None = None) -> LabelledData:
    """Encoded train / validation examples of `config.data`, with the run's tokenizer
    (`tokenizers.build_tokenizer`: the workdir's, an HF folder's, or WordPiece trained on the
    training texts); label names from the workdir's labels.json when it has one (a resumed run
    keeps its ids), else from the training labels (saved there)."""
    num_labels = config.model.num_labels
    data_config = config.data
    if config.train.steps_per_call != 1:
        raise ValueError(f"train.steps_per_call={config.train.steps_per_call}: classification "
                         "needs 1 (its batches are padded to different bucket lengths)")
    names = None
    if data_config.source == "shakespeare":
        train, val = shakespeare_genre("train"), shakespeare_genre("val")
    elif data_config.source == "tfds":
        train, names = tfds_examples(data_config, data_config.tfds_train_split)
        if data_config.tfds_val_split:
            val, _ = tfds_examples(data_config, data_config.tfds_val_split)
        else:
            n = int(len(train) * (1 - data_config.val_fraction))
            train, val = train[:n], train[n:]
    elif data_config.source not in ("files", "jsonl"):
        raise ValueError(f"data.source={data_config.source!r}: classification reads "
                         ".tsv/.csv/.jsonl data.train_files (source files or jsonl), TFDS "
                         "(source tfds) or the Shakespeare genre task (source shakespeare)")
    elif data_config.val_files:
        train, val = _examples(data_config, "train_files"), _examples(data_config, "val_files")
    else:
        train = _examples(data_config, "train_files")
        n = int(len(train) * (1 - data_config.val_fraction))
        train, val = train[:n], train[n:]
    if not train or not val:
        raise ValueError(f"labelled data: {len(train)} training and {len(val)} validation "
                         "examples; both need at least one")
    names = (load_label_names(workdir) if workdir else None) or names or (
        [] if num_labels == 1 else label_names([label for _, label in train]))
    if num_labels > 1 and len(names) != num_labels:
        raise ValueError(f"model.num_labels={num_labels}, but the training data has "
                         f"{len(names)} labels: {names[:10]}")
    index = {name: i for i, name in enumerate(names)}

    def label_ids(examples):
        if num_labels == 1:
            return np.array([float(label) for _, label in examples], np.float32)
        unknown = sorted({label for _, label in examples if label not in index})
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the training labels {names}")
        return np.array([index[label] for _, label in examples], np.float32)

    if workdir:
        save_label_names(workdir, names)
    tokenizer = tokenizers_lib.build_tokenizer(
        config.tokenizer, [text for texts, _ in train for text in texts], workdir)
    pad_id = tokenizer.pad_id or 0
    common = dict(batch_size=data_config.batch_size, seq_len=data_config.seq_len, pad_id=pad_id,
                  seed=data_config.seed)
    splits = []
    for examples in (train, val):
        ids, types = encode_examples(tokenizer, [t for t, _ in examples], data_config.seq_len)
        splits.append(LabelledBatches(ids, types, label_ids(examples), **common))
    return LabelledData(tokenizer=tokenizer, train=splits[0], val=splits[1], label_names=names,
                        train_tokens=splits[0].num_tokens, val_tokens=splits[1].num_tokens)
