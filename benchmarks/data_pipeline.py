r"""The data pipeline: prepare throughput, store size, training start-up, loader speed.

    python benchmarks/data_pipeline.py [--sizes_mb=100,1000] [--workers=1,2]
        [--tokenizers=byte,char,sentencepiece,hf] [--startup_sizes_mb=...] [--workdir=DIR]
        [--grain] [--loader_only]

Generates JSONL corpora of the given sizes (shuffled lines of the embedded Shakespeare with
random word swaps and character edits, cut into documents of 1-20 KB, so tokenizers have real
work) and measures, per corpus size and tokenizer:
  * `lmjax.token_store.prepare` with 1 and 2 worker processes: MB/s of text, tokens/s, store size;
  * nanoGPT's recipe side by side: one process, `encode` each document + eot, `np.memmap` uint16;
  * the loader: `Batches.batch(k)` rows/s and batches/s of GPT-2 124M's micro-batch (12 x 1024),
    packed documents, straight from the memory-mapped store; with --grain, the same batches
    through grain beside it (`grain_loader_speed`);
  * training start-up (launch to the end of step 1, the store already prepared) and the peak RSS
    of that process, for each corpus size (`LMJAX_TEST_PAUSE_AT_STEP=1`, then SIGKILL).
SentencePiece (BPE, 8k) and the Hugging Face `tokenizers` byte-level BPE (8k) are trained once on
the first 20 MB (not timed); char and byte need no training. Prints JSON, then Markdown tables.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import data, sources, token_store, tokenizers


def make_corpus(path: str, size_mb: float, seed: int = 0) -> None:
    """JSONL of documents (1-20 KB) of shuffled, edited Shakespeare lines, `size_mb` MB of text."""
    lines = [l for w in sources.shakespeare_works().values() for l in w.splitlines() if l]
    rng, target, written = random.Random(seed), int(size_mb * 1e6), 0
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            doc, size = [], rng.randint(1000, 20000)
            while sum(map(len, doc)) < size:
                words = rng.choice(lines).split()
                if len(words) > 2 and rng.random() < 0.3:
                    i, j = rng.randrange(len(words)), rng.randrange(len(words))
                    words[i], words[j] = words[j], words[i]
                line = " ".join(words)
                if line and rng.random() < 0.3:
                    k = rng.randrange(len(line))
                    line = line[:k] + rng.choice(letters) + line[k + 1:]
                doc.append(line)
            text = "\n".join(doc)
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode("utf-8"))


def train_tokenizers(corpus: str, folder: str) -> dict[str, ml_collections.ConfigDict]:
    """tokenizer configs by name; SentencePiece and HF BPE trained on the first 20 MB."""
    sample, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            sample.append(json.loads(line)["text"])
            size += len(sample[-1])
            if size > 20e6:
                break
    sp = tokenizers.SentencePieceTokenizer.train(sample, 8000)
    sp_path = os.path.join(folder, "sp.model")
    with open(sp_path, "wb") as f:
        f.write(sp.model_proto)
    import tokenizers as hf_tokenizers  # the Hugging Face library
    bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = hf_tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(sample, hf_tokenizers.trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<|endoftext|>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf_dir = os.path.join(folder, "hf_bpe")
    os.makedirs(hf_dir, exist_ok=True)
    bpe.save(os.path.join(hf_dir, "tokenizer.json"))
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)

    def cfg(kind, path=""):
        return ml_collections.ConfigDict(dict(kind=kind, vocab_size=8000, model_type="bpe",
                                              path=path))
    return {"byte": cfg("byte"), "char": cfg("char"), "sentencepiece": cfg("sentencepiece", sp_path),
            "hf": cfg("hf", hf_dir)}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def nanogpt_recipe(corpus: str, tokenizer, out_path: str) -> tuple[float, int]:
    """nanoGPT's data/openwebtext/prepare.py in one process: ids + eot per document, then one
    np.memmap uint16 `train.bin` filled in order. Returns (seconds, tokens)."""
    start = time.perf_counter()
    eot = tokenizer.eos_id
    ids = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids.append(tokenizer.encode(json.loads(line)["text"]) + ([eot] if eot is not None else []))
    total = sum(map(len, ids))
    arr = np.memmap(out_path, dtype=np.uint16, mode="w+", shape=(total,))
    offset = 0
    for part in ids:
        arr[offset:offset + len(part)] = part
        offset += len(part)
    arr.flush()
    return time.perf_counter() - start, total


def loader_speed(store: token_store.TokenStore, steps: int = 200) -> dict:
    """Batches/s of GPT-2 124M's micro-batch (12 x 1024, packed documents) from the store."""
    batches = data.Batches(store.split("train"), batch_size=12, seq_len=1024, seed=0,
                           packing=True)
    batches.batch(0)  # the epoch permutation, once
    start = time.perf_counter()
    for k in range(1, steps + 1):
        batches.batch(k)
    seconds = time.perf_counter() - start
    return {"batches_per_s": steps / seconds, "rows_per_s": steps * 12 / seconds}


