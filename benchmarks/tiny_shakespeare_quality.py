"""nanoGPT's CPU baby run on tiny-shakespeare, with lmjax and with nanoGPT itself, side by side.

  python benchmarks/tiny_shakespeare_quality.py [--nanogpt DIR] [--data PATH] [--num_steps N]

The recipe is `--config=tiny_shakespeare_char` as shipped (4 layers, 4 heads, width 128, context
64, batch 12, 2000 steps, lr 1e-3 -> 1e-4, warmup 100, beta2 0.99, dropout 0), run end to end by
`train.train_and_evaluate` for two models: lmjax's config (rotary positions) and nanoGPT's exact
architecture (learned positions). Its wall time is split as the run reports it (compile, train
steps, evaluations, checkpoint saves, other: data, initialisation).

`--nanogpt DIR`: also run nanoGPT's own `train.py` from DIR, a scratch copy of
github.com/karpathy/nanoGPT whose `data/shakespeare_char/` was prepared from the same file
(`cp tinyshakespeare.txt DIR/data/shakespeare_char/input.txt && python
DIR/data/shakespeare_char/prepare.py`), with the command below, timed launch to exit. Its saved
model is then scored like lmjax's, on the whole validation split (non-overlapping windows of 64),
with DIR's own model code. nanoGPT evaluates 20 random batches of each split every 250 steps;
lmjax 20 validation batches every 250 steps and the whole split at the end.
Prints a JSON object per run and a Markdown table.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import configs, train

_HERE = os.path.dirname(os.path.abspath(__file__))
NANOGPT_FLAGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                 "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
                 "--n_layer=4", "--n_head=4", "--n_embd=128", "--lr_decay_iters=2000",
                 "--dropout=0.0", "--always_save_checkpoint=True"]


def run_lmjax(data: str, position: str, num_steps: int) -> dict:
    config = configs.get(f"tiny_shakespeare_char:{data}")
    config.model.position = position
    config.train.num_steps = num_steps
    config.train.num_samples = 0
    config.train.progress_bar = False
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        result = train.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
    seconds = {name: round(value, 1) for name, value in result["seconds"].items()}
    return {"val_loss": round(result["eval"][-1]["loss"], 4), "wall_s": round(wall, 1),
            "seconds": seconds, "ms_per_step": round(1000 * seconds["train"] / num_steps, 1)}


def nanogpt_val_loss(nanogpt_dir: str, out_dir: str, block_size: int = 64) -> tuple[float, int]:
    """Cross-entropy of nanoGPT's saved model (`out_dir/ckpt.pt`, written by DIR's train.py)
    over its whole val.bin in non-overlapping windows, and the step it was saved at."""
    import torch
    sys.path.insert(0, nanogpt_dir)
    from model import GPT, GPTConfig  # nanoGPT's model.py, from the scratch copy
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu",
                            weights_only=False)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    model.eval()
    val = np.fromfile(os.path.join(nanogpt_dir, "data", "shakespeare_char", "val.bin"),
                      dtype=np.uint16).astype(np.int64)
    windows = (len(val) - 1) // block_size
    x = torch.from_numpy(val[:windows * block_size].reshape(windows, block_size))
    y = torch.from_numpy(val[1:windows * block_size + 1].reshape(windows, block_size))
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows, 64):
            logits, _ = model(x[i:i + 64], y[i:i + 64])  # with targets: logits at every position
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y[i:i + 64].flatten(), reduction="sum").item()
    return total / (windows * block_size), int(checkpoint["iter_num"])


def run_nanogpt(nanogpt_dir: str, num_steps: int) -> dict:
    # nanoGPT saves at its evaluations (every 250 steps, from step 250): a shorter run evaluates
    # and saves at its end instead. --always_save_checkpoint=True: the saved model is the last
    # one, not the one with the best 20-batch estimate (lmjax scores its last state too).
    interval = ([] if num_steps % 250 == 0 else [f"--eval_interval={num_steps}"])
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, "train.py", *NANOGPT_FLAGS, *interval,
                   f"--max_iters={num_steps}", f"--out_dir={out_dir}"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=nanogpt_dir, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"nanoGPT failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        iter_ms = [float(line.split("time ")[1].split("ms")[0])
                   for line in done.stdout.splitlines() if line.startswith("iter ")]
        val_loss, saved_at = nanogpt_val_loss(nanogpt_dir, out_dir)
        if saved_at != num_steps:
            raise RuntimeError(f"nanoGPT's checkpoint is from step {saved_at}, not {num_steps}")
        return {"val_loss": round(val_loss, 4), "checkpoint_step": saved_at,
                "wall_s": round(wall, 1), "ms_per_step": round(float(np.median(iter_ms)), 1),
                "command": "python " + " ".join(command[1:-1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.path.join(_HERE, "..", "..", "shared", "data",
                                                       "tinyshakespeare.txt"))
    parser.add_argument("--nanogpt", default="", help="a scratch copy of nanoGPT (see above)")
    parser.add_argument("--num_steps", type=int, default=2000)
    args = parser.parse_args()

    env = _env.environment(peers=("torch",) if args.nanogpt else ())
    print(json.dumps({"environment": env, "data": os.path.abspath(args.data),
                      "num_steps": args.num_steps}), flush=True)
    rows = []
    for name, position in (("lmjax (rotary positions)", "rope"),
                           ("lmjax, nanoGPT's architecture (learned positions)", "learned")):
        rows.append({"run": name, **run_lmjax(args.data, position, args.num_steps)})
        print(json.dumps(rows[-1]), flush=True)
    if args.nanogpt:
        rows.append({"run": "nanoGPT train.py", **run_nanogpt(args.nanogpt, args.num_steps)})
        print(json.dumps(rows[-1]), flush=True)
    print(_env.measured_with(env))
    print()
    nanogpt_wall = rows[-1]["wall_s"] if args.nanogpt else math.nan
    print("| run | val loss (whole split) | wall s | vs nanoGPT | step ms | compile s | train s "
          "| eval s | save s | other s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r.get("seconds", {})
        parts = " | ".join(str(s.get(k, "")) for k in ("compile", "train", "eval", "save", "other"))
        print(f"| {r['run']} | {r['val_loss']} | {r['wall_s']} | "
              f"{nanogpt_wall / r['wall_s']:.2f}x | {r['ms_per_step']} | {parts} |")


if __name__ == "__main__":
    main()
