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
    config.lora.rank = job.get("lora_rank", 0)  # tests/test_lora.py: adapters on every projection
    config.lora.targets = "query,key,value,out,gate,up,down"
    if job.get("encoder"):  # BERT-style masked LM, WordPiece vocabulary of 64
        config.tokenizer.kind, config.tokenizer.vocab_size = "wordpiece", 64
        config.model.update(architecture="encoder", norm_position="post", type_vocab_size=2,
                            position="learned", norm="layernorm", mlp="gelu_exact", bias=True,
                            tie_embeddings=True, vocab_size=64)
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
    """Greedy and beam-search tokens of one model on one device (`generate`) and on each mesh
    of job['meshes'] (the decoders `generate` runs, compiled for the mesh), with where each mesh
    keeps the KV cache."""
    import flax.linen as nn
    from lmjax import model as model_lib, run_config, sample as sample_lib, sharding
    config = tiny_config(job)
    # One grouped-query layer (16 heads, 8 KV heads), with room for a decode whose cache grows
    # (64 -> 76 slots).
    config.model.update(num_layers=1, num_heads=16, max_len=128)
    mcfg = run_config.model_config(config, vocab_size=259)
    params = model_lib.init_params(mcfg, jax.random.key(0))
    if job.get("quantize"):  # int8 weights and KV cache (lmjax.quantize), greedy only
        from lmjax import quantize
        params, mcfg = quantize.quantize(params, quantize.with_int8_kv_cache(mcfg))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3], [4, 4],
               [9, 9, 9], [100, 101], [42]]
    samplings = (sample_lib.SamplingConfig(max_new_tokens=60, temperature=0.0),
                 sample_lib.SamplingConfig(max_new_tokens=60, num_beams=3))[
        :1 if job.get("quantize") else 2]

    single_params = jax.device_put(params, jax.devices()[0])
    result = {"single": [np.asarray(sample_lib.generate(single_params, mcfg, prompts, sampling)
                                    .tokens).tolist() for sampling in samplings], "meshes": []}
    reference_CxTxK = np.asarray(prefill_cache(single_params, mcfg, prompts))  # rows b * G + g
    for mesh_sizes in job["meshes"]:
        config = tiny_config(dict(job, mesh=mesh_sizes))
        mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules(config.mesh, mcfg, mesh.shape)
        specs = model_lib.logical_axes(mcfg)
        sharded_params = jax.device_put(params, sharding.logical_to_sharding(specs, mesh, rules))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            run = {"cache": cache_placement(mesh, sharded_params, mcfg, prompts,
                                            reference_CxTxK.reshape(len(prompts), mcfg.kv_heads,
                                                                    *reference_CxTxK.shape[1:])),
                   "decoders": [decode(sharded_params, mcfg, prompts, sampling)
                                for sampling in samplings]}
        query = sharded_params["blocks_0"]["attn"]["query"]
        result["meshes"].append(dict(run, query_spec=str(query["kernel"].sharding.spec),
                                     query_dtype=str(query["kernel"].dtype), query_scale_spec=str(
                                         query["scale"].sharding.spec) if "scale" in query else None))
    return result


def _decoder_args(mcfg, prompts, sampling):
    """The arguments `generate` passes its jitted decoder (in the active mesh)."""
    from lmjax import sample as sample_lib
    prompt_BxL, lengths_B, sampling = sample_lib.prepare_prompts(prompts, mcfg, sampling)
    return (prompt_BxL, lengths_B), dict(
        model_config=mcfg, sampling=sampling, layout=sample_lib.cache_layout(mcfg),
        phases=sample_lib.cache_phases(prompt_BxL.shape[1], sampling.max_new_tokens, mcfg.max_len))


def prefill_cache(params, mcfg, prompts):
    """Layer 0's key cache [C, T, K] after the prefill, as `generate` makes it."""
    from lmjax import sample as sample_lib
    (prompt_BxL, lengths_B), kw = _decoder_args(mcfg, prompts, sample_lib.SamplingConfig(60))
    prefill = jax.jit(sample_lib._prefill, static_argnums=(1, 4, 5))
    _, cache = prefill(params, mcfg, prompt_BxL, lengths_B, kw["phases"][0], kw["layout"])
    return cache[0]["k"]


