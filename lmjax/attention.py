"""Attention kernels, RoPE and the KV cache; the mixed-precision `matmul` that they and the
projections of model.py share.

Shape letters as in model.py: B batch, L tokens passed in, T length of the KV cache, H query
heads, G KV heads, K head size, C = B * G cache rows, R = H / G, Q = R * L queries per row,
J KV-head groups of the cache rows, E = G / J.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig
from lmjax.int8 import int8_dot, one_row_as_two

# A KV cache is a list (one entry per layer) of {'k': [C, T, K], 'v': [C, T, K]} with C = B * G
# rows, one per (sequence, KV head), ordered by KV-head group, then sequence, then head: with the
# G heads in J groups of E = G / J (`cache_groups`), row (j * B + b) * E + e holds KV head
# j * E + e of sequence b (J = 1: row b * G + g). J is the number of ways a tensor-parallel mesh
# splits the KV heads: device group j's K/V projections compute heads j * E .. j * E + E - 1,
# which are its rows j * B * E .. (j + 1) * B * E - 1, so rows split over the tensor axis, then
# the batch axes, stay where they are computed and read (batch-major rows split over the tensor
# axis would hand it sequences, not heads). Batch and KV heads share one axis because a batch
# of 1 would otherwise leave a size-1 axis that made XLA's CPU compiler copy the whole cache
# several times per decoding step (it still does with jax 0.10: a [B, G, T, K] cache decoded
# about 1.7x slower at B = 1); the length comes before the head size, as each step reads it.
# Every row writes a call's tokens at the same slots, cache_index .. cache_index + L - 1, so the
# write is one in-place `dynamic_update_slice` (per-row slots became a scatter that rewrote the
# whole cache every step). Rows of different lengths are left-padded: a token at slot s with
# position p sees the slots s - p .. s (its own row's tokens, none of the padding).
KVCache = list[dict[str, jax.Array]]

ATTENTION_BLOCK = 128  # query block of `causal_attention` on a CPU


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """RoPE's inverse frequencies theta^(-2i/K) for i < K/2, with `config.rope_scaling` applied.

    The scalings are Hugging Face's (`modeling_rope_utils.py`): 'linear' (position interpolation)
    divides every frequency by the factor; 'llama3' (LLaMA 3.1) divides the low frequencies
    (wavelength > original_max_len / low_freq_factor) by it, keeps the high ones (wavelength <
    original_max_len / high_freq_factor), and interpolates smoothly in between.
    """
    cfg = config
    half = cfg.head_size // 2
    inv_freq_K2 = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if cfg.rope_scaling == "linear":
        inv_freq_K2 = inv_freq_K2 / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        wavelen_K2 = 2 * jnp.pi / inv_freq_K2
        scaled_K2 = inv_freq_K2 / cfg.rope_scaling_factor
        smooth_K2 = ((cfg.rope_original_max_len / wavelen_K2 - cfg.rope_low_freq_factor)
                     / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        medium_K2 = (1 - smooth_K2) * scaled_K2 + smooth_K2 * inv_freq_K2
        inv_freq_K2 = jnp.where(
            wavelen_K2 > cfg.rope_original_max_len / cfg.rope_low_freq_factor, scaled_K2,
            jnp.where(wavelen_K2 < cfg.rope_original_max_len / cfg.rope_high_freq_factor,
                      inv_freq_K2, medium_K2))
    return inv_freq_K2


def apply_rope(x_BxLxNxK: jax.Array, positions_BxL: jax.Array, inv_freq_K2: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout as in LLaMA/HF."""
    angles_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2
    sin, cos = jnp.sin(angles_BxLxK2)[:, :, None, :], jnp.cos(angles_BxLxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxNxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxK.dtype)


def init_kv_cache(config: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: Any = None) -> KVCache:
    """An empty KV cache: per layer keys and values `[B * G, T, K]` (only the KV heads).

    `config.kv_cache_dtype='int8'`: int8 keys and values, plus float32 scales `k_scale`,
    `v_scale` `[B * G, T, 1]`, one per token and KV head (a trailing axis of 1, so every
    function over the cache's [C, T, K] axes serves them too).
    """
    shape = (batch_size * config.kv_heads, max_len or config.max_len, config.head_size)
    if config.kv_cache_dtype == "int8":
        scales = shape[:2] + (1,)
        return [{"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8),
                 "k_scale": jnp.zeros(scales, jnp.float32),
                 "v_scale": jnp.zeros(scales, jnp.float32)} for _ in range(config.num_layers)]
    dtype = dtype or config.dtype
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(config.num_layers)]


