"""Quality check: nanoGPT's CPU baby run on tiny-shakespeare, reproduced with lmjax.

  python benchmarks/tiny_shakespeare_quality.py [--data ../shared/data/tinyshakespeare.txt]

nanoGPT reports a validation loss of about 1.88 for this run (4 layers, 4 heads, width 128,
context 64, batch 12, 2000 steps, lr 1e-3 -> 1e-4, warmup 100, beta2 0.99, dropout 0), estimated
on 20 random validation batches. Here the loss is over the whole validation split, for two
models with those same hyperparameters: lmjax's config (rotary positions) and nanoGPT's exact
architecture (learned positions). Prints a JSON object per run and a Markdown table with the
final validation loss, wall time and training tokens/s.
"""
import argparse
import json
import os
import tempfile
import time

import _env  # benchmarks/_env.py: versions and machine
from lmjax import configs, train

_HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.path.join(_HERE, "..", "..", "shared", "data",
                                                       "tinyshakespeare.txt"))
    parser.add_argument("--num_steps", type=int, default=2000)
    args = parser.parse_args()

    env = _env.environment()
    print(json.dumps({"environment": env, "data": os.path.abspath(args.data),
                      "num_steps": args.num_steps}), flush=True)
    rows = []
    for name, position in (("lmjax (rotary positions)", "rope"),
                           ("nanoGPT architecture (learned positions)", "learned")):
        config = configs.get(f"tiny_shakespeare_char:{args.data}")
        config.model.position = position
        config.train.num_steps = args.num_steps
        config.train.num_samples = 0
        config.train.progress_bar = False
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            result = train.train_and_evaluate(config, workdir)
            wall = time.perf_counter() - start
        tokens = args.num_steps * config.data.batch_size * config.data.seq_len
        rows.append({
            "run": name, "steps": args.num_steps,
            "val_loss": round(result["eval"][-1]["loss"], 4),
            "train_loss_last50": round(sum(result["train_loss"][-50:]) / 50, 4),
            "nanogpt_val_loss": 1.88, "target_val_loss": 1.89,
            "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall),
        })
        print(json.dumps(rows[-1]), flush=True)
    print(_env.measured_with(env))
    print()
    print("| model | steps | val loss | nanoGPT | train loss (last 50) | wall s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['val_loss']} | 1.88 | "
              f"{r['train_loss_last50']} | {r['wall_s']} | {r['tokens_per_s']:,} |")


if __name__ == "__main__":
    main()
