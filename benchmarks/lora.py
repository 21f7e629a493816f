"""LoRA vs full fine-tuning at GPT-2 124M's shape: trainable parameters, optimizer-state bytes,
peak RSS and step time, side by side (JSON + a Markdown table).

    python benchmarks/lora.py                              # seq 128, batch 4, 3 timed steps
    python benchmarks/lora.py --seq_len 256 --steps 5 --rank 16 --targets query,key,value,out
    python benchmarks/lora.py --finetune            # the held-out-plays fine-tune (~5 min)

Each mode runs in its own worker process (its peak RSS is its own): `preset('gpt2_124m')` with
lmjax's training step as `train_and_evaluate` jits it (`steps_lib.create_train_state`,
`steps_lib.make_optimizer`: AdamW + clipping, `steps_lib.jit_train_step`: donated state), on random
tokens. `full` trains every weight; `lora` the adapters alone (`lora.rank` on `--targets`), the
base frozen in `TrainState.frozen`: no gradients and no Adam moments for it; `qlora` the same
adapters on an int8 frozen base (`model.quantization='int8'`: integer forward dots, the
straight-through backward of `int8.int8_matmul`), declared int8 directly (a run quantizes its
loaded float base once, at start; that transient is not in this peak).

Reported: trainable params; base weights (the frozen base's bytes; full: every param's);
optimizer-state bytes (every array of opt_state); peak RSS
(VmHWM: the whole process, framework and model included); step_ms, the median of `--steps`
steps after one untimed compile step; compile_s.

`--finetune`: a real fine-tune. A byte-level decoder (4 layers, width 128, context 128, RoPE) is
pretrained on the embedded Shakespeare minus four plays; then, from it (`init_from`), full
fine-tuning, LoRA (rank `--rank` on every projection) and QLoRA (the same adapters on the base
quantized to int8) train the same steps on three of the held-out plays (hamlet, macbeth,
tempest) and are evaluated on the fourth (twelfth_night, every window); the base's own loss there is a LoRA run with learning rate 0 (step 0 = the base).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import _env  # benchmarks/_env.py (this folder is sys.path[0]): versions and machine


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from lmjax import model as model_lib, sharding
    from lmjax import steps as steps_lib
    from lmjax.config import default_config, preset

    lora = dict(lora_rank=args.rank, lora_targets=args.targets) if args.mode != "full" else {}
    if args.mode == "qlora":  # the frozen base int8 (its kernels and embedding), adapters f32
        lora["quantization"] = "int8"
    mcfg = preset("gpt2_124m", dtype=args.dtype, **lora)
    config = default_config()
    tx, _ = steps_lib.make_optimizer(config.optim, 1000)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules(config.mesh, mcfg, mesh.shape)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        state_sh = steps_lib.state_shardings(mcfg, tx, mesh, rules)
        state = jax.jit(functools.partial(steps_lib.create_train_state, mcfg, tx),
                        out_shardings=state_sh)(jax.random.key(0))
        batch_sh = sharding.batch_sharding(mesh)
        step_fn = steps_lib.jit_train_step(mcfg, tx, state_sh, batch_sh)
        trainable = model_lib.count_params(state.params)
        opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        base_bytes = sum(x.nbytes for x in jax.tree.leaves(
            state.params if state.frozen is None else state.frozen))
        times = []
        with nn.logical_axis_rules(rules):
            for i in range(args.steps + 1):
                tokens = rng.integers(0, mcfg.vocab_size, (args.batch, args.seq_len + 1))
                batch = {"inputs": tokens[:, :-1].astype(np.int32),
                         "targets": tokens[:, 1:].astype(np.int32),
                         "mask": np.ones((args.batch, args.seq_len), np.float32)}
                start = time.perf_counter()
                state, metrics = step_fn(state, sharding.put_batch(batch, batch_sh))
                jax.block_until_ready(metrics["loss"])
                times.append(time.perf_counter() - start)
    step_ms = 1000 * statistics.median(times[1:])
    return {"mode": args.mode, "trainable_params": trainable,
            "total_params": model_lib.num_params(mcfg), "opt_state_bytes": opt_bytes,
            "base_bytes": base_bytes,
            "peak_rss_MiB": round(_peak_rss_mib(), 1), "step_ms": round(step_ms, 1),
            "step_ms_all": [round(1000 * t, 1) for t in times[1:]],
            "compile_s": round(times[0] - step_ms / 1000, 2), "loss": float(metrics["loss"])}


HELD_OUT = ("hamlet", "macbeth", "tempest")
HELD_OUT_VAL = "twelfth_night"


def finetune(args) -> dict:
    """The held-out-plays fine-tune (see the module docstring): val losses and sizes."""
    import tempfile

    import jax

    from lmjax import model as model_lib, sources, train
    from lmjax import steps as steps_lib
    from lmjax.config import default_config, preset_fields

    root = tempfile.mkdtemp(prefix="lora_finetune_")
    works = sources.shakespeare_works()
    for name, text in works.items():
        with open(os.path.join(root, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
    pretrain = [n for n in works if n not in HELD_OUT + (HELD_OUT_VAL,)]

    def config_for(files, steps, lr, val_files=""):
        c = default_config()
        c.data.source, c.tokenizer.kind = "files", "byte"
        c.data.train_files = ",".join(os.path.join(root, n + ".txt") for n in files)
        c.data.val_files = val_files
        c.model.update(preset_fields("nanogpt_baby", vocab_size=0, max_len=128, position="rope"))
        c.data.seq_len, c.data.batch_size = 128, 12
        c.optim.update(learning_rate=lr, min_learning_rate=lr / 10, warmup_steps=min(20, steps))
        c.train.update(num_steps=steps, eval_every=0, eval_batches=-1 if val_files else 20,
                       checkpoint_every=0, num_samples=0, progress_bar=False, log_every=50)
        return c

    t0 = time.perf_counter()
    base = train.train_and_evaluate(config_for(pretrain, args.pretrain_steps, 1e-3),
                                    os.path.join(root, "pretrain"))
    runs = {"pretrain": {"val_loss": base["eval"][-1]["loss"], "steps": args.pretrain_steps,
                         "wall_s": round(time.perf_counter() - t0, 1)}}
    val = os.path.join(root, HELD_OUT_VAL + ".txt")
    for mode, lr, rank, steps in (("base (no fine-tune)", 0.0, args.rank, 1),
                                  ("full fine-tune", args.full_lr, 0, args.finetune_steps),
                                  ("LoRA", args.lora_lr, args.rank, args.finetune_steps),
                                  ("QLoRA (int8 base)", args.lora_lr, args.rank,
                                   args.finetune_steps)):
        config = config_for(HELD_OUT, steps, lr, val)
        config.init_from = os.path.join(root, "pretrain")
        config.lora.update(rank=rank, targets="query,key,value,out,up,down")
        if mode.startswith("QLoRA"):  # validated on the int8 base it trained on
            config.model.quantization = "int8"
        t0 = time.perf_counter()
        result = train.train_and_evaluate(config, os.path.join(root, mode.split()[0].lower()))
        state = result["state"]
        runs[mode] = {"val_loss": round(result["eval"][-1]["loss"], 4), "steps": steps,
                      "learning_rate": lr, "lora_rank": rank,
                      "trainable_params": model_lib.count_params(state.params),
                      "opt_state_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
                      "checkpoint_params": model_lib.count_params(state.params),
                      "wall_s": round(time.perf_counter() - t0, 1)}
    return {"held_out_train": HELD_OUT, "held_out_val": HELD_OUT_VAL, "runs": runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="full,lora,qlora")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--output", default="")
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--full_lr", type=float, default=3e-4)
    parser.add_argument("--lora_lr", type=float, default=3e-3)
    args = parser.parse_args()
    if args.finetune:
        out = {**finetune(args), **_env.environment(), "load_average": os.getloadavg()}
        print(json.dumps(out, indent=2))
        print("\n| run | steps | lr | val loss (twelfth_night) | trainable params | "
              "optimizer state | wall s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in out["runs"].items():
            extra = (f"{r['trainable_params']:,} | {r['opt_state_bytes'] / 2**20:.2f} MiB"
                     if "trainable_params" in r else "all | -")
            print(f"| {name} | {r['steps']} | {r.get('learning_rate', 1e-3)} | "
                  f"{r['val_loss']:.4f} | {extra} | {r['wall_s']} |")
        if args.output:
            with open(args.output, "w") as f:
                json.dump(out, f, indent=2)
        return
    if args.mode:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items()
            if k in ("seq_len", "batch", "steps", "rank", "targets", "dtype")]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        results.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
    out = {"shape": "gpt2_124m", "seq_len": args.seq_len, "batch": args.batch,
           "rank": args.rank, "targets": args.targets, "dtype": args.dtype, "results": results,
           **_env.environment(), "load_average": os.getloadavg()}
    print(json.dumps(out, indent=2))
    print(f"\nGPT-2 124M, {args.batch} x {args.seq_len} tokens, {args.dtype}; LoRA rank "
          f"{args.rank} on {args.targets}; {_env.measured_with(out)}\n")
    print("| mode | trainable params | base weights | optimizer state | peak RSS | step | "
          "compile |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['trainable_params']:,} | {r['base_bytes'] / 2**20:.1f} MiB | "
              f"{r['opt_state_bytes'] / 2**20:.1f} MiB | {r['peak_rss_MiB']:.0f} MiB | "
              f"{r['step_ms']:.0f} ms | {r['compile_s']} s |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
