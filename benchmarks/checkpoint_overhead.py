r"""How long a checkpoint stalls training: blocking part of an async save vs one train step.

    python benchmarks/checkpoint_overhead.py [--repeats=3] [--workdir=/tmp/lmjax_ckpt_bench]
    python benchmarks/checkpoint_overhead.py --checksums_only      # what verification costs

GPT-2 124M (f32 params and compute, context 256, batch 4, AdamW): times one jitted train step,
then saves the full TrainState (params + AdamW moments + step + rng, plus the JSON items) with
`lmjax.checkpoint.Checkpointer`: 'blocking' is the time `save` takes to return with async saving
on (device-to-host copy; training continues after it), 'full' is until the step is on disk
(`wait()`), and 'sync' is a save with async saving off. Saves include the checksums (a
64-bit digest of every array, computed on the device, and the finite check); 'checksums' times
that part alone, next to SHA-256 of host copies (the alternative it replaced), and 'restore'
times `Checkpointer.restore`, whose verification is the same digest pass over the restored state.
'plain Orbax' rows save and restore the same params and train state with
`orbax.checkpoint.StandardCheckpointer` and nothing else (no checksums, no JSON items): the
difference to lmjax's synchronous save and its restore is what lmjax adds, verification included.
Prints JSON, then a Markdown table.
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

import _env  # benchmarks/_env.py: versions and machine
from lmjax import checkpoint as ckpt_lib
from lmjax import integrity
from lmjax import model as model_lib
from lmjax import run_config
from lmjax import steps as steps_lib
from lmjax.config import default_config, preset_fields
from lmjax.tokenizers import ByteTokenizer


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def checksum_times(state, repeats: int) -> tuple[float, float]:
    """Median seconds of the checksums + finite check of a TrainState (what every save and
    restore adds), and of SHA-256 over host copies of the same arrays (the alternative)."""
    items = {"params": state.params, "train_state": {
        "step": state.step, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}}
    integrity.array_checksums(items)  # compile
    digest, sha = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        integrity.array_checksums(items)
        digest.append(time.perf_counter() - start)
        start = time.perf_counter()
        for leaf in jax.tree.leaves(jax.device_get(items)):
            hashlib.sha256(np.ascontiguousarray(leaf).tobytes()).hexdigest()
        sha.append(time.perf_counter() - start)
    return statistics.median(digest), statistics.median(sha)


def plain_orbax_times(state, abstract, root: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a synchronous `StandardCheckpointer` save of params + train state (no
    checksums, no JSON items) and of its restore into `abstract`: the baseline lmjax adds to."""
    items = {"params": state.params, "train_state": {
        "step": state.step, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}}
    # `abstract` is `train.abstract_train_state`: placed, its rng already the key data.
    target = {"params": abstract.params, "train_state": {
        "step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}}
    checkpointer = ocp.StandardCheckpointer()
    saves, restores = [], []
    for i in range(repeats + 1):  # the first also creates folders: not counted
        path = os.path.join(root, f"plain_{i}")
        start = time.perf_counter()
        checkpointer.save(path, items)
        checkpointer.wait_until_finished()
        if i:
            saves.append(time.perf_counter() - start)
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(checkpointer.restore(path, target))
        restores.append(time.perf_counter() - start)
    checkpointer.close()
    return statistics.median(saves), statistics.median(restores)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--checksums_only", action="store_true",
                        help="only the checksum cost (no train step, no saves)")
    args = parser.parse_args()

    config = default_config()
    config.model.update(preset_fields("gpt2_124m", max_len=args.seq_len, dtype="float32",
                                      param_dtype="float32"))
    config.data.seq_len, config.data.batch_size = args.seq_len, args.batch_size
    mcfg = run_config.model_config(config, vocab_size=config.model.vocab_size)
    tx, _ = steps_lib.make_optimizer(config.optim, 1000)
    state = jax.jit(lambda key: steps_lib.create_train_state(mcfg, tx, key))(jax.random.key(0))
    step_fn = jax.jit(lambda s, b: steps_lib.train_step(s, b, config=mcfg, tx=tx),
                      donate_argnums=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mcfg.vocab_size, (args.batch_size, args.seq_len + 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": np.ones((args.batch_size, args.seq_len), np.float32)}

    if args.checksums_only:
        digest_s, sha_s = checksum_times(state, args.repeats)
        size = sum(x.nbytes for x in jax.tree.leaves(state))
        print(json.dumps({"model": "gpt2_124m", "state_bytes": size, "checksums_s": digest_s,
                          "host_sha256_s": sha_s, "backend": jax.default_backend(),
                          "environment": _env.environment()}, indent=2))
        print(f"GPT-2 124M TrainState ({size / 2**20:.0f} MiB, {jax.default_backend()}): "
              f"checksums + finite check {digest_s:.3f} s per save or restore; SHA-256 of host "
              f"copies {sha_s:.3f} s")
        return
    state, m = step_fn(state, batch)  # compile
    jax.block_until_ready((state, m))
    step_times = []
    for _ in range(max(args.repeats, 3)):
        start = time.perf_counter()
        state, m = step_fn(state, batch)
        jax.block_until_ready((state, m))
        step_times.append(time.perf_counter() - start)

    root = args.workdir or tempfile.mkdtemp(prefix="lmjax_ckpt_bench_")
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = ByteTokenizer()
    results = {}
    for mode, async_save in (("async", True), ("sync", False)):
        ckpt = ckpt_lib.Checkpointer(os.path.join(root, mode), keep=2, async_save=async_save)
        blocking, full = [], []
        for i in range(args.repeats + 1):  # the first save also creates folders: not counted
            state, m = step_fn(state, batch)
            jax.block_until_ready((state, m))
            start = time.perf_counter()
            ckpt.save(state, step=i + 1, micro_step=int(state.step), config=config,
                      model_config=mcfg, tokenizer=tokenizer, reason="benchmark")
            returned = time.perf_counter()
            # Training goes on while the async save writes; the next step donates `state`.
            ckpt.wait()
            done = time.perf_counter()
            if i:
                blocking.append(returned - start)
                full.append(done - start)
        size = _dir_size(ckpt.step_dir(args.repeats + 1))
        if mode == "sync":
            abstract = steps_lib.abstract_train_state(mcfg, tx)
            restore = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                restored, _ = ckpt.restore(args.repeats + 1, abstract)
                jax.block_until_ready(restored)
                restore.append(time.perf_counter() - start)
            results["restore_s"] = statistics.median(restore)
            results["plain_save_s"], results["plain_restore_s"] = plain_orbax_times(
                state, abstract, os.path.join(root, "plain"), args.repeats)
        ckpt.close()
        results[mode] = {"blocking_s": statistics.median(blocking),
                         "full_s": statistics.median(full)}
    shutil.rmtree(root, ignore_errors=True)

    digest_s, sha_s = checksum_times(state, args.repeats)

    step_s = statistics.median(step_times)
    report = {
        "model": "gpt2_124m", "params": model_lib.count_params(state.params),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": "float32",
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "checkpoint_bytes": size, "train_step_s": step_s,
        "async_save_blocking_s": results["async"]["blocking_s"],
        "async_save_full_s": results["async"]["full_s"],
        "sync_save_s": results["sync"]["full_s"],
        "blocking_over_step": results["async"]["blocking_s"] / step_s,
        "checksums_s": digest_s, "host_sha256_s": sha_s,
        "restore_s": results["restore_s"],
        "plain_orbax_save_s": results["plain_save_s"],
        "plain_orbax_restore_s": results["plain_restore_s"],
        "save_added_s": results["sync"]["full_s"] - results["plain_save_s"],
        "restore_added_s": results["restore_s"] - results["plain_restore_s"],
        "repeats": args.repeats,
        "environment": _env.environment(),
    }
    print(json.dumps(report, indent=2))
    print()
    print(_env.measured_with(report["environment"], names=("jax", "orbax-checkpoint")))
    print(f"GPT-2 124M, f32, context {args.seq_len}, batch {args.batch_size}, "
          f"{report['backend']} ({report['device']}), checkpoint "
          f"{size / 2**20:.0f} MiB, median of {args.repeats}")
    print()
    print("| what | time (s) | × train step |")
    print("|---|---:|---:|")
    for name, key in (("one train step", "train_step_s"),
                      ("async save, blocking part", "async_save_blocking_s"),
                      ("async save, until on disk", "async_save_full_s"),
                      ("synchronous save", "sync_save_s"),
                      ("checksums + finite check (part of every save)", "checksums_s"),
                      ("SHA-256 of host copies instead (not used)", "host_sha256_s"),
                      ("plain Orbax save, no checksums (baseline)", "plain_orbax_save_s"),
                      ("lmjax sync save minus plain Orbax save", "save_added_s"),
                      ("restore, checksums verified", "restore_s"),
                      ("plain Orbax restore, no verification (baseline)", "plain_orbax_restore_s"),
                      ("lmjax restore minus plain Orbax restore", "restore_added_s")):
        print(f"| {name} | {report[key]:.3f} | {report[key] / step_s:.2f} |")


if __name__ == "__main__":
    main()