def grain_loader_speed(store: token_store.TokenStore, folder: str, steps: int = 200) -> dict:
    """The same 12 x 1024 batches through grain (`pip install grain`), the loader MaxText and
    nanodo use, two ways:
      * windows: grain's MapDataset over the same rows (shuffle -> `Batches.row`, the same
        tokens, mask, segment ids and positions -> batch): grain's own cost on lmjax's rows;
      * documents: MaxText's recipe: the documents as ArrayRecord records (written here, timed,
        a second copy of the corpus), shuffled, packed by `FirstFitPackIterDataset` with segment
        ids and positions, batched.
    Returns batches/s of each and the ArrayRecord copy's seconds and MB."""
    import grain
    from array_record.python import array_record_module

    split, length = store.split("train"), 1025
    batches = data.Batches(split, batch_size=12, seq_len=1024, seed=0, packing=True)
    by_window = iter(grain.MapDataset.range(batches.num_rows).shuffle(seed=0).map(batches.row)
                     .repeat().batch(12))
    next(by_window)
    start = time.perf_counter()
    for _ in range(steps):
        next(by_window)
    window_s = time.perf_counter() - start

    path, start = os.path.join(folder, "documents.array_record"), time.perf_counter()
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    docs = split.doc_ids(0, split.num_tokens)
    bounds = np.flatnonzero(np.diff(docs)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, split.num_tokens]):
        writer.write(split.read(int(a), int(b)).astype(store.dtype).tobytes())
    writer.close()
    write_s = time.perf_counter() - start
    dtype = store.dtype
    packed = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).shuffle(seed=0)
        .map(lambda record: {"inputs": np.frombuffer(record, dtype)[:length].astype(np.int32)})
        .repeat().to_iter_dataset(), length_struct={"inputs": length}, num_packing_bins=12)
    by_document = iter(packed.batch(12))
    next(by_document)
    start = time.perf_counter()
    for _ in range(steps):
        next(by_document)
    document_s = time.perf_counter() - start
    return {"grain_windows_batches_per_s": steps / window_s,
            "grain_documents_batches_per_s": steps / document_s,
            "array_record_write_s": write_s, "array_record_mb": os.path.getsize(path) / 1e6}


