"""Step time and memory per device of GPT-2 124M training under each device mesh.

  python benchmarks/sharding_layouts.py [--seq_len 128 --batch 8 --steps 2]

Runs on 8 simulated CPU devices (it sets XLA_FLAGS itself when no accelerator is present), so it
shows that the layouts work and how memory divides, not a speed benchmark: all 8 "devices" share
the same CPU cores. Memory per device is read off the compiled step (`memory_analysis`): the
arguments (parameters, optimizer state, batch) and XLA's temporaries.
Prints a JSON object per mesh and a Markdown table.
"""
import argparse
import json
import os
import time

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import functools

import flax.linen as nn
import jax
import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import run_config, sharding
from lmjax import steps as steps_lib
from lmjax.config import default_config, preset_fields

MESHES = {
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "data=2 x fsdp=4": dict(data=2, fsdp=4, tensor=1),
    "data=2 x fsdp=2 x tensor=2": dict(data=2, fsdp=2, tensor=2),
    "tensor=4 x data=2": dict(data=2, fsdp=1, tensor=4),  # 12 heads: tensor=8 does not divide
}


def measure(name: str, mesh_sizes: dict, seq_len: int, batch: int, steps: int) -> dict:
    config = default_config()
    config.model.update(preset_fields("gpt2_124m"))
    config.data.seq_len, config.data.batch_size = seq_len, batch
    config.mesh.update(mesh_sizes)
    mcfg = run_config.model_config(config, vocab_size=config.model.vocab_size)
    tx, _ = steps_lib.make_optimizer(config.optim, 100)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules(config.mesh, mcfg, mesh.shape)
    sharding.check_divisibility(mcfg, mesh.shape, batch, rules)
    with jax.set_mesh(mesh):
        state_sh = steps_lib.state_shardings(mcfg, tx, mesh, rules)
        state = jax.jit(functools.partial(steps_lib.create_train_state, mcfg, tx),
                        out_shardings=state_sh)(jax.random.key(0))
        batch_sh = sharding.batch_sharding(mesh)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, mcfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
        host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                      "mask": np.ones((batch, seq_len), np.float32)}
        with nn.logical_axis_rules(rules):
            step = jax.jit(functools.partial(steps_lib.train_step, config=mcfg, tx=tx),
                           in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                           donate_argnums=0)
            device_batch = sharding.put_batch(host_batch, batch_sh)
            start = time.perf_counter()
            compiled = step.lower(state, device_batch).compile()
            compile_s = time.perf_counter() - start
            memory = compiled.memory_analysis()
            state, metrics = compiled(state, device_batch)  # warm-up
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, device_batch)
            jax.block_until_ready(metrics)
            step_s = (time.perf_counter() - start) / steps
    query = state.params["blocks_0"]["attn"]["query"]["kernel"]
    mib = lambda n: round(n / 2 ** 20, 1)
    return {"mesh": name, "step_s": round(step_s, 2), "compile_s": round(compile_s, 1),
            "loss": round(float(metrics["loss"]), 4),
            "arguments_MiB_per_device": mib(memory.argument_size_in_bytes),
            "temporaries_MiB_per_device": mib(memory.temp_size_in_bytes),
            "query_kernel_shard": list(query.sharding.shard_shape(query.shape))}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    print(f"{jax.device_count()} devices ({jax.devices()[0].platform}); GPT-2 124M, f32, "
          f"context {args.seq_len}, global batch {args.batch}")
    env = _env.environment()
    print(json.dumps({"environment": env, "devices": jax.device_count(),
                      "platform": jax.devices()[0].platform, "seq_len": args.seq_len,
                      "batch": args.batch, "steps": args.steps}), flush=True)
    rows = []
    for name, sizes in MESHES.items():
        rows.append(measure(name, sizes, args.seq_len, args.batch, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    print(_env.measured_with(env))
    print()
    print("| mesh | step s | compile s | params+opt+batch MiB/device | temporaries MiB/device | "
          "query kernel shard | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['step_s']} | {r['compile_s']} | "
              f"{r['arguments_MiB_per_device']} | {r['temporaries_MiB_per_device']} | "
              f"{r['query_kernel_shard']} | {r['loss']} |")


if __name__ == "__main__":
    main()
