"""A decoder-only Transformer (GPT-2 and LLaMA style) in flax.linen.

Shape letters used in names:
  B batch, L length of the tokens passed in, T length of the KV cache (max_len),
  D embed_dim, H num_heads, G num_kv_heads, K head size, F mlp_dim, V vocab_size,
  C = B * G rows of a KV cache, R = H / G query heads per KV head, Q = R * L queries per row,
  J KV-head groups of the cache rows, E = G / J KV heads per group.

`Transformer.apply(params, tokens_BxL)` returns `logits_BxLxV`. With a `kv_cache` it also returns
the updated cache: the same attention code serves training (no cache) and sampling.
With `config.quantization == 'int8'` the projections and the embedding are lmjax/int8.py's.
Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`) that `sharding.py` maps to mesh axes; activations carry `activation_*` names.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lmjax.config import ModelConfig
from lmjax.int8 import Int8Embed, group_shape, int8_dot, int8_matmul, quantize_int8

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

# Logical names of activations (sharding.py maps them to mesh axes: batch over data and fsdp).
_ACT_BLD = ("activation_batch", "activation_length", "activation_embed")
_ACT_BLF = ("activation_batch", "activation_length", "activation_mlp")
_ACT_BLV = ("activation_batch", "activation_length", "activation_vocab")


def _dense_init(config: ModelConfig, scale: float = 1.0):
    return nn.initializers.normal(stddev=config.init_std * scale)


def _partitioned(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


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


def _write_slots(cache_CxTxK: jax.Array, new_BxLxGxK: jax.Array, cache_index,
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
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


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


def _cached_attention(q_BxLxHxK: jax.Array, cache: dict[str, jax.Array],
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
# means (GPT-2's MLP is fc/proj, LLaMA's gate/up/proj), and the names of the adapter leaves.
LORA_TARGETS = {"query": "query", "key": "key", "value": "value", "out": "out", "fc": "up",
                "up": "up", "gate": "gate", "proj": "down"}
LORA_PARAMS = ("lora_a", "lora_b")


class Projection(nn.Module):
    """`x @ kernel + bias` contracting x's last `len(in_shape)` axes, with a kernel of shape
    in_shape + out_shape kept unflattened, so every axis carries its logical name. Computed in
    `config.dtype` with float32 accumulation (`matmul`); with `config.quantization == 'int8'` an
    int8 kernel and a scale per output channel (`int8.int8_matmul`, whose gradient reaches x:
    adapters train on an int8 base).

    With `config.lora_rank` r > 0 and this projection's name in `config.lora_targets`, a LoRA
    adapter adds `lora_scale * dropout(x) @ lora_a @ lora_b` (lora_a [in.., r] uniform in
    +-1/sqrt(fan_in) and lora_b [r, out..] zero, as PEFT initialises them: step 0 is the base);
    its dropout is on when the apply has a 'dropout' rng (training)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str, ...]  # logical names of in_shape + out_shape
    use_bias: bool
    config: ModelConfig
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        # einsum letters: a.. x's leading axes, d.. the contracted ones, h.. the outputs.
        lead, ins = "abc"[:x.ndim - len(self.in_shape)], "defg"[:len(self.in_shape)]
        outs = "hijk"[:len(self.out_shape)]
        spec = f"{lead}{ins},{ins}{outs}->{lead}{outs}"
        if cfg.quantization == "int8":  # int8 kernel, a float32 scale per output channel
            kernel = self.param("kernel", _partitioned(nn.initializers.zeros, self.names),
                                self.in_shape + self.out_shape, jnp.int8)
            g, n_in = cfg.quant_group_size, len(self.in_shape)  # g: per block of inputs too
            scale = self.param("scale", _partitioned(nn.initializers.ones,
                                                     self.names if g else self.names[n_in:]),
                               group_shape(self.in_shape + self.out_shape, n_in - 1, g) if g
                               else self.out_shape, jnp.float32)
            y = int8_matmul(spec, x, kernel, scale, group_size=g)
        else:
            kernel = self.param("kernel", _partitioned(_dense_init(cfg, self.init_scale),
                                                       self.names),
                                self.in_shape + self.out_shape, cfg.param_dtype)
            y = matmul(spec, x, kernel, cfg.dtype)
        if self.use_bias:
            bias = self.param("bias", _partitioned(nn.initializers.zeros,
                                                   self.names[len(self.in_shape):]),
                              self.out_shape, cfg.param_dtype)
            y = y + bias
        if cfg.lora_rank and LORA_TARGETS.get(self.name) in cfg.lora_targets.split(","):
            n_in, r = len(self.in_shape), cfg.lora_rank  # the rank axis is replicated (None)
            a = self.param("lora_a", _partitioned(nn.initializers.variance_scaling(
                1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1),
                self.names[:n_in] + (None,)), self.in_shape + (r,), cfg.param_dtype)
            b = self.param("lora_b", _partitioned(nn.initializers.zeros,
                                                  (None,) + self.names[n_in:]),
                           (r,) + self.out_shape, cfg.param_dtype)
            if cfg.lora_dropout and self.has_rng("dropout"):
                x = nn.Dropout(cfg.lora_dropout, deterministic=False)(x)
            xa = matmul(f"{lead}{ins},{ins}r->{lead}r", x, a, cfg.dtype)
            y = y + cfg.lora_scale * matmul(f"{lead}r,r{outs}->{lead}{outs}", xa, b, cfg.dtype)
        return y.astype(cfg.dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, RoPE and an optional KV cache
    (bidirectional, without a cache, for `config.architecture == 'encoder'`)."""

    config: ModelConfig
    cache_groups: int = 1  # KV-head groups of the cache rows (see KVCache)

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, kv_cache: dict[str, jax.Array] | None = None,
                 cache_index=0, segment_ids_BxL: jax.Array | None = None):
        cfg = self.config
        H, G, K = cfg.num_heads, cfg.kv_heads, cfg.head_size

        def project(name, heads, head_axis):
            return Projection((cfg.embed_dim,), (heads, K), ("embed", head_axis, "head_dim"),
                              cfg.bias or cfg.qkv_bias, cfg, name=name)(x_BxLxD)

        q_BxLxHxK = project("query", H, "heads")
        k_BxLxGxK = project("key", G, "kv_heads")
        v_BxLxGxK = project("value", G, "kv_heads")
        if cfg.position == "rope":
            inv_freq_K2 = rope_inv_freq(cfg)
            q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, inv_freq_K2)
            k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, inv_freq_K2)

        if kv_cache is None:
            out_BxLxHxK = causal_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
                                           causal=cfg.architecture == "decoder")
        else:
            # Cached: write this call's keys/values at cache_index, then each query (slot s,
            # position p) attends to its row's slots s - p .. s.
            new = {"k": k_BxLxGxK, "v": v_BxLxGxK}
            if "k_scale" in kv_cache:  # int8 cache: a scale per token and KV head
                for name in ("k", "v"):
                    new[name], new[f"{name}_scale"] = quantize_int8(new[name], -1)
            kv_cache = {name: _write_slots(kv_cache[name], new[name], cache_index,
                                           self.cache_groups) for name in kv_cache}
            slots_T = jnp.arange(kv_cache["k"].shape[1])
            query_slots_L = cache_index + jnp.arange(x_BxLxD.shape[1])
            first_BxL = query_slots_L[None, :] - positions_BxL
            mask_BxLxT = ((slots_T >= first_BxL[:, :, None])
                          & (slots_T <= query_slots_L[None, :, None]))
            out_BxLxHxK = _cached_attention(q_BxLxHxK, kv_cache, mask_BxLxT, self.cache_groups)

        # Residual projections are scaled down with depth (GPT-2, nanoGPT).
        out_BxLxD = Projection((H, K), (cfg.embed_dim,), ("heads", "head_dim", "embed"),
                               cfg.bias or cfg.out_bias, cfg,
                               init_scale=(2 * cfg.num_layers) ** -0.5, name="out")(out_BxLxHxK)
        return out_BxLxD, kv_cache


class Mlp(nn.Module):
    """GELU MLP (GPT-2: tanh approximation; nanoGPT: exact) or SwiGLU (LLaMA)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.config

        D, F = cfg.embed_dim, cfg.mlp_dim
        up = functools.partial(Projection, (D,), (F,), ("embed", "mlp"), cfg.bias, cfg)
        if cfg.mlp == "swiglu":
            h_BxLxF = nn.silu(up(name="gate")(x_BxLxD)) * up(name="up")(x_BxLxD)
        else:
            h_BxLxF = nn.gelu(up(name="fc")(x_BxLxD), approximate=cfg.mlp == "gelu")
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, _ACT_BLF)
        return Projection((F,), (D,), ("mlp", "embed"), cfg.bias, cfg,
                          init_scale=(2 * cfg.num_layers) ** -0.5, name="proj")(h_BxLxF)


