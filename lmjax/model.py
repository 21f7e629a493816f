"""A decoder-only Transformer (GPT-2 and LLaMA style) in flax.linen.

Shape letters used in names:
  B batch, L length of the tokens passed in, T length of the KV cache (max_len),
  D embed_dim, H num_heads, G num_kv_heads, K head size, F mlp_dim, V vocab_size,
  C = B * G rows of a KV cache, R = H / G query heads per KV head, Q = R * L queries per row,
  J KV-head groups of the cache rows, E = G / J KV heads per group.

`Transformer.apply(params, tokens_BxL)` returns `logits_BxLxV`. With a `kv_cache` it also returns
the updated cache: the same attention code (attention.py) serves training (no cache) and sampling.
With `config.quantization == 'int8'` the projections and the embedding are lmjax/int8.py's.
Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`) that `sharding.py` maps to mesh axes; activations carry `activation_*` names.
"""
from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmjax.attention import (KVCache, apply_rope, cached_attention, causal_attention, matmul,
                             positions_from_segments, rope_inv_freq, write_slots)
from lmjax.config import ModelConfig
from lmjax.int8 import Int8Embed, group_shape, int8_matmul, quantize_int8

# Logical names of activations (sharding.py maps them to mesh axes: batch over data and fsdp).
_ACT_BLD = ("activation_batch", "activation_length", "activation_embed")
_ACT_BLF = ("activation_batch", "activation_length", "activation_mlp")
_ACT_BLV = ("activation_batch", "activation_length", "activation_vocab")


def _dense_init(config: ModelConfig, scale: float = 1.0):
    return nn.initializers.normal(stddev=config.init_std * scale)


def _partitioned(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)

# means (GPT-2's MLP is fc/proj, LLaMA's gate/up/proj), and the names of the adapter leaves.
LORA_TARGETS = {"query": "query", "key": "key", "value": "value", "out": "out", "fc": "up",
                "up": "up", "gate": "gate", "proj": "down"}
LORA_PARAMS = ("lora_a", "lora_b")


class Projection(nn.Module):
    """`x @ kernel + bias` contracting x's last `len(in_shape)` axes, with a kernel of shape
    in_shape + out_shape kept unflattened, so every axis carries its logical name. Computed in
    `config.dtype` with float32 accumulation (`matmul`); with `config.quantization == 'int8'` an
    int8 kernel stored output-major (out_shape + in_shape) and a scale per output channel
    (`int8.int8_matmul`, whose gradient reaches x: adapters train on an int8 base).

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
        lead_shape = x.shape[:x.ndim - len(self.in_shape)]
        if (len(lead_shape) > 1 and cfg.quantization != "int8"
                and jnp.dtype(cfg.dtype) == jnp.float32):
            # One leading axis (B * L rows): the kernel's gradient is then a plain matrix
            # product over the rows. Contracting B and L as two axes, XLA's CPU compiler
            # transposed the output gradient for that dot in a strided copy, into which it fused
            # (recomputed) its producer: per layer, GELU's whole backward when no bias reduction
            # kept it in memory (4 such copies were ~15% of nanoGPT's baby step, bias=False:
            # 1.3x the CPU time of the same model with biases; after, 0.86x). float32 only: a
            # flat bf16 x bf16 -> f32 dot is unimplemented on XLA's CPU (jax 0.10.2).
            x = x.reshape((-1,) + x.shape[len(lead_shape):])
        # einsum letters: a.. x's leading axes, d.. the contracted ones, h.. the outputs.
        lead, ins = "abc"[:x.ndim - len(self.in_shape)], "defg"[:len(self.in_shape)]
        outs = "hijk"[:len(self.out_shape)]
        spec = f"{lead}{ins},{ins}{outs}->{lead}{outs}"
        if cfg.quantization == "int8":  # int8 kernel, a float32 scale per output channel
            # Stored output-major, out_shape + in_shape (W @ x^T: XLA:CPU's s8 dot is faster
            # so, see int8.int8_dot); lmjax/quantize.py transposes the float kernel once.
            n_in, g = len(self.in_shape), cfg.quant_group_size  # g: per block of inputs too
            names, shape = self.names[n_in:] + self.names[:n_in], self.out_shape + self.in_shape
            kernel = self.param("kernel", _partitioned(nn.initializers.zeros, names), shape,
                                jnp.int8)
            scale = self.param("scale", _partitioned(nn.initializers.ones,
                                                     names if g else self.names[n_in:]),
                               group_shape(shape, len(shape) - 1, g) if g else self.out_shape,
                               jnp.float32)
            # As one 2-D dot, [rows, in] x [out, in] (reshapes of contiguous axes: bitcasts):
            # a kernel with several output or input axes (query [H, K, D], out [D, H, K]) XLA
            # would otherwise transpose to [in, out], a full s8 copy per call.
            n_rows, n_out = x.ndim - n_in, int(np.prod(self.out_shape))
            y = int8_matmul(f"{lead}d,hd->{lead}h", x.reshape(x.shape[:n_rows] + (-1,)),
                            kernel.reshape(n_out, -1),
                            scale.reshape(n_out, -1) if g else scale.reshape(n_out), group_size=g)
            y = y.reshape(y.shape[:n_rows] + self.out_shape)
        else:
            y = matmul(spec, x, _float_kernel(self, self.init_scale), cfg.dtype)
        if self.use_bias:
            y = y + _bias(self)
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
        return y.reshape(lead_shape + self.out_shape).astype(cfg.dtype)


class _ProjectionParams(nn.Module):
    """A float Projection's kernel and bias (the same names, shapes and initialisers), for a
    caller that computes several projections as one matmul; no LoRA, no int8."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str, ...]
    use_bias: bool
    config: ModelConfig

    @nn.compact
    def __call__(self):
        return _float_kernel(self), _bias(self) if self.use_bias else None