def cache_placement(mesh, params, mcfg, prompts, reference_BxGxTxK):
    """Where the mesh keeps layer 0's key cache after the prefill: its shard shape, and per
    device the (sequence, KV head) pairs of its rows, those that its key projection computes
    (the heads of its kernel shard for the sequences of its batch shard), and the largest
    difference of its rows from the one-device cache's."""
    from lmjax import sample as sample_lib
    layout = sample_lib.cache_layout(mcfg)
    cache_CxTxK = prefill_cache(params, mcfg, prompts)
    kernel = params["blocks_0"]["attn"]["key"]["kernel"]  # [embed, kv_heads, head_dim]
    kernel_heads = {device: range(mcfg.kv_heads)[index[1]]
                    for device, index in kernel.sharding.devices_indices_map(kernel.shape).items()}
    B, G, J = len(prompts), mcfg.kv_heads, layout.groups
    E = G // J
    devices = []
    for shard in cache_CxTxK.addressable_shards:
        # Row (j * B + b) * E + e holds KV head j * E + e of sequence b (model.py).
        rows = [(r // E % B, r // (B * E) * E + r % E)
                for r in range(cache_CxTxK.shape[0])[shard.index[0]]]
        coords = dict(zip(mesh.axis_names, np.argwhere(mesh.devices == shard.device)[0]))
        batch_shard = np.ravel_multi_index([coords[a] for a in layout.batch],
                                           [mesh.shape[a] for a in layout.batch])
        per_shard = B // layout.batch_ways
        sequences = range(batch_shard * per_shard, (batch_shard + 1) * per_shard)
        reference = np.stack([reference_BxGxTxK[b, g] for b, g in rows])
        devices.append({
            "rows": sorted([b, g] for b, g in rows),
            "projection": sorted([b, g] for b in sequences for g in kernel_heads[shard.device]),
            "max_diff": float(np.abs(np.asarray(shard.data) - reference).max())})
    return {"shard_shape": list(cache_CxTxK.sharding.shard_shape(cache_CxTxK.shape)),
            "devices": devices}


def decode(params, mcfg, prompts, sampling):
    """The tokens of the decoder that `generate` runs (compiled in the active mesh), the
    per-device shapes [rows, T] of the cache arrays [rows, T, K] that its loops carry, and those
    of its collectives' results that are cache-shaped (any rows, a cache length, K)."""
    import re
    from lmjax import sample as sample_lib
    args, kw = _decoder_args(mcfg, prompts, sampling)
    if sampling.num_beams > 1:
        compiled = sample_lib._beam_jit.lower(params, *args, **kw).compile()
        tokens = compiled(params, *args)[0].tokens[:, 0]  # the best beam, as generate returns
    else:
        args += (jax.random.key(0),)
        compiled = sample_lib._sample_jit.lower(params, *args, **kw).compile()
        tokens = compiled(params, *args)[0]
    hlo = compiled.as_text()
    cache = rf"f32\[(\d+),({'|'.join(map(str, kw['phases']))}),{mcfg.head_size}\]"
    carried = {shape for line in hlo.splitlines() if ") while(" in line
               for shape in re.findall(cache, line.split(" while(")[0])}
    collectives = "all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter"
    moved = re.findall(rf"= ({cache})\S* (?:{collectives})\(", hlo)
    return {"tokens": np.asarray(tokens).tolist(),
            "carried": sorted([int(rows), int(length)] for rows, length in carried),
            "moved": [shape for shape, *_ in moved]}


def main():
    job = json.loads(sys.argv[1])
    if "process_id" in job:  # several processes joined on 127.0.0.1
        jax.distributed.initialize(job["coordinator"], num_processes=job["num_processes"],
                                   process_id=job["process_id"])
    result = {"train": train, "sample": sample}[job["kind"]](job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
