"""Device mesh and shardings: data, FSDP and tensor parallelism through JAX's own SPMD engine.

One table of rules maps the logical axis names that the model puts on every parameter and
activation (`embed`, `mlp`, `heads`, ...) to the mesh axes `data`, `fsdp` and `tensor`.
Parameters, optimizer state, batches and the KV cache all get `NamedSharding`s from it; the
train step and the sampler are `jax.jit` programs with those shardings and XLA inserts the
collectives. Nothing here runs a collective by hand.

  data    batch split, parameters replicated           (data parallelism)
  fsdp    batch split, parameters split along `embed`  (ZeRO-3 / fully sharded data parallelism)
  tensor  heads, KV heads, MLP and vocab split         (Megatron-style tensor parallelism)
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.config import DEFAULT_RULES, MESH_AXES, ModelConfig


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Sizes {data, fsdp, tensor}; one of them may be -1 = all remaining devices."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={sizes[0]}, "
                         f"fsdp={sizes[1]}, tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: the fixed axes ({known} devices) do not divide the "
                             f"{num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                         f"{math.prod(sizes)} devices, but there are {num_devices} devices")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes.

    With several slices or hosts (`mesh.dcn_data > 1`), the data axis is split across the slow
    data-centre network (DCN) and fsdp/tensor stay within a slice on the fast interconnect (ICI).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(mesh_shape(mesh_config, len(devices)).values())
    dcn = int(mesh_config.get("dcn_data", 1))
    if dcn > 1:
        from jax.experimental import mesh_utils
        if shape[0] % dcn:
            raise ValueError(f"mesh.dcn_data={dcn} must divide mesh.data={shape[0]}")
        ici = (shape[0] // dcn, shape[1], shape[2])
        device_array = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
        return Mesh(device_array, MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _axes_size(mesh_shape: Mapping[str, int], axes) -> int:
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh_shape[a] for a in axes)


def _parse_axes(value: str) -> Any:
    """'' -> None (replicated), 'fsdp' -> 'fsdp', 'data,fsdp' -> ('data', 'fsdp')."""
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh.rules: unknown mesh axes {unknown}; mesh axes are {MESH_AXES}")
    return None if not names else names[0] if len(names) == 1 else names


def rules(mesh_config: ml_collections.ConfigDict, model: ModelConfig | None = None,
          mesh_shape: Mapping[str, int] | None = None) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules from `mesh.rules`, checked against the model and the mesh.

    A vocabulary that the tensor axis does not divide (e.g. 65 characters) is replicated
    instead of split; every other shape must divide (see `check_divisibility`).
    """
    table = dict(mesh_config.get("rules", None) or DEFAULT_RULES)
    unknown = sorted(set(table) - set(DEFAULT_RULES))
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axes {unknown}; known: "
                         f"{list(DEFAULT_RULES)}")
    result = {name: _parse_axes(table.get(name, default)) for name, default in DEFAULT_RULES.items()}
    if model is not None and mesh_shape is not None:
        for name in ("vocab", "activation_vocab"):
            if model.vocab_size % _axes_size(mesh_shape, result[name]):
                result[name] = None
    return tuple(result.items())


def check_divisibility(model: ModelConfig, mesh_shape: Mapping[str, int], global_batch: int,
                       axis_rules=None) -> None:
    """Clear errors, before compiling, for shapes that the mesh cannot split evenly
    (`axis_rules`: as `rules` returns; None = the default rules)."""
    table = dict(axis_rules or {name: _parse_axes(axes) for name, axes in DEFAULT_RULES.items()})
    for logical, field, size in (("heads", "num_heads", model.num_heads),
                                 ("kv_heads", "num_kv_heads", model.kv_heads),
                                 ("mlp", "mlp_dim", model.mlp_dim),
                                 ("embed", "embed_dim", model.embed_dim)):
        ways = _axes_size(mesh_shape, table.get(logical))
        if size % ways:
            raise ValueError(f"model.{field}={size} is not divisible by the {ways} devices of "
                             f"mesh axes {table.get(logical)} (mesh {dict(mesh_shape)})")
    batch_ways = _axes_size(mesh_shape, table.get("activation_batch"))
    if global_batch % batch_ways:
        raise ValueError(f"data.batch_size={global_batch} is not divisible by the batch axes "
                         f"{table.get('activation_batch')} = {batch_ways} devices "
                         f"(mesh {dict(mesh_shape)})")
    if global_batch % jax.process_count():
        raise ValueError(f"data.batch_size={global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")


def logical_to_sharding(logical_specs: Any, mesh: Mesh, axis_rules) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches `[B, L]` are split along the batch over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
              batch_axis: int = 0) -> dict[str, jax.Array]:
    """A global batch as sharded arrays; each process contributes only its own rows.

    `batch` holds the *global* batch (it is a pure function of the step, so every process can
    compute it cheaply); process p keeps rows [p*B/P, (p+1)*B/P) and JAX assembles the global
    array without any process holding devices it does not own.
    """
    count, index = jax.process_count(), jax.process_index()

    def put(x: np.ndarray) -> jax.Array:
        rows = x.shape[batch_axis] // count
        mine = np.take(x, np.arange(index * rows, (index + 1) * rows), axis=batch_axis)
        return jax.make_array_from_process_local_data(sharding, mine, x.shape)

    return {name: put(x) for name, x in batch.items()}


def describe(tree: Any) -> list[tuple[str, tuple[int, ...], str, tuple[int, ...]]]:
    """(path, global shape, PartitionSpec, per-device shard shape) for every array in `tree`."""
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = getattr(x.sharding, "spec", P())
        shard = x.sharding.shard_shape(x.shape)
        rows.append((jax.tree_util.keystr(path), tuple(x.shape), str(spec), tuple(shard)))
    return rows


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins the processes of a multi-host run (`jax.distributed.initialize`).

    On a TPU pod slice, SLURM or Open MPI, JAX finds everything from the environment: call this
    with no arguments on every host. Elsewhere give the coordinator's `host:port`, the number of
    processes and this process's index.
    """
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