def _float_kernel(module: Projection | _ProjectionParams, init_scale: float = 1.0):
    """The float kernel, in_shape + out_shape, of a Projection or _ProjectionParams."""
    cfg = module.config
    return module.param("kernel", _partitioned(_dense_init(cfg, init_scale), module.names),
                        module.in_shape + module.out_shape, cfg.param_dtype)


def _bias(module: Projection | _ProjectionParams):
    """The bias, out_shape, of a Projection or _ProjectionParams."""
    return module.param("bias", _partitioned(nn.initializers.zeros,
                                             module.names[len(module.in_shape):]),
                        module.out_shape, module.config.param_dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, RoPE and an optional KV cache
    (bidirectional, without a cache, for `config.architecture == 'encoder'`)."""

    config: ModelConfig
    cache_groups: int = 1  # KV-head groups of the cache rows (see attention.KVCache)

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, kv_cache: dict[str, jax.Array] | None = None,
                 cache_index=0, segment_ids_BxL: jax.Array | None = None):
        cfg = self.config
        H, G, K = cfg.num_heads, cfg.kv_heads, cfg.head_size

        use_bias = cfg.bias or cfg.qkv_bias

        def project(name, heads, head_axis):
            return Projection((cfg.embed_dim,), (heads, K), ("embed", head_axis, "head_dim"),
                              use_bias, cfg, name=name)(x_BxLxD)

        lora = cfg.lora_targets.split(",") if cfg.lora_rank else []
        # Decoding (a KV cache) keeps three matmuls: the stack is a copy of the three kernels
        # per call, and a decode step is bound by reading the weights (one GPT-2 row: stacked
        # 2.7-3.0 ms against 0.45-0.89 ms for three matmuls, 3 interleaved repeats, load 5).
        if (kv_cache is not None or cfg.quantization == "int8"
                or {"query", "key", "value"} & set(lora)):
            q_BxLxHxK = project("query", H, "heads")
            k_BxLxGxK = project("key", G, "kv_heads")
            v_BxLxGxK = project("value", G, "kv_heads")
        else:
            # The same three projections as one matmul over stacked kernels (as GPT-2's c_attn;
            # grouped KV heads: keys and values stacked, queries alone). Measured on the CPU
            # (2 cores shared, load 6-9): forward + backward of one middle-shape layer's
            # projections and attention (16 x 256 tokens, width 384, 6 heads) took 0.82x the time
            # of three matmuls (median of 7 interleaved repeats, 0.72-0.98), and the whole
            # middle-shape training step ran 1.12x and 1.25x faster in two interleaved repeats
            # (benchmarks/train_throughput.py's workers, old and new tree side by side); the
            # separate backward matmuls of q, k and v were the step's least efficient dots.
            # Stacked on a new axis, each kernel keeps its head axis, so a mesh that splits the
            # heads splits the stack the same way.
            names = [("query", H, "heads"), ("key", G, "kv_heads"), ("value", G, "kv_heads")]
            parts = [_ProjectionParams((cfg.embed_dim,), (n, K), ("embed", axis, "head_dim"),
                                       use_bias, cfg, name=name)() for name, n, axis in names]
            groups = [parts] if H == G else [parts[:1], parts[1:]]
            outs = []
            for group in groups:
                kernel_DxSxNxK = jnp.stack([kernel for kernel, _ in group], axis=1)
                y_BxLxSxNxK = matmul("bld,dsnk->blsnk", x_BxLxD, kernel_DxSxNxK, cfg.dtype)
                if use_bias:
                    y_BxLxSxNxK = y_BxLxSxNxK + jnp.stack([bias for _, bias in group])
                y_BxLxSxNxK = y_BxLxSxNxK.astype(cfg.dtype)
                outs.extend(y_BxLxSxNxK[:, :, i] for i in range(len(group)))
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = outs
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
            kv_cache = {name: write_slots(kv_cache[name], new[name], cache_index,
                                           self.cache_groups) for name in kv_cache}
            slots_T = jnp.arange(kv_cache["k"].shape[1])
            query_slots_L = cache_index + jnp.arange(x_BxLxD.shape[1])
            first_BxL = query_slots_L[None, :] - positions_BxL
            mask_BxLxT = ((slots_T >= first_BxL[:, :, None])
                          & (slots_T <= query_slots_L[None, :, None]))
            out_BxLxHxK = cached_attention(q_BxLxHxK, kv_cache, mask_BxLxT, self.cache_groups)

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
          (so rows of different lengths are left-padded; see attention.KVCache).
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
        elif (cfg.tie_embeddings and kv_cache is not None and L == 1
              and jnp.dtype(cfg.dtype) == jnp.float32):
            # A float32 decode step of a few rows (beams, a small batch): XLA's CPU dot for
            # x @ E.T streams E [V, D] slowly once there are 2+ rows, while E @ x.T [V, B] runs
            # as a matrix-vector product; the barrier keeps XLA from folding the transpose back.
            # Measured (GPT-2 124M head, 1 thread): 4 rows 42.6 -> 17.9 ms, 8 rows 48.1 -> 27.0
            # ms, 1 row 10.6 ms either way; the head was ~30% of a 4-beam step. In bfloat16
            # it is the other way round (x @ E.T is YNNPACK's bf16 dot; 2 rows 2.9 ms against
            # 4.3 ms for E @ x.T, 8 rows 3.4 against 4.5; one row is padded to two, 43 ms
            # otherwise: attention.matmul; AVX512-BF16 CPU, 2 cores).
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