def _norm(config: ModelConfig, name: str) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.dtype,
                          param_dtype=config.param_dtype,
                          scale_init=_partitioned(nn.initializers.ones, ("norm",)), name=name)
    return nn.LayerNorm(epsilon=config.norm_eps, use_bias=config.bias, dtype=config.dtype,
                        param_dtype=config.param_dtype,
                        scale_init=_partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=_partitioned(nn.initializers.zeros, ("norm",)), name=name)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with
    `config.norm_position == 'post'` (BERT): norm(x + attn(x)), then norm(x + mlp(x))."""

    config: ModelConfig
    deterministic: bool = True
    cache_groups: int = 1

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, kv_cache=None, cache_index=0,
                 segment_ids_BxL=None):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        if cfg.norm_position == "post":
            h_BxLxD, kv_cache = Attention(cfg, self.cache_groups, name="attn")(
                x_BxLxD, positions_BxL, kv_cache, cache_index, segment_ids_BxL)
            x_BxLxD = _norm(cfg, "attn_norm")(x_BxLxD + dropout(h_BxLxD))
            x_BxLxD = _norm(cfg, "mlp_norm")(x_BxLxD + dropout(Mlp(cfg, name="mlp")(x_BxLxD)))
            return nn.with_logical_constraint(x_BxLxD, _ACT_BLD), kv_cache
        h_BxLxD, kv_cache = Attention(cfg, self.cache_groups, name="attn")(
            _norm(cfg, "attn_norm")(x_BxLxD), positions_BxL, kv_cache, cache_index,
            segment_ids_BxL)
        x_BxLxD = x_BxLxD + dropout(h_BxLxD)
        x_BxLxD = x_BxLxD + dropout(Mlp(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x_BxLxD)))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACT_BLD)
        return x_BxLxD, kv_cache


class Transformer(nn.Module):
    """Token ids in, next-token logits out: embed -> blocks -> norm -> logits.

    `cache_groups`: the KV-head groups J of a KV cache's rows (see KVCache; sample.py picks the
    number of ways the mesh splits the KV heads); it must divide num_kv_heads.
    """

    config: ModelConfig
    cache_groups: int = 1

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 kv_cache: KVCache | None = None, cache_index: int | jax.Array = 0,
                 deterministic: bool = True, segment_ids_BxL: jax.Array | None = None,
                 attention_mask: jax.Array | None = None):
        """Returns `logits_BxLxV` (f32), or `(logits_BxLxV, kv_cache)` when a cache is passed.

        positions_BxL: position of each token in its own sequence (default 0..L-1; with
          segment ids, the position in its own segment, `positions_from_segments`).
        segment_ids_BxL: packed rows (int, no cache): a token attends only to the earlier
          tokens of its row with the same id, so each segment (document) is computed exactly as
          if it were alone in the row (at the positions given). Real documents get ids >= 1 and
          padding 0 by convention: padding then attends only to padding, and no real token
          ever sees it (padding's own outputs are meaningless; mask them out of the loss).
          Neighbouring documents must have different ids (a row numbers them 1, 2, ...).
          None: the whole row is one sequence, and no mask is built (the same program as
          without the argument).
        cache_index: with a cache, every row's tokens are written at slots cache_index ..
          cache_index + L - 1, and a token at slot s with position p attends to slots s - p .. s
          (so rows of different lengths are left-padded; see the KVCache note above).
        deterministic: False turns dropout on (needs `rngs={'dropout': key}`).
        attention_mask: [B, L], Hugging Face's: 1 for tokens, 0 for padding (left, right or
          both; no cache). The tokens of a row are one sequence (segment id 1, padding 0) at
          positions cumsum(mask) - 1 unless positions are given: the logits at the tokens are
          Hugging Face's with the same mask and position_ids (those at padding are meaningless).
        """
        cfg = self.config
        B, L = tokens_BxL.shape
        # lmjax attends to every token: Mistral's sliding window computes the same only while a
        # sequence (or the cache holding it) fits in the window.
        span = L if kv_cache is None else kv_cache[0]["k"].shape[1]
        if cfg.sliding_window and span > cfg.sliding_window:
            raise ValueError(f"{span} tokens exceed model.sliding_window={cfg.sliding_window}: "
                             "lmjax has no sliding-window attention (only full attention, the "
                             "same up to the window)")
        if attention_mask is not None:
            if segment_ids_BxL is not None or kv_cache is not None:
                raise ValueError("attention_mask is for full forward passes without "
                                 "segment_ids_BxL or a kv_cache")
            segment_ids_BxL = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
            if positions_BxL is None:
                positions_BxL = jnp.maximum(jnp.cumsum(segment_ids_BxL, axis=1) - 1, 0)
        if segment_ids_BxL is not None and kv_cache is not None:
            raise ValueError("segment_ids_BxL is for full forward passes, not with a kv_cache "
                             "(left-pad the rows and give positions instead)")
        if positions_BxL is None and segment_ids_BxL is not None:
            positions_BxL = positions_from_segments(segment_ids_BxL)
        elif positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

        if cfg.quantization == "int8":
            embed = Int8Embed(cfg, name="embed")
        else:
            embed = nn.Embed(
                cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                embedding_init=_partitioned(_dense_init(cfg), ("vocab", "embed")), name="embed")
        x_BxLxD = embed(tokens_BxL)
        if cfg.position == "learned":
            pos_embed = self.param(
                "pos_embed", _partitioned(_dense_init(cfg), ("length", "embed")),
                (cfg.max_len, cfg.embed_dim), cfg.param_dtype)
            x_BxLxD = x_BxLxD + jnp.take(pos_embed, positions_BxL, axis=0).astype(cfg.dtype)
        x_BxLxD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, _ACT_BLD)

        block_cls = Block
        if cfg.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if cfg.remat == "dots" else None)
            block_cls = nn.remat(Block, policy=policy)
        new_cache = []
        for i in range(cfg.num_layers):
            x_BxLxD, layer_cache = block_cls(cfg, deterministic, self.cache_groups,
                                             name=f"blocks_{i}")(
                x_BxLxD, positions_BxL, None if kv_cache is None else kv_cache[i], cache_index,
                segment_ids_BxL)
            new_cache.append(layer_cache)
        x_BxLxD = _norm(cfg, "final_norm")(x_BxLxD)

        if cfg.tie_embeddings and cfg.quantization == "int8":
            logits_BxLxV = embed.attend(x_BxLxD)
        elif cfg.tie_embeddings and kv_cache is not None and L == 1:
            # A decode step of a few rows (beams, a small batch): XLA's CPU dot for x @ E.T
            # streams E [V, D] slowly once there are 2+ rows, while E @ x.T [V, B] runs as a
            # matrix-vector product; the barrier keeps XLA from folding the transpose back.
            # Measured (GPT-2 124M head, 1 thread): 4 rows 42.6 -> 17.9 ms, 8 rows 48.1 -> 27.0
            # ms, 1 row 10.6 ms either way; the head was ~30% of a 4-beam step.
            logits_VxBxL = lax.optimization_barrier(
                matmul("vd,bld->vbl", embed.embedding, x_BxLxD, cfg.dtype))
            logits_BxLxV = jnp.moveaxis(logits_VxBxL, 0, -1)
        elif cfg.tie_embeddings:
            logits_BxLxV = matmul("bld,vd->blv", x_BxLxD, embed.embedding, cfg.dtype)
        else:
            logits_BxLxV = Projection((cfg.embed_dim,), (cfg.vocab_size,), ("embed", "vocab"),
                                      False, cfg, name="lm_head")(x_BxLxD)
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32), _ACT_BLV)
        return logits_BxLxV if kv_cache is None else (logits_BxLxV, new_cache)


def init_boxed_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters, each wrapped with its logical axis names (`nn.LogicallyPartitioned`)."""
    tokens = jnp.zeros((1, min(8, config.max_len)), jnp.int32)
    return Transformer(config).init(rng, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters as a plain pytree (logical-axis boxes removed)."""
    return nn.unbox(init_boxed_params(config, rng))


def _abstract_boxed_params(config: ModelConfig) -> dict:
    return jax.eval_shape(functools.partial(init_boxed_params, config), jax.random.key(0))


def logical_axes(config: ModelConfig) -> dict:
    """The pytree of logical axis names of every parameter (for sharding), without any compute."""
    return nn.get_partition_spec(_abstract_boxed_params(config))


def split_adapters(params: dict) -> tuple[dict, dict]:
    """(base, adapters) of a parameter tree: the LoRA leaves (`LORA_PARAMS`) and the rest, each
    as a nested dict of the same paths (boxed or plain leaves alike)."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub_base, sub_adapters = split_adapters(value)
            if sub_base:
                base[key] = sub_base
            if sub_adapters:
                adapters[key] = sub_adapters
        else:
            (adapters if key in LORA_PARAMS else base)[key] = value
    return base, adapters


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def num_params(config: ModelConfig) -> int:
    """Parameter count of a config, computed from shapes only (no memory)."""
    return count_params(nn.unbox(_abstract_boxed_params(config)))


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B): 6N + 12·layers·seq·width for training.

    N counts the matmul parameters: every weight matrix including the output projection
    (counted once even when tied), excluding the embedding lookups. A forward pass is a third.
    """
    D, F, K = config.embed_dim, config.mlp_dim, config.head_size
    attn = D * K * (config.num_heads * 2 + config.kv_heads * 2)  # q, out, k, v
    mlp = D * F * (3 if config.mlp == "swiglu" else 2)
    matmul_params = config.num_layers * (attn + mlp) + D * config.vocab_size
    attention = 4 * config.num_layers * seq_len * config.num_heads * K  # QK^T and AV, forward
    forward = 2 * matmul_params + attention
    return 3 * forward if training else forward
