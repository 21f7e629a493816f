"""The token store: prepare (sources, shards, manifest, resume, workers) and reading it back."""
import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest

from lmjax import sources, token_store, tokenizers


def source(kind="files", **fields):
    return ml_collections.ConfigDict(dict(
        dict(source=kind, train_files="", val_files="", jsonl_field="text", shard_mb=64),
        **fields))


def tokenizer_config(kind="byte"):
    return ml_collections.ConfigDict(dict(kind=kind, vocab_size=300, model_type="bpe", path=""))


def write_docs(folder, docs_per_file):
    """Text files, one document each; returns the paths' glob."""
    os.makedirs(folder, exist_ok=True)
    for i, doc in enumerate(docs_per_file):
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)
    return os.path.join(folder, "*.txt")


DOCS = [f"Document {i}: " + "to be or not to be, été 日本 🙂 " * (i + 1) for i in range(7)]


def reference_stream(docs, tokenizer):
    """Each document's ids then eos, and where each document starts: NumPy from encode()."""
    parts = [np.asarray(tokenizer.encode(d) + [tokenizer.eos_id]) for d in docs]
    return np.concatenate(parts), np.cumsum([0] + [len(p) for p in parts[:-1]])


def test_prepare_files_writes_shards_manifest_and_reads_back(tmp_path):
    pattern = write_docs(tmp_path / "text", DOCS)
    # shards of ~1 KB of text: several shards, each a group of whole files
    spec = sources.source_spec(source(train_files=pattern, shard_mb=3e-4))
    store = token_store.prepare(spec, tokenizer_config(), str(tmp_path / "store"),
                                num_workers=1, progress=False)
    tokenizer = store.tokenizer()
    expected, starts = reference_stream(DOCS, tokenizer)
    split = store.split("train")
    assert store.dtype == np.uint16 and split.num_tokens == len(expected) and split.num_docs == 7
    shards = store.manifest["splits"]["train"]["shards"]
    assert len(shards) > 2
    np.testing.assert_array_equal(split.read(0, split.num_tokens), expected)
    for a, b in [(0, 1), (5, 900), (len(expected) - 3, len(expected))]:  # across shards
        np.testing.assert_array_equal(split.read(a, b), expected[a:b])
        np.testing.assert_array_equal(split.doc_ids(a, b),
                                      np.searchsorted(starts, np.arange(a, b), side="right") - 1)
    manifest = store.manifest
    assert manifest["source"]["kind"] == "files" and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    for shard in shards:  # checksums of the files on disk
        with open(tmp_path / "store" / f"{shard['name']}.tokens", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
    assert manifest["tokenizer"]["fingerprint"] == token_store.tokenizer_fingerprint(tokenizer)
    store.verify()
    with open(tmp_path / "store" / f"{shards[0]['name']}.tokens", "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(ValueError, match="checksum differs"):
        store.verify()


def test_second_prepare_is_a_no_op_and_interrupted_prepare_resumes(tmp_path, monkeypatch):
    pattern = write_docs(tmp_path / "text", DOCS)
    spec = sources.source_spec(source(train_files=pattern, shard_mb=3e-4))
    folder = str(tmp_path / "store")
    real_write, calls = token_store._write_shard, []

    class Killed(Exception):
        pass

    def interrupted(job):  # the third shard's worker dies, once
        calls.append(job[1])
        if calls == ["train-00000", "train-00001", "train-00002"]:
            raise Killed
        return real_write(job)

    monkeypatch.setattr(token_store, "_write_shard", interrupted)
    with pytest.raises(Killed):
        token_store.prepare(spec, tokenizer_config(), folder, num_workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="not a prepared token store"):
        token_store.TokenStore(folder)  # half a store is never read
    kept = {name: os.stat(os.path.join(folder, name + ".tokens")).st_mtime_ns
            for name in calls[:2]}

    calls.clear()
    store = token_store.prepare(spec, tokenizer_config(), folder, num_workers=1, progress=False)
    assert calls[0] == "train-00002" and not set(kept) & set(calls)  # finished shards kept
    for name, mtime in kept.items():
        assert os.stat(os.path.join(folder, name + ".tokens")).st_mtime_ns == mtime
    fresh = token_store.prepare(spec, tokenizer_config(), str(tmp_path / "fresh"),
                                num_workers=1, progress=False)
    assert fresh.manifest["splits"] == store.manifest["splits"]

    calls.clear()
    manifest_mtime = os.stat(os.path.join(folder, token_store.MANIFEST)).st_mtime_ns
    token_store.prepare(spec, tokenizer_config(), folder, num_workers=1, progress=False)
    assert calls == []  # no-op
    assert os.stat(os.path.join(folder, token_store.MANIFEST)).st_mtime_ns == manifest_mtime
    assert not [f for f in os.listdir(folder) if ".tmp" in f]  # no temporary files left


def test_two_worker_processes_write_the_same_store(tmp_path):
    pattern = write_docs(tmp_path / "text", DOCS)
    spec = sources.source_spec(source(train_files=pattern, shard_mb=3e-4))
    one = token_store.prepare(spec, tokenizer_config("char"), str(tmp_path / "one"),
                              num_workers=1, progress=False)
    two = token_store.prepare(spec, tokenizer_config("char"), str(tmp_path / "two"),
                              num_workers=2, progress=False)
    assert one.manifest["splits"] == two.manifest["splits"]
    assert one.fingerprint == two.fingerprint
    # char vocabulary: every character of the corpus, sorted (nanoGPT)
    assert two.tokenizer().chars == "".join(sorted(set("".join(DOCS))))


def test_jsonl_byte_ranges_cut_at_line_ends(tmp_path):
    lines = [{"text": d, "id": i} for i, d in enumerate(DOCS * 3)]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n")
    with open(tmp_path / "val.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "held out"}) + "\n")
    spec = sources.source_spec(source("jsonl", train_files=str(tmp_path / "a.jsonl"),
                                          val_files=str(tmp_path / "val.jsonl"), shard_mb=3e-4))
    units = sources.source_splits(spec)["train"]
    assert len(units) > 3
    assert [d for u in units for d in sources.read_unit(u)] == [r["text"] for r in lines]
    store = token_store.prepare(spec, tokenizer_config(), str(tmp_path / "store"),
                                num_workers=1, progress=False)
    expected, _ = reference_stream([r["text"] for r in lines], store.tokenizer())
    np.testing.assert_array_equal(store.split("train").read(0, len(expected)), expected)
    assert store.split("val").num_docs == 1

    spec["jsonl_field"] = "content"
    with pytest.raises(ValueError, match=r"data.jsonl_field='content' is not in a record.*"
                                         r"\['id', 'text'\]"):
        list(sources.read_unit(sources.source_splits(spec)["train"][0]))


def test_dtype_is_the_narrowest_that_fits():
    assert token_store.token_dtype(259) == np.uint16
    assert token_store.token_dtype(65536) == np.uint16
    assert token_store.token_dtype(65537) == np.uint32
    assert token_store.token_dtype(151_936) == np.uint32  # e.g. Qwen2's vocabulary


def test_a_store_of_another_tokenizer_is_refused(tmp_path):
    pattern = write_docs(tmp_path / "text", DOCS[:2])
    spec = sources.source_spec(source(train_files=pattern))
    folder = str(tmp_path / "store")
    token_store.prepare(spec, tokenizer_config("char"), folder, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        token_store.prepare(spec, tokenizer_config("char"), folder,
                            tokenizer=tokenizers.CharTokenizer("abc"), progress=False)
