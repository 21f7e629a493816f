"""Runs one sharding job in a fresh process (simulated CPU devices are fixed at JAX start-up).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py JOB_JSON

Prints one line `RESULT <json>`. Used by tests/test_sharding.py.
"""
import json
import sys

import jax
import numpy as np


def tiny_config(job):
    from lmjax.config import default_config
    config = default_config()
    config.data.source = "files"
    config.data.train_files = job["corpus"]
    config.tokenizer.kind = "byte"  # vocab 259: not divisible by the tensor axis -> replicated
    config.data.seq_len, config.data.batch_size = 32, 8
    config.model.update(num_layers=2, num_heads=8, num_kv_heads=job.get("kv_heads", 8),
                        embed_dim=64, mlp_dim=128, max_len=32, position="rope", norm="rmsnorm",
                        mlp="swiglu", bias=False, tie_embeddings=False)
    config.optim.warmup_steps = 2
    config.train.update(num_steps=job.get("num_steps", 10), log_every=1, eval_every=0,
                        eval_batches=2, checkpoint_every=job.get("checkpoint_every", 0),
                        keep_checkpoints=5, num_samples=0, progress_bar=False)
    for axis, size in job.get("mesh", {}).items():
        config.mesh[axis] = size
    return config


def train(job):
    """Trains on each mesh of job['meshes'] (default: the job's own) in this one process."""
    from lmjax import sharding, train as train_lib
    runs = []
    for i, mesh in enumerate(job.get("meshes", [job.get("mesh", {})])):
        config = tiny_config(dict(job, mesh=mesh))
        result = train_lib.train_and_evaluate(config, f"{job['workdir']}/{i}")
        shards = {path: [spec, list(shape), list(shard)]
                  for path, shape, spec, shard in sharding.describe(result["state"].params)}
        runs.append({"losses": [float(x) for x in result["train_loss"]], "shards": shards})
    return {"runs": runs, "process_count": jax.process_count(),
            "device_count": jax.device_count()}


def sample(job):
    """Greedy tokens of a model on one device and on a sharded mesh."""
    import flax.linen as nn
    from lmjax import model as model_lib, sample as sample_lib, sharding, train as train_lib
    config = tiny_config(job)
    mcfg = train_lib.model_config(config, vocab_size=259)
    params = model_lib.init_params(mcfg, jax.random.key(0))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3], [4, 4],
               [9, 9, 9], [100, 101], [42]]
    sampling = sample_lib.SamplingConfig(max_new_tokens=12, temperature=0.0)
    single = sample_lib.generate(jax.device_put(params, jax.devices()[0]), mcfg, prompts,
                                 sampling, jax.random.key(0))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules(config.mesh, mcfg, mesh.shape)
    specs = model_lib.logical_axes(mcfg)
    sharded_params = jax.device_put(params, sharding.logical_to_sharding(specs, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = sample_lib.generate(sharded_params, mcfg, prompts, sampling, jax.random.key(0))
    query = sharded_params["blocks_0"]["attn"]["query"]["kernel"]
    return {"single": np.asarray(single[0]).tolist(), "sharded": np.asarray(sharded[0]).tolist(),
            "query_spec": str(query.sharding.spec),
            "query_shard": list(query.sharding.shard_shape(query.shape))}


def main():
    job = json.loads(sys.argv[1])
    if "process_id" in job:  # several processes joined on 127.0.0.1
        jax.distributed.initialize(job["coordinator"], num_processes=job["num_processes"],
                                   process_id=job["process_id"])
    result = {"train": train, "sample": sample}[job["kind"]](job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
