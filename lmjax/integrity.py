"""Checksums of checkpoint contents: a 64-bit digest of every array's bits, computed where the
array lives, and SHA-256 of JSON items; plus the finite check that keeps NaN out of checkpoints.

    checksums, nonfinite = array_checksums({"params": params, "train_state": tree})
    verify_checksums("checkpoint step 7", record, {"params": restored_params})  # IntegrityError
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging


class IntegrityError(RuntimeError):
    """An array or JSON item does not match its recorded checksum."""



def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's bits as a flat uint32 vector (8-bit and 16-bit elements widened, 64-bit
    elements split in two)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size in (1, 2):
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., size // 4]
    return bits.reshape(-1)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32[2] of x's bits b_i: h_i = fmix32(b_i ^ i * 0x9E3779B1), digest (sum h_i,
    sum h_i * (2i + 1)) mod 2**32. Each h_i is a bijection of b_i, so a change to any one element
    always changes the first sum; the position in h_i makes moved values count too. Wrap-around
    addition is order-free: the same digest however the array is sharded or reduced."""
    bits_N = _bits_u32(x)
    index_N = jax.lax.iota(jnp.uint32, bits_N.shape[0])
    h_N = _fmix32(bits_N ^ (index_N * jnp.uint32(0x9E3779B1)))
    return jnp.stack([jnp.sum(h_N), jnp.sum(h_N * (index_N * jnp.uint32(2) + jnp.uint32(1)))])


def _leaf_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)


# One jitted program per array shape and dtype (params and Adam's moments share them: GPT-2's
# ~450 arrays compile ~10 programs), run where the array lives: no copy to the host. Its cost
# per GPT-2 124M save, next to SHA-256 of host copies: benchmarks/checkpoint_overhead.py.
_leaf_stats = jax.jit(lambda x: (_leaf_digest(x), _leaf_finite(x)))


def _by_name(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def array_checksums(items: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """({'params/decoder/...': 16 hex digits, ...}, [names of arrays holding a NaN or inf]) of
    `items` ({'params': tree, 'train_state': tree}), computed on the arrays' devices."""
    # One program at a time: on a multi-device CPU mesh, many collective programs in flight at
    # once deadlocked XLA's rendezvous (each waits for device threads another program holds).
    stats = {name: jax.device_get(_leaf_stats(x)) for name, x in _by_name(items).items()}
    checksums = {name: "".join(f"{int(d):08x}" for d in digest)
                 for name, (digest, _) in stats.items()}
    return checksums, [name for name, (_, finite) in stats.items() if not finite]


def json_checksum(content: Any) -> str:
    """SHA-256 of a JSON item's canonical text."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def verify_checksums(where: str, record: dict | None, arrays: dict[str, Any],
                     json_items: dict[str, Any] | None = None) -> None:
    """Raises CheckpointError naming the first array or JSON item of `where` whose checksum
    differs from `record` (the checkpoint's `checksums` item). No record (a checkpoint written
    before lmjax kept checksums): a warning, nothing checked."""
    if record is None:
        logging.warning("%s has no checksums (written by an older lmjax): not verified", where)
        return
    computed, _ = array_checksums(arrays)
    for name, digest in computed.items():
        if record["arrays"].get(name) != digest:
            raise IntegrityError(
                f"{where}: array {name} does not match its checksum (recorded "
                f"{record['arrays'].get(name)}, read {digest}): the files were changed or damaged")
    for name, content in (json_items or {}).items():
        if record["json"].get(name) != json_checksum(content):
            raise IntegrityError(f"{where}: JSON item {name!r} does not match its checksum")
