"""A BERT-style encoder and its heads, built from model.py's layers.

Shape letters used in names:
  B batch, L length, D embed_dim, V vocab_size, N num_labels.

`Encoder(config).apply({'params': params}, tokens_BxL, attention_mask=mask_BxL,
token_types_BxL=types_BxL)` returns, by `config.head`:
  'lm'          logits_BxLxV of the masked-LM head (BertForMaskedLM),
  'classifier'  logits_BxN of the sequence classifier on the pooled [CLS] (first) token
                (BertForSequenceClassification; N = 1 is regression),
  'none'        (hidden_BxLxD, pooled_BxD) (BertModel).

The blocks are `model.Block` with `config.architecture == 'encoder'` (bidirectional attention:
a query sees every key of its own segment, so a padding mask is segment ids 1 / 0) and, for
BERT, `config.norm_position == 'post'`. Parameters carry the decoder's logical axis names, so
`sharding.py`'s rules and every mesh layout apply unchanged; the pooler's and the classifier's
output axes are replicated (None).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import attention as attention_lib
from lmjax import model as model_lib
from lmjax.config import ModelConfig
from lmjax.model import Projection, _ACT_BLD, _ACT_BLV, _dense_init, _norm, _partitioned


def _activation(config: ModelConfig, x):
    """The MLP's GELU (BERT's `hidden_act='gelu'` is the exact one, lmjax's 'gelu_exact')."""
    return nn.gelu(x, approximate=config.mlp == "gelu")


class Encoder(nn.Module):
    """Embeddings (word + position + token type, norm, dropout) -> blocks -> head."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, attention_mask: jax.Array | None = None,
                 token_types_BxL: jax.Array | None = None,
                 positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, deterministic: bool = True):
        """attention_mask: [B, L] 1 for tokens, 0 for padding (Hugging Face's); positions stay
        0..L-1 as in BERT. segment_ids_BxL (packed rows, instead of a mask): a token sees only
        the tokens with its id, at positions restarting per segment (`positions_from_segments`)
        unless positions are given. deterministic=False turns dropout on (rngs={'dropout'})."""
        cfg = self.config
        B, L = tokens_BxL.shape
        if attention_mask is not None:
            if segment_ids_BxL is not None:
                raise ValueError("give attention_mask or segment_ids_BxL, not both")
            segment_ids_BxL = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
        elif segment_ids_BxL is not None and positions_BxL is None:
            positions_BxL = attention_lib.positions_from_segments(segment_ids_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

        embed = nn.Embed(
            cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_partitioned(_dense_init(cfg), ("vocab", "embed")), name="embed")
        x_BxLxD = embed(tokens_BxL)
        if cfg.position == "learned":
            pos_embed = self.param("pos_embed", _partitioned(_dense_init(cfg), ("length", "embed")),
                                   (cfg.max_len, cfg.embed_dim), cfg.param_dtype)
            x_BxLxD = x_BxLxD + jnp.take(pos_embed, positions_BxL, axis=0).astype(cfg.dtype)
        if cfg.type_vocab_size:
            type_embed = self.param("type_embed", _partitioned(_dense_init(cfg), (None, "embed")),
                                    (cfg.type_vocab_size, cfg.embed_dim), cfg.param_dtype)
            types_BxL = (jnp.zeros((B, L), jnp.int32) if token_types_BxL is None
                         else token_types_BxL)
            x_BxLxD = x_BxLxD + jnp.take(type_embed, types_BxL, axis=0).astype(cfg.dtype)
        if cfg.norm_position == "post":
            x_BxLxD = _norm(cfg, "embed_norm")(x_BxLxD)
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        x_BxLxD = nn.with_logical_constraint(dropout(x_BxLxD), _ACT_BLD)

        block_cls = model_lib.Block
        if cfg.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if cfg.remat == "dots" else None)
            block_cls = nn.remat(model_lib.Block, policy=policy)
        for i in range(cfg.num_layers):
            x_BxLxD, _ = block_cls(cfg, deterministic, name=f"blocks_{i}")(
                x_BxLxD, positions_BxL, None, 0, segment_ids_BxL)
        if cfg.norm_position == "pre":
            x_BxLxD = _norm(cfg, "final_norm")(x_BxLxD)

        if cfg.head == "lm":  # BERT's MLM head: dense -> GELU -> norm -> decoder + bias
            h_BxLxD = Projection((cfg.embed_dim,), (cfg.embed_dim,), ("embed", None), True, cfg,
                                 name="mlm_transform")(x_BxLxD)
            h_BxLxD = _norm(cfg, "mlm_norm")(_activation(cfg, h_BxLxD))
            if cfg.tie_embeddings:  # the word embeddings, transposed
                logits_BxLxV = attention_lib.matmul("bld,vd->blv", h_BxLxD, embed.embedding,
                                                cfg.dtype)
            else:
                logits_BxLxV = Projection((cfg.embed_dim,), (cfg.vocab_size,),
                                          ("embed", "vocab"), False, cfg, name="lm_head")(h_BxLxD)
            bias_V = self.param("mlm_bias", _partitioned(nn.initializers.zeros, ("vocab",)),
                                (cfg.vocab_size,), cfg.param_dtype)
            logits_BxLxV = logits_BxLxV.astype(jnp.float32) + bias_V.astype(jnp.float32)
            return nn.with_logical_constraint(logits_BxLxV, _ACT_BLV)
        # The pooler: tanh(dense(hidden of the first, [CLS], token)).
        pooled_BxD = jnp.tanh(Projection((cfg.embed_dim,), (cfg.embed_dim,), ("embed", None),
                                         True, cfg, name="pooler")(x_BxLxD[:, 0]))
        if cfg.head == "none":
            return x_BxLxD, pooled_BxD
        logits_BxN = Projection((cfg.embed_dim,), (cfg.num_labels,), ("embed", None), True, cfg,
                                name="classifier")(dropout(pooled_BxD))
        return logits_BxN.astype(jnp.float32)


def network(config: ModelConfig) -> nn.Module:
    """The flax module of a config: `Encoder` for encoders, `model.Transformer` for decoders."""
    return Encoder(config) if config.architecture == "encoder" else model_lib.Transformer(config)


def init_boxed_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters of either architecture, each boxed with its logical axis names."""
    if config.architecture != "encoder":
        return model_lib.init_boxed_params(config, rng)
    tokens = jnp.zeros((1, min(8, config.max_len)), jnp.int32)
    return Encoder(config).init(rng, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters of either architecture as a plain pytree."""
    return nn.unbox(init_boxed_params(config, rng))


def param_shapes(config: ModelConfig) -> dict:
    """The parameter tree of either architecture as `jax.ShapeDtypeStruct`s (no memory)."""
    return nn.unbox(jax.eval_shape(functools.partial(init_boxed_params, config),
                                   jax.random.key(0)))


def num_params(config: ModelConfig) -> int:
    """Parameter count of a config of either architecture (shapes only)."""
    return model_lib.count_params(param_shapes(config))