def startup(corpus: str, store_dir: str, workdir: str) -> dict:
    """Launch to the end of step 1 of a tiny model on the corpus's store, and peak RSS."""
    command = [sys.executable, "-m", "lmjax", "train", "--config=shakespeare_char:demo",
               f"--workdir={workdir}", "--config.data.source=jsonl",
               f"--config.data.train_files={corpus}", f"--config.data.store_dir={store_dir}",
               "--config.tokenizer.kind=byte", "--config.train.num_steps=5",
               "--config.train.progress_bar=False", "--config.train.num_samples=0",
               "--config.optim.warmup_steps=1"]
    env = {**os.environ, "LMJAX_TEST_PAUSE_AT_STEP": "1", "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    seconds = peak_kb = None
    for line in proc.stdout:
        if line.startswith("LMJAX_TEST_PAUSED"):
            seconds = time.perf_counter() - start
            # The trained process's own peak (VmHWM, reset by exec). Not wait4's ru_maxrss: a
            # forked child starts with this benchmark's resident pages (the corpus it wrote,
            # nanoGPT's arrays), and Linux carries that peak across the exec.
            with open(f"/proc/{proc.pid}/status", encoding="utf-8") as f:
                peak_kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    proc.wait()
    return {"startup_s": seconds, "peak_rss_mb": peak_kb / 1024 if peak_kb else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes_mb", default="100,1000")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--tokenizers", default="byte,char,sentencepiece,hf")
    parser.add_argument("--startup_sizes_mb", default="", help="default: --sizes_mb")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--grain", action="store_true", help="the loader through grain too")
    parser.add_argument("--loader_only", action="store_true",
                        help="byte tokenizer, one worker count, no start-up runs")
    args = parser.parse_args()
    if args.loader_only:
        args.tokenizers, args.workers, args.startup_sizes_mb = "byte", args.workers[0], "none"
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    root = args.workdir or tempfile.mkdtemp(prefix="lmjax_data_bench_")
    os.makedirs(root, exist_ok=True)
    env = _env.environment()
    results = {"env": env, "prepare": [], "nanogpt": [], "loader": [], "startup": []}
    tokenizer_configs = None
    for size in sizes:
        corpus = os.path.join(root, f"corpus_{size:g}mb.jsonl")
        if not os.path.exists(corpus):
            make_corpus(corpus, size)
        if tokenizer_configs is None:
            tokenizer_configs = train_tokenizers(corpus, root)
        source = sources.source_spec(ml_collections.ConfigDict(dict(
            source="jsonl", train_files=corpus, val_files="", jsonl_field="text",
            shard_mb=max(size / 8, 1))))
        for name in args.tokenizers.split(","):
            tok_cfg = tokenizer_configs[name]
            for n in workers:
                store_dir = os.path.join(root, f"store_{size:g}_{name}_{n}")
                shutil.rmtree(store_dir, ignore_errors=True)
                start = time.perf_counter()
                store = token_store.prepare(source, tok_cfg, store_dir, num_workers=n,
                                            progress=False)
                seconds = time.perf_counter() - start
                split = store.manifest["splits"]["train"]
                results["prepare"].append({
                    "size_mb": size, "tokenizer": name, "workers": n, "seconds": seconds,
                    "mb_per_s": split["text_bytes"] / 1e6 / seconds,
                    "tokens_per_s": split["tokens"] / seconds, "tokens": split["tokens"],
                    "store_mb": dir_size(store_dir) / 1e6, "dtype": store.dtype.name})
                print(json.dumps(results["prepare"][-1]), flush=True)
            tokenizer = store.tokenizer()
            seconds, total = nanogpt_recipe(corpus, tokenizer, os.path.join(root, "train.bin"))
            results["nanogpt"].append({"size_mb": size, "tokenizer": name, "seconds": seconds,
                                       "mb_per_s": split["text_bytes"] / 1e6 / seconds,
                                       "tokens_per_s": total / seconds, "tokens": total})
            print(json.dumps(results["nanogpt"][-1]), flush=True)
            if name == "byte":
                row = {"size_mb": size, **loader_speed(store)}
                if args.grain:
                    row.update(grain_loader_speed(store, root))
                results["loader"].append(row)
                print(json.dumps(results["loader"][-1]), flush=True)
    startup_sizes = "" if args.startup_sizes_mb == "none" else (args.startup_sizes_mb
                                                                or args.sizes_mb)
    for size in [float(s) for s in startup_sizes.split(",") if s]:
        corpus = os.path.join(root, f"corpus_{size:g}mb.jsonl")
        store_dir = os.path.join(root, f"startup_store_{size:g}")
        first = startup(corpus, store_dir, os.path.join(root, f"run_{size:g}_a"))  # prepares
        second = startup(corpus, store_dir, os.path.join(root, f"run_{size:g}_b"))
        results["startup"].append({"size_mb": size, "first_run_s": first["startup_s"],
                                   **second})
        print(json.dumps(results["startup"][-1]), flush=True)
    print(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict) -> None:
    print(_env.measured_with(results["env"]))
    nano = {(r["size_mb"], r["tokenizer"]): r for r in results["nanogpt"]}
    print("\n| corpus MB | tokenizer | workers | MB/s | tokens/s | x nanoGPT recipe | store MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results["prepare"]:
        ref = nano.get((r["size_mb"], r["tokenizer"]))
        ratio = r["mb_per_s"] / ref["mb_per_s"] if ref else float("nan")
        print(f"| {r['size_mb']:g} | {r['tokenizer']} | {r['workers']} | {r['mb_per_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['store_mb']:.1f} |")
    for r in results["nanogpt"]:
        print(f"| {r['size_mb']:g} | {r['tokenizer']} | nanoGPT (1 process) | "
              f"{r['mb_per_s']:.2f} | {r['tokens_per_s']:,.0f} | 1.00x | |")
    print("\n| corpus MB | lmjax batches/s (12 x 1024) | rows/s | grain, windows | "
          "grain, packed documents | ArrayRecord copy (s, MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results["loader"]:
        grain_cells = (f"{r['grain_windows_batches_per_s']:,.0f} | "
                       f"{r['grain_documents_batches_per_s']:,.0f} | "
                       f"{r['array_record_write_s']:.1f}, {r['array_record_mb']:.0f}"
                       if "grain_windows_batches_per_s" in r else "- | - | -")
        print(f"| {r['size_mb']:g} | {r['batches_per_s']:,.0f} | {r['rows_per_s']:,.0f} | "
              f"{grain_cells} |")
    print("\n| corpus MB | start-up, store prepared (s) | peak RSS MB | first run, preparing (s) |")
    print("|---:|---:|---:|---:|")
    for r in results["startup"]:
        print(f"| {r['size_mb']:g} | {r['startup_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['first_run_s']:.1f} |")


if __name__ == "__main__":
    main()
