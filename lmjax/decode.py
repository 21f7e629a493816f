"""The machinery every decoder shares: prompts padded to buckets, the KV cache, prefill, one
decode step, and the while loop in phases of a growing cache.

Shape letters used in names (as in model.py):
  B batch (prompts), N beams per prompt, L padded prompt length (a bucket), T KV cache length,
  S max_new_tokens, V vocab_size, G kv heads, K head size, C = B * G cache rows, J KV-head groups
  of the rows, E = G / J heads per group, M cached sequences per prompt (beam search).

1. **Bucketing.** Prompts are left-padded to a bucket length L: the next power of two
   >= the longest prompt, at least 16 and at most `model.max_len`. One `jax.jit` compile serves
   every batch with the same (L, B, SamplingConfig, ModelConfig), so a new prompt length rarely
   means a new compile.
2. **Prefill.** One forward pass over the padded [B, L] prompts fills cache slots 0..L-1; row b's
   tokens sit at slots L - len_b .. L - 1 with positions 0 .. len_b - 1, and every row's first
   next-token logits are those at slot L - 1. Left padding puts every row's next token in the
   same slot, so each step writes the cache with one in-place `dynamic_update_slice`; the
   attention mask (a token at slot s with position p sees slots s - p .. s) hides the padding.
3. **Decode.** A `lax.while_loop` emits one token per step for all rows, feeding token s at slot
   L + s and position len_b + s, until every row has ended or `max_new_tokens` tokens.
4. **A growing cache.** Attention reads the whole cache every step, so a cache sized for the
   longest possible sequence would make early steps pay for the last ones. The cache therefore
   starts at `2 L` slots (at least 64) and doubles between phases of the decode loop (one
   `while_loop` per phase; a phase ends when the next token's position would not fit), up to
   T = min(L + S, max_len). Each step reads at most about twice the cache it needs; the price is
   one copy of the cache per phase and a longer compile (one loop body per phase).

**On a mesh** (inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, with parameters
sharded by the same rules), the KV cache gets the shardings of the rules' `cache_*` axes: its rows
(see attention.py: [B * G, T, K], in KV-head groups, then sequences) are split over the mesh axes of
`cache_heads` (tensor), then those of `cache_batch` (data, fsdp), so each device holds the KV heads
that its share of the K/V projections computes, of its share of the sequences: decoding moves no
cache between devices. Every cache passes through `shard_cache` (made by `new_cache`, grown by
`grow_cache`, reordered by `take_beams`, returned by each forward pass). Without a mesh nothing
changes: one KV-head group, no constraints.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from lmjax.config import ModelConfig
from lmjax.logits_process import SamplingConfig
from lmjax.attention import KVCache, init_kv_cache
from lmjax.model import Transformer

# Logical axes of the KV cache [C, T, K] (rules in config.DEFAULT_RULES): its rows are split over
# the mesh axes of the first two, KV-head groups then sequences (see attention.py's row order).
CACHE_AXES = ("cache_heads", "cache_batch", "cache_len", "head_dim")
MIN_BUCKET = 16  # shortest padded prompt length
MIN_CACHE = 64  # shortest cache of the first decode phase


# ----------------------------------------------------------------------------------- the cache


class CacheLayout(NamedTuple):
    """How the KV cache is split over the active mesh (`cache_layout`); a static argument of the
    jitted decoders, so that another mesh or rule table compiles anew. The default: no mesh."""

    groups: int = 1  # KV-head groups J of the rows (attention.py): the ways the mesh splits them
    kv_heads: int = 0  # G, to count a cache's sequences; 0: no mesh, nothing is constrained
    heads: tuple[str, ...] = ()  # mesh axes of the groups (cache_heads)
    batch: tuple[str, ...] = ()  # mesh axes of the sequences (cache_batch)
    batch_ways: int = 1  # devices along `batch`
    length: tuple[str, ...] = ()  # mesh axes of the slots (cache_len)
    head_dim: tuple[str, ...] = ()


def _mesh_axes(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def cache_layout(model_config: ModelConfig) -> CacheLayout:
    """The cache layout for the active mesh (`jax.set_mesh`) and logical-axis rules
    (`nn.logical_axis_rules`); without both, the default (one group, nothing constrained).

    The KV heads form as many groups as the mesh splits `cache_heads` into (when that divides
    num_kv_heads; otherwise one group, replicated over those axes).
    """
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return CacheLayout()
    heads, batch, length, head_dim = map(_mesh_axes, nn.logical_to_mesh_axes(CACHE_AXES, rules))

    def ways(axes):
        return math.prod(mesh.shape[axis] for axis in axes)

    if model_config.kv_heads % ways(heads):
        heads = ()
    return CacheLayout(ways(heads), model_config.kv_heads, heads, batch, ways(batch), length,
                       head_dim)


def shard_cache(cache: KVCache, layout: CacheLayout) -> KVCache:
    """The cache constrained to the layout's shardings: rows over the mesh axes of the KV-head
    groups, then of the sequences (those only when they divide the number of sequences).
    Without a mesh, the cache itself."""
    if not layout.kv_heads:
        return cache

    def constrain(x_CxTxK):
        sequences = x_CxTxK.shape[0] // layout.kv_heads
        rows = layout.heads + (layout.batch if sequences % layout.batch_ways == 0 else ())
        spec = PartitionSpec(rows or None, layout.length or None, layout.head_dim or None)
        return lax.with_sharding_constraint(x_CxTxK, spec)
    return jax.tree.map(constrain, cache)


def new_cache(model_config: ModelConfig, batch: int, cache_len: int,
              layout: CacheLayout = CacheLayout()) -> KVCache:
    """An empty KV cache of `cache_len` slots: the only place sampling creates one."""
    return shard_cache(init_kv_cache(model_config, batch, cache_len), layout)


def grow_cache(cache: KVCache, cache_len: int, layout: CacheLayout = CacheLayout()) -> KVCache:
    """The same cache with zero slots appended up to `cache_len` (every slot keeps its contents)."""
    def grow(x_CxTxK):
        return jnp.pad(x_CxTxK, ((0, 0), (0, cache_len - x_CxTxK.shape[1]), (0, 0)))
    return shard_cache(jax.tree.map(grow, cache), layout)


def take_beams(cache: KVCache, parent_BxN: jax.Array, model_config: ModelConfig,
               layout: CacheLayout = CacheLayout()) -> KVCache:
    """The cache of B * N sequences whose sequence b * N + n is the cache's sequence
    b * M + parent[b, n], M its sequences per prompt (1: each prompt copied to N beams; N: the
    beams follow their parents). Gathering within each prompt keeps it on its own devices."""
    B, N = parent_BxN.shape
    J = layout.groups
    E = model_config.kv_heads // J

    def take(x_CxTxK):
        _, T, K = x_CxTxK.shape
        x_JxBxMxExTxK = x_CxTxK.reshape(J, B, -1, E, T, K)
        index_1xBxNx1x1x1 = parent_BxN[None, :, :, None, None, None]
        return jnp.take_along_axis(x_JxBxMxExTxK, index_1xBxNx1x1x1, axis=2).reshape(-1, T, K)
    return shard_cache(jax.tree.map(take, cache), layout)


def bucket_length(prompt_len: int, max_len: int) -> int:
    """Padded prompt length: next power of two >= prompt_len, at least MIN_BUCKET, <= max_len."""
    return min(max(MIN_BUCKET, 1 << max(prompt_len - 1, 0).bit_length()), max_len)


def cache_phases(bucket: int, max_new_tokens: int, max_len: int) -> tuple[int, ...]:
    """Cache lengths of the decode phases: doubling from max(2 L, 64) to T = min(L + S, max_len).

    Phase i decodes the steps whose fed token fits in its cache: token s (fed at slot L + s)
    needs s <= cache_len - L - 1.
    """
    total = min(bucket + max_new_tokens, max_len)
    phases = [min(max(2 * bucket, MIN_CACHE), total)]
    while phases[-1] < total:
        phases.append(min(2 * phases[-1], total))
    return tuple(phases)


def _last_step_of_phase(cache_len: int, bucket: int, max_new_tokens: int) -> int:
    """Exclusive bound on the decode steps of a phase: step s feeds token s - 1 at slot
    bucket + s - 1, which must be < cache_len."""
    return min(cache_len - bucket + 1, max_new_tokens)


# ------------------------------------------------------------------------------------ prefill


def forward(params, model_config: ModelConfig, tokens_BxL: jax.Array, positions_BxL: jax.Array,
            cache: KVCache, cache_index, layout: CacheLayout) -> tuple[jax.Array, KVCache]:
    """The model on tokens that go into the cache at slots cache_index ..: (logits [B, L, V],
    cache)."""
    logits_BxLxV, cache = Transformer(model_config, cache_groups=layout.groups).apply(
        {"params": params}, tokens_BxL, positions_BxL, kv_cache=cache, cache_index=cache_index)
    return logits_BxLxV, shard_cache(cache, layout)


def prefill(params, model_config: ModelConfig, prompt_BxL: jax.Array, lengths_B: jax.Array,
            cache_len: int, layout: CacheLayout = CacheLayout(), every_slot: bool = False
            ) -> tuple[jax.Array, KVCache]:
    """One forward pass over the left-padded prompts: (logits at slot L - 1 [B, V], cache);
    `every_slot`: the logits of every slot [B, L, V] (the server's prompt logprobs)."""
    B, L = prompt_BxL.shape
    # Padding gets position 0 (its keys are masked; a negative position has no embedding).
    positions_BxL = jnp.maximum(jnp.arange(L, dtype=jnp.int32) - (L - lengths_B)[:, None], 0)
    logits_BxLxV, cache = forward(params, model_config, prompt_BxL, positions_BxL,
                                  new_cache(model_config, B, cache_len, layout), 0, layout)
    return (logits_BxLxV if every_slot else logits_BxLxV[:, -1]), cache


def forward_one(params, model_config: ModelConfig, tokens_B: jax.Array, positions_B: jax.Array,
                cache: KVCache, cache_index: jax.Array,
                layout: CacheLayout = CacheLayout()) -> tuple[jax.Array, KVCache]:
    """One decode step: every row's token goes in at slot `cache_index` and its own position;
    next-token logits [B, V]."""
    logits_Bx1xV, cache = forward(params, model_config, tokens_B[:, None], positions_B[:, None],
                                  cache, cache_index, layout)
    return logits_Bx1xV[:, 0], cache


def phased_loop(state: dict, body, cond, phases: tuple[int, ...], bucket: int, steps: int,
                layout: CacheLayout):
    """Runs `body` while `cond` holds, in phases of growing cache (see the module docstring)."""
    for i, cache_len in enumerate(phases):
        if i:
            state = dict(state, cache=grow_cache(state["cache"], cache_len, layout))
        stop = _last_step_of_phase(cache_len, bucket, steps) if i < len(phases) - 1 else steps
        state = lax.while_loop(lambda s, stop=stop: (s["step"] < stop) & cond(s), body, state)
    return state


# ------------------------------------------------------------------------------------ prompts


def prompt_rows(prompt_ids, prompt_lengths=None) -> list[list[int]]:
    """The prompts as lists of ids: from a list of lists, or from a right-padded int array
    [B, W] with `prompt_lengths` [B] (default: every row is W long)."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_ids)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"prompt_ids must be a [batch, length] array, got shape {array.shape}")
        lengths = (np.full(array.shape[0], array.shape[1]) if prompt_lengths is None
                   else np.asarray(prompt_lengths).reshape(-1))
        if lengths.shape != (array.shape[0],) or (lengths > array.shape[1]).any():
            raise ValueError(f"prompt_lengths={lengths.tolist()} must give one length <= "
                             f"{array.shape[1]} per prompt row")
        return [array[b, :n].tolist() for b, n in enumerate(lengths.tolist())]
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths is only for a padded prompt array")
    rows = [list(row) for row in prompt_ids]
    if not rows:
        raise ValueError("prompt_ids is empty: give at least one prompt")
    return rows


def prepare_prompts(prompt_ids, model_config: ModelConfig, sampling: SamplingConfig,
                    prompt_lengths=None, repeat: int = 1
                    ) -> tuple[np.ndarray, np.ndarray, SamplingConfig]:
    """Validates prompts, left-pads them to their bucket and fits the sampling config to them:
    (int32[B * repeat, L], int32[B * repeat] lengths, sampling.fitted(...)).

    `prompt_ids`: see `prompt_rows`; each prompt is repeated `repeat` times (rows b * repeat + r).
    The fitted config has max_new_tokens resolved (max_length, capped to model.max_len minus the
    longest prompt with a warning) and only the fields the jitted decoders read (see
    `SamplingConfig.fitted`). Raises ValueError, naming the problem, before any compile.
    """
    sampling.check_model(model_config)
    rows = [row for row in prompt_rows(prompt_ids, prompt_lengths) for _ in range(repeat)]
    V, max_len = model_config.vocab_size, model_config.max_len
    for b, row in enumerate(rows):
        b //= repeat
        if not row:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token "
                             "(e.g. a bos token)")
        if len(row) >= max_len:
            raise ValueError(f"prompt {b} has {len(row)} tokens: model.max_len={max_len} leaves "
                             "no room for a new token")
        if min(row) < 0 or max(row) >= V:
            raise ValueError(f"prompt {b} has token ids outside [0, vocab_size={V})")
    lengths = np.array([len(row) for row in rows], np.int32)
    sampling = sampling.fitted(int(lengths.max()), max_len)
    padded = np.zeros((len(rows), bucket_length(int(lengths.max()), max_len)), np.int32)
    for b, row in enumerate(rows):
        padded[b, padded.shape[1] - len(row):] = row
    return padded, lengths, sampling


def prompt_history(prompt_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """The left-padded prompts with -1 in the padding (what the logits processors read)."""
    L = prompt_BxL.shape[1]
    return jnp.where(jnp.arange(L) >= (L - lengths_B)[:, None], prompt_BxL, -1)