def write_slots(cache_CxTxK: jax.Array, new_BxLxGxK: jax.Array, cache_index,
                 groups: int) -> jax.Array:
    """Writes the new keys/values of every row at slots cache_index .. cache_index + L - 1
    (rows in `groups` KV-head groups, see KVCache)."""
    B, L, G, K = new_BxLxGxK.shape
    new_JxBxExLxK = new_BxLxGxK.reshape(B, L, groups, G // groups, K).transpose(2, 0, 3, 1, 4)
    new_CxLxK = new_JxBxExLxK.reshape(B * G, L, K).astype(cache_CxTxK.dtype)
    return jax.lax.dynamic_update_slice(cache_CxTxK, new_CxLxK, (0, cache_index, 0))


def matmul(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """`einsum(spec, a, b)` with both inputs cast to `dtype`, accumulated and returned in float32.

    Below float32 (mixed precision) the gradients are the two transposed einsums of the
    cotangent cast to `dtype`, also accumulated in float32 and returned in the dtypes that a and
    b came in (a float32 kernel gets a float32 gradient). So every matmul of the backward pass
    takes low-precision inputs too: plain autodiff would feed them a float32 cotangent, and on
    XLA's CPU compiler a dot with a low-precision result runs in float32. Every letter of `spec`
    must appear in two of its three terms (true of projections and attention).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype))
    return _low_precision_einsum(spec, jnp.dtype(dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec: str, dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    # A decode row is padded to two: XLA:CPU gives a one-row bf16 dot a float32 copy of the
    # weights (int8.one_row_as_two).
    return one_row_as_two(spec, a.astype(dtype), b.astype(dtype), functools.partial(
        jnp.einsum, spec, preferred_element_type=jnp.float32))


def _low_precision_einsum_fwd(spec, dtype, a, b):
    return _low_precision_einsum(spec, dtype, a, b), (a, b)


def _low_precision_einsum_bwd(spec, dtype, ab, cotangent):
    a, b = ab
    inputs, spec_out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    cotangent, a_low, b_low = cotangent.astype(dtype), a.astype(dtype), b.astype(dtype)
    grad_a = jnp.einsum(f"{spec_out},{spec_b}->{spec_a}", cotangent, b_low,
                        preferred_element_type=jnp.float32)
    grad_b = jnp.einsum(f"{spec_a},{spec_out}->{spec_b}", a_low, cotangent,
                        preferred_element_type=jnp.float32)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def _attend(q_XxQxK: jax.Array, k_XxSxK: jax.Array, v_XxSxK: jax.Array,
            mask_XxQxS: jax.Array, k_scale_Xx1xS: jax.Array | None = None,
            v_scale_Xx1xS: jax.Array | None = None) -> jax.Array:
    """Softmax attention of scaled queries over keys where `mask` (broadcast to [X, Q, S]) is
    True, X independent groups at once, in the queries' dtype. Scores and the softmax are f32;
    the softmax is normalised after the value matmul ([Q, K] divisions instead of [Q, S]).
    With int8 keys/values, their per-key scales multiply the scores and the softmax weights
    (`[X, Q, S]`), so the cache itself is never rescaled."""
    dtype = q_XxQxK.dtype
    if k_scale_Xx1xS is not None:  # int8 cache: integer dots (see int8_dot)
        scores_XxQxS = int8_dot("xqk,xsk->xqs", q_XxQxK, k_XxSxK) * k_scale_Xx1xS
    else:
        scores_XxQxS = matmul("xqk,xsk->xqs", q_XxQxK, k_XxSxK, dtype)
    scores_XxQxS = jnp.where(mask_XxQxS, scores_XxQxS, jnp.finfo(jnp.float32).min)
    # Subtracting the (constant) row max keeps exp finite; it needs no gradient.
    max_XxQx1 = jax.lax.stop_gradient(scores_XxQxS.max(-1, keepdims=True))
    weights_XxQxS = jnp.exp(scores_XxQxS - max_XxQx1)
    if v_scale_Xx1xS is not None:
        out_XxQxK = int8_dot("xqs,xsk->xqk", weights_XxQxS * v_scale_Xx1xS, v_XxSxK)
    else:
        out_XxQxK = matmul("xqs,xsk->xqk", weights_XxQxS, v_XxSxK, dtype)
    return (out_XxQxK / weights_XxQxS.sum(-1, keepdims=True)).astype(dtype)


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """`mask_BxLxL[b, q, s]`: key s is in query q's document (equal segment ids; see
    `Transformer`). Causality is applied separately."""
    return segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
    """Each token's position in its own document: 0 where the segment id changes, then 1, 2..
    (what packed rows need when the caller gives no positions)."""
    B, L = segment_ids_BxL.shape
    index_L = jnp.arange(L, dtype=jnp.int32)
    starts_BxL = jnp.concatenate([jnp.ones((B, 1), bool),
                                  segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
    first_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_L, 0), axis=1)
    return index_L - first_BxL


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                     segment_ids_BxL: jax.Array | None = None,
                     blocked: bool | None = None, causal: bool = True) -> jax.Array:
    """Causal softmax attention (training and full forward passes), grouped-query.

    segment_ids_BxL: with packed rows, a query attends only to the keys of its own segment
    (equal ids); None: the whole row is one sequence (no mask is built at all).
    blocked: None picks the blocked CPU kernel on a CPU and `jax.nn.dot_product_attention`
    elsewhere (it picks cuDNN's fused kernel on GPUs); True/False force one (tests).
    causal: False is bidirectional (encoders): every query sees every key of its segment (a
    padding mask is segment ids 1 for tokens, 0 for padding).

    On a CPU, queries go in blocks of ATTENTION_BLOCK and each block attends only to the keys
    up to its own end, skipping the masked upper triangle. Heads come first, with the R query
    heads of a KV head next to the block's tokens, so each block is one batched matmul of
    [block * R, K] queries against [S, K] keys per (sequence, KV head), and `_attend` normalises
    the softmax after the value matmul. Forward + backward is 1.8x (16 x 256 tokens, 6 heads)
    to 3.6x (2 x 1024 tokens, 12 heads) faster than `jax.nn.dot_product_attention`'s XLA path
    there.
    """
    if blocked is None:
        blocked = jax.default_backend() == "cpu"
    if not blocked:
        mask = None if segment_ids_BxL is None else segment_mask(segment_ids_BxL)[:, None]
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask,
                                            is_causal=causal)
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    R = H // G
    block = ATTENTION_BLOCK if L % ATTENTION_BLOCK == 0 else L
    q_CxLxRxK = (q_BxLxHxK * K ** -0.5).reshape(B, L, G, R, K).transpose(0, 2, 1, 3, 4).reshape(
        B * G, L, R, K)  # C = B * G (sequence, KV head) pairs
    k_CxLxK = k_BxLxGxK.transpose(0, 2, 1, 3).reshape(B * G, L, K)
    v_CxLxK = v_BxLxGxK.transpose(0, 2, 1, 3).reshape(B * G, L, K)
    if segment_ids_BxL is not None:
        segments_CxL = jnp.repeat(segment_ids_BxL, G, axis=0)  # row b * G + g is sequence b
    outs = []
    for start in range(0, L, block):  # the block's queries start .. end - 1, keys 0 .. end - 1
        end = start + block
        keys = end if causal else L  # bidirectional: every key
        q_CxQxK = q_CxLxRxK[:, start:end].reshape(B * G, block * R, K)  # Q = block * R
        query_pos_Q = start + jnp.arange(block * R) // R
        mask_QxS = query_pos_Q[:, None] >= jnp.arange(end)[None, :] if causal else True
        mask = mask_QxS
        if segment_ids_BxL is not None:  # query q * R + r is the block's token q
            query_seg_CxQ = jnp.repeat(segments_CxL[:, start:end], R, axis=1)
            mask = mask_QxS & (query_seg_CxQ[:, :, None] == segments_CxL[:, None, :keys])  # CxQxS
        outs.append(_attend(q_CxQxK, k_CxLxK[:, :keys], v_CxLxK[:, :keys], mask))
    out_BxGxLxRxK = jnp.concatenate(outs, axis=1).reshape(B, G, L, R, K)
    return out_BxGxLxRxK.transpose(0, 2, 1, 3, 4).reshape(B, L, H, K)


def cached_attention(q_BxLxHxK: jax.Array, cache: dict[str, jax.Array],
                      mask_BxLxT: jax.Array, groups: int) -> jax.Array:
    """Softmax attention of L new queries over the cache: the R query heads of KV head
    g = j * E + e (and the L tokens) become the Q = R * L queries of cache row (j * B + b) * E + e
    (`groups` = J, see KVCache). An int8 cache's scales [C, T, 1] scale the scores/weights."""
    k_CxTxK, v_CxTxK = cache["k"], cache["v"]
    scales = [None if name not in cache else cache[name].transpose(0, 2, 1)  # [C, 1, T]
              for name in ("k_scale", "v_scale")]
    B, L, H, K = q_BxLxHxK.shape
    C, T, _ = k_CxTxK.shape
    J, E, R = groups, C // (B * groups), H * B // C
    q_CxQxK = ((q_BxLxHxK * K ** -0.5).reshape(B, L, J, E, R, K).transpose(2, 0, 3, 4, 1, 5)
               .reshape(C, R * L, K))
    mask_CxQxT = jnp.broadcast_to(mask_BxLxT[None, :, None, None],
                                  (J, B, E, R, L, T)).reshape(C, R * L, T)
    out_CxQxK = _attend(q_CxQxK, k_CxTxK, v_CxTxK, mask_CxQxT, *scales)
    return out_CxQxK.reshape(J, B, E, R, L, K).transpose(1, 4, 0, 2, 3, 5).reshape(B, L, H, K)


# LoRA (Hu et al. 2021, lmjax/lora.py): the Projection names that each `lora_targets` entry
