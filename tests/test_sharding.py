"""Sharding on simulated CPU devices: every mesh trains and samples like one device, and
parameters and the KV cache are split.

Each job runs tests/sharding_worker.py in a fresh process, since the number of simulated devices
is fixed when JAX starts.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lmjax import model as model_lib, sample as sample_lib, sharding
from lmjax.config import DEFAULT_RULES, ModelConfig, preset

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "tensor8": {"data": 1, "fsdp": 1, "tensor": 8},
}


def run_worker(job: dict, devices: int = 8, timeout: int = 600) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, WORKER, json.dumps(job)], env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pigs_text):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(pigs_text)
    return str(path)


@pytest.fixture(scope="module")
def single_device(corpus, tmp_path_factory):
    result = run_worker({"kind": "train", "corpus": corpus,
                         "workdir": str(tmp_path_factory.mktemp("single"))}, devices=1)
    assert result["device_count"] == 1
    return result["runs"][0]["losses"]


def assert_same_losses(losses, reference):
    assert len(losses) == len(reference)
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=0)


def test_every_mesh_matches_one_device(corpus, single_device, tmp_path):
    result = run_worker({"kind": "train", "corpus": corpus, "workdir": str(tmp_path),
                         "meshes": list(MESHES.values())})
    assert result["device_count"] == 8
    runs = dict(zip(MESHES, result["runs"]))
    for name, run in runs.items():
        assert_same_losses(run["losses"], single_device)
    assert single_device[-1] < single_device[0] - 0.3  # it trains

    # The parameters really are split: specs and per-device shard shapes.
    query = "['blocks_0']['attn']['query']['kernel']"  # [embed 64, heads 8, head_dim 8]
    mlp_up = "['blocks_0']['mlp']['up']['kernel']"  # [embed 64, mlp 128]
    shard_shapes = {  # per-device shard of query, then of mlp_up
        "data8": ([64, 8, 8], [64, 128]),
        "data2_fsdp4": ([16, 8, 8], [16, 128]),
        "data2_fsdp2_tensor2": ([32, 4, 8], [32, 64]),
        "tensor8": ([64, 1, 8], [64, 16]),
    }
    for name, (query_shard, mlp_shard) in shard_shapes.items():
        shards = runs[name]["shards"]
        assert shards[query][0] == "P('fsdp', 'tensor', None)"
        assert shards[mlp_up][0] == "P('fsdp', 'tensor')"
        assert (shards[query][2], shards[mlp_up][2]) == (query_shard, mlp_shard), name
    # A 259-token vocabulary does not divide 8: the embedding is replicated over `tensor`.
    assert runs["tensor8"]["shards"]["['embed']['embedding']"][2] == [259, 64]


def test_grouped_query_attention_with_tensor_parallelism(corpus, tmp_path):
    job = {"kind": "train", "corpus": corpus, "kv_heads": 2, "num_steps": 5}
    one = run_worker(dict(job, workdir=str(tmp_path / "one")), devices=1)
    mesh = run_worker(dict(job, workdir=str(tmp_path / "mesh"),
                           meshes=[MESHES["data2_fsdp2_tensor2"]]))
    assert_same_losses(mesh["runs"][0]["losses"], one["runs"][0]["losses"])
    key = mesh["runs"][0]["shards"]["['blocks_0']['attn']['key']['kernel']"]
    assert key[0] == "P('fsdp', 'tensor', None)" and key[2] == [32, 1, 8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(corpus, tmp_path):
    """2 processes x 4 simulated devices, joined by jax.distributed, = 1 process x 8 devices."""
    mesh = MESHES["data2_fsdp4"]
    one = run_worker({"kind": "train", "corpus": corpus, "workdir": str(tmp_path / "one"),
                      "meshes": [mesh]})
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, WORKER, json.dumps({
            "kind": "train", "corpus": corpus, "workdir": str(tmp_path / "two"),
            "meshes": [mesh], "coordinator": coordinator, "num_processes": 2,
            "process_id": i})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-5000:]
    results = [json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])
               for out, _ in outputs]
    for result in results:
        assert result["process_count"] == 2 and result["device_count"] == 8
        assert_same_losses(result["runs"][0]["losses"], one["runs"][0]["losses"])
    # Logs and metrics are written once, by process 0.
    with open(tmp_path / "two" / "0" / "metrics.jsonl") as f:
        assert sum(1 for line in f if '"loss"' in line) == 10
    assert (tmp_path / "two" / "0" / "checkpoints" / "10").is_dir()


def test_checkpoint_moves_between_meshes(corpus, tmp_path):
    """Saved on data=2 x fsdp=4, resumed on 1 device and on tensor=8: the same losses."""
    job = {"kind": "train", "corpus": corpus, "checkpoint_every": 5}
    saved = run_worker(dict(job, workdir=str(tmp_path / "fsdp"),
                            meshes=[MESHES["data2_fsdp4"]]))["runs"][0]["losses"]
    for name, devices, mesh in (("one", 1, {}), ("tensor8", 8, MESHES["tensor8"])):
        workdir = tmp_path / name
        shutil.copytree(tmp_path / "fsdp", workdir)
        shutil.rmtree(workdir / "0" / "checkpoints" / "10")  # resume from step 5
        resumed = run_worker(dict(job, workdir=str(workdir), meshes=[mesh]), devices=devices)
        assert_same_losses(resumed["runs"][0]["losses"][5:], saved[5:])


@pytest.mark.parametrize("mesh", ["data2_fsdp2_tensor2", "tensor8"])
def test_sharded_sampling_matches_one_device_and_splits_the_cache(corpus, mesh):
    """On a data x fsdp x tensor mesh and a tensor mesh, greedy and beam-search tokens equal one
    device's, and the KV cache is split over all 8 devices: each holds the KV heads that its key
    projection computes, for its own sequences, and no cache array moves between devices.

    One layer of 16 heads and 8 KV heads of size 4; 8 prompts, 60 new tokens (the cache grows
    from 64 to 76 slots), 3 beams: the cache has 8 x 8 rows (24 x 8 in beam search).
    """
    result = run_worker({"kind": "sample", "corpus": corpus, "meshes": [MESHES[mesh]]})
    run = result["meshes"][0]
    greedy, beam = run["decoders"]
    assert [greedy["tokens"], beam["tokens"]] == result["single"]
    assert run["query_spec"] == "P('fsdp', 'tensor', None)"
    # After the prefill: 8 of the 64 rows per device, those that its projections computed.
    cache = run["cache"]
    assert cache["shard_shape"] == [8, 64, 4]
    for device in cache["devices"]:
        assert len(device["rows"]) == 8 and device["rows"] == device["projection"]
        assert device["max_diff"] < 1e-5
    # In both phases of the compiled decode loops: 1/8 of the rows per device, and no
    # collective moves a cache-shaped array.
    assert greedy["carried"] == [[8, 64], [8, 76]]
    assert beam["carried"] == [[24, 64], [24, 76]]
    assert greedy["moved"] == beam["moved"] == []


def test_quantized_sampling_on_a_mesh_matches_one_device(corpus):
    """int8 weights and an int8 KV cache on a data x fsdp x tensor mesh: the int8 kernels and
    their scales are split like the float kernel's axes, and greedy tokens equal one device's."""
    result = run_worker({"kind": "sample", "corpus": corpus, "quantize": True,
                         "meshes": [MESHES["data2_fsdp2_tensor2"]]})
    run = result["meshes"][0]
    assert run["decoders"][0]["tokens"] == result["single"][0]
    # the int8 query kernel is stored output-major, [heads, head_dim, embed]
    assert run["query_dtype"] == "int8" and run["query_spec"] == "P('tensor', None, 'fsdp')"
    assert run["query_scale_spec"] == "P('tensor', None)"  # [heads, head_dim], as the kernel's
    assert run["cache"]["shard_shape"] == [8, 64, 4]  # the int8 cache is split as the float one


def test_every_rule_names_an_axis_in_use():
    """No dead rules: every logical axis of the rules table names a parameter axis (GPT-2 and
    LLaMA layouts), an activation or a KV-cache axis."""
    activations = (model_lib._ACT_BLD, model_lib._ACT_BLF, model_lib._ACT_BLV)
    used = set(sample_lib.CACHE_AXES) | {name for names in activations for name in names}
    for config in (preset("nanogpt_baby"), preset("llama_tiny")):
        specs = jax.tree.leaves(model_lib.logical_axes(config),
                                is_leaf=lambda x: isinstance(x, PartitionSpec))
        used |= {name for spec in specs for name in spec if name}
    assert used == set(DEFAULT_RULES)


# ---------------------------------------------------------------- bad input, before any compile

def _mesh(**sizes):
    return ml_collections.ConfigDict(dict({"data": 1, "fsdp": 1, "tensor": 1}, **sizes))


def test_mesh_sizes_must_match_the_devices():
    assert sharding.mesh_shape(_mesh(data=-1, tensor=2), 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match=r"mesh data=2 x fsdp=2 x tensor=1 = 4 devices, but "
                                         r"there are 8 devices"):
        sharding.mesh_shape(_mesh(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match=r"do not divide the 8 devices"):
        sharding.mesh_shape(_mesh(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape(_mesh(data=-1, fsdp=-1), 8)


def test_shapes_the_mesh_cannot_split():
    model = ModelConfig(vocab_size=65, num_layers=1, num_heads=6, num_kv_heads=2, embed_dim=48,
                        mlp_dim=96, max_len=16)
    shape = {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match=r"model.num_heads=6 is not divisible by the 4 devices"):
        sharding.check_divisibility(model, shape, 8)
    shape = {"data": 1, "fsdp": 1, "tensor": 3}
    with pytest.raises(ValueError, match=r"model.num_kv_heads=2 is not divisible by the 3"):
        sharding.check_divisibility(model, shape, 8)
    with pytest.raises(ValueError, match=r"data.batch_size=6 is not divisible by the batch axes "
                                         r"\('data', 'fsdp'\) = 4 devices"):
        sharding.check_divisibility(model, {"data": 2, "fsdp": 2, "tensor": 1}, 6)
    with pytest.raises(ValueError, match=r"model.embed_dim=48 is not divisible by the 5"):
        sharding.check_divisibility(model, {"data": 1, "fsdp": 5, "tensor": 1}, 10)
    with pytest.raises(ValueError, match=r"mesh.rules: unknown mesh axes \['model'\]"):
        sharding.rules(ml_collections.ConfigDict({"rules": {"embed": "model"}}))
