"""The int8 weight layout of `lmjax.int8.int8_dot` on XLA:CPU: input-major (x @ W, W [in, out],
the float kernel's layout) vs output-major (W @ x^T, W [out, in], how lmjax stores int8
kernels), beside the float32 dot lmjax's float path runs (x @ W).

GPT-2 124M's decode shapes: the MLP's 768 -> 3072 and 3072 -> 768 and the tied 768 -> 50257
logits, at 1, 2 and 8 rows. Each variant is jitted and timed (median of `--repeats` calls);
the variants are interleaved, `--rounds` times, and the best round's median is reported.

    python benchmarks/int8_dot_layout.py
    python benchmarks/int8_dot_layout.py --rounds=5 --repeats=50

Prints JSON lines and a Markdown table (ms per call).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import int8

SHAPES = ((768, 3072), (3072, 768), (768, 50257))
ROWS = (1, 2, 8)


def median_ms(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    env = _env.environment()
    load_before = os.getloadavg()
    variants = {
        "f32 x @ W": jax.jit(lambda x, w: jnp.einsum("bd,df->bf", x, w)),
        "int8 x @ W [in, out]": jax.jit(lambda x, w: int8.int8_dot("bd,df->bf", x, w)),
        "int8 W @ x^T [out, in]": jax.jit(lambda x, w: int8.int8_dot("bd,fd->bf", x, w)),
    }
    rng = np.random.default_rng(0)
    rows = []
    for d_in, d_out in SHAPES:
        w_f32 = rng.standard_normal((d_in, d_out), np.float32)
        w_in = rng.integers(-127, 128, (d_in, d_out), dtype=np.int8)
        weights = {"f32 x @ W": jnp.asarray(w_f32), "int8 x @ W [in, out]": jnp.asarray(w_in),
                   "int8 W @ x^T [out, in]": jnp.asarray(np.ascontiguousarray(w_in.T))}
        for n in ROWS:
            x = jnp.asarray(rng.standard_normal((n, d_in), np.float32))
            best = {name: float("inf") for name in variants}
            for _ in range(args.rounds):  # interleaved
                for name, fn in variants.items():
                    best[name] = min(best[name], median_ms(fn, (x, weights[name]), args.repeats))
            rows.append(dict(shape=f"[{n}, {d_in}] x [{d_in}, {d_out}]", ms=best))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(dict(environment=env, load_average_before=load_before,
                          load_average_after=os.getloadavg()), indent=1))
    print("\n" + _env.measured_with(env))
    print("\n| product | " + " | ".join(variants) + " | input- / output-major |")
    print("|---|" + "---:|" * (len(variants) + 1))
    for r in rows:
        ms = r["ms"]
        print(f"| {r['shape']} | " + " | ".join(f"{ms[k]:.3f}" for k in variants)
              + f" | {ms['int8 x @ W [in, out]'] / ms['int8 W @ x^T [out, in]']:.2f}x |")


if __name__ == "__main__":
    main()
