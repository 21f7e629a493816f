"""Hugging Face config.json and tensor names for GPT-2 and the LLaMA family (LLaMA, Mistral,
Qwen2): what lmjax's ModelConfig and parameter tree are on the Hugging Face side. No file I/O
(that is hf.py's).

    config = config_from_hf(json.load(open("config.json")))     # ModelConfig
    hf = hf_config(config, "llama")                              # config.json dict
    rules = tensor_rules(config, "llama")                        # one Rule per HF tensor

Both directions go through one table per architecture (`tensor_rules`): each Hugging Face tensor
is one rule naming the lmjax parameter(s) it holds. Only the layout differs between the two:

* torch `nn.Linear` weights are [out, in] and are transposed; GPT-2's `Conv1D` weights are already
  [in, out]. lmjax's attention kernels keep the heads as their own axes ([D, H, K] and [H, K, D]),
  so a projection is reshaped, never permuted: HF LLaMA checkpoints already use the rotate-half
  RoPE layout of `attention.apply_rope`.
* GPT-2's `c_attn` holds query, key and value side by side ([D, 3D]) and is split into three.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from lmjax import model as model_lib
from lmjax import tokenizers as tokenizers_lib
from lmjax.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}  # HF rope_type -> lmjax
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

Path = tuple[str, ...]  # a parameter's path in the lmjax tree, e.g. ('blocks_0', 'attn', 'out')


# ---------------------------------------------------------------------------------------- config


def _rope_parameters(hf: dict) -> dict:
    """The RoPE settings of a LLaMA-family config.json, old (rope_theta + rope_scaling) or new
    (transformers 5: rope_parameters) format, as one flat dict with rope_type and rope_theta."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer RoPE parameters are not supported: {params}")
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (as a dict); ValueError if not supported."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported model "
                         f"types are {', '.join(SUPPORTED_MODEL_TYPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    common = dict(dtype=dtype, param_dtype=dtype, dropout=0.0,
                  init_std=float(hf.get("initializer_range", 0.02)))

    def unsupported(what):
        return ValueError(f"{model_type} config.json: {what} is not supported by lmjax")

    if model_type == "gpt2":
        D = hf.get("n_embd", 768)
        if hf.get("activation_function", "gelu_new") not in _GELU_TANH:
            raise unsupported(f"activation_function={hf['activation_function']!r} "
                              f"(supported: {', '.join(_GELU_TANH)})")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise unsupported("attention scaling other than 1/sqrt(head size)")
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 50257), num_layers=hf.get("n_layer", 12),
            num_heads=hf.get("n_head", 12), embed_dim=D, mlp_dim=hf.get("n_inner") or 4 * D,
            max_len=hf.get("n_positions", 1024), position="learned", norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu", bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True), **common)

    # LLaMA family: RoPE, RMSNorm, SwiGLU, grouped-query attention.
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r} (supported: silu)")
    D, H = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim") or D // H
    rope = _rope_parameters(hf)
    if rope["rope_type"] not in _ROPE_TYPES:
        raise unsupported(f"rope_type={rope['rope_type']!r} (supported: {', '.join(_ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    max_len = hf.get("max_position_embeddings", 2048)
    scaling = dict(rope_scaling=_ROPE_TYPES[rope["rope_type"]])
    if scaling["rope_scaling"] != "none":
        scaling["rope_scaling_factor"] = float(rope["factor"])
    if scaling["rope_scaling"] == "llama3":
        scaling.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_len=int(rope.get("original_max_position_embeddings",
                                                          max_len)))
    if model_type == "llama":
        attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if mlp_bias and not attention_bias:
            raise unsupported("mlp_bias=true with attention_bias=false")
        biases = dict(bias=mlp_bias, qkv_bias=attention_bias, out_bias=attention_bias)
    elif model_type == "qwen2":
        biases = dict(bias=False, qkv_bias=True)  # Qwen2: q, k, v biased; o and the MLP not
    else:
        biases = dict(bias=False)
    # lmjax has no sliding-window attention; up to the window's length it is plain attention,
    # so a window shorter than the context becomes the context (max_len: every lmjax entry point
    # refuses longer sequences). Mistral's window is a ModelConfig field, so that save_hf writes
    # a Mistral folder back (its config.json differs from LLaMA's by sliding_window).
    window = hf.get("sliding_window")
    sliding = (hf.get("use_sliding_window", False) if model_type == "qwen2"
               else model_type == "mistral")
    if window and sliding and window < max_len:
        warnings.warn(f"{model_type} config.json: sliding_window={window} < "
                      f"max_position_embeddings={max_len}; lmjax has no sliding-window "
                      f"attention, so the model's context is cut to {window} tokens "
                      "(model.max_len), where full attention computes the same")
        max_len = window
    window_field = dict(sliding_window=window) if model_type == "mistral" and window else {}
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 32000), num_layers=hf.get("num_hidden_layers", 32),
        num_heads=H, num_kv_heads=hf.get("num_key_value_heads") or H,
        embed_dim=D, head_dim=0 if head_dim * H == D else head_dim,
        mlp_dim=hf.get("intermediate_size", 11008), max_len=max_len, position="rope",
        rope_theta=float(rope["rope_theta"]), **scaling, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu", **biases, **window_field,
        tie_embeddings=hf.get("tie_word_embeddings", False), **common)


def default_model_type(config: ModelConfig) -> str:
    """gpt2 for learned positions; mistral with a sliding window; qwen2 for q/k/v-only biases;
    llama otherwise."""
    if config.position == "learned":
        return "gpt2"
    if config.sliding_window:
        return "mistral"
    if config.qkv_bias and not (config.bias or config.out_bias):
        return "qwen2"
    return "llama"


def hf_config(config: ModelConfig, model_type: str | None = None,
              tokenizer: tokenizers_lib.Tokenizer | None = None) -> dict:
    """The config.json for `config` as a Hugging Face `model_type` (default: `default_model_type`).

    Raises ValueError naming the fields that `model_type` cannot express. Biases that lmjax
    leaves out but the architecture has (GPT-2's, or LLaMA's o_proj bias when only q/k/v have
    one) are exported as zeros.
    """
    model_type = model_type or default_model_type(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported model "
                         f"types are {', '.join(SUPPORTED_MODEL_TYPES)}")
    cfg = config
    hf: dict[str, Any] = dict(architectures=[_ARCHITECTURES[model_type]], model_type=model_type,
                              vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                              initializer_range=cfg.init_std, dtype=cfg.param_dtype,
                              torch_dtype=cfg.param_dtype)
    if model_type == "gpt2":
        hf.update(n_layer=cfg.num_layers, n_head=cfg.num_heads, n_embd=cfg.embed_dim,
                  n_inner=cfg.mlp_dim, n_positions=cfg.max_len, activation_function="gelu_new",
                  layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout,
                  embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, scale_attn_weights=True)
    else:
        rope: dict[str, Any] = dict(rope_type={v: k for k, v in _ROPE_TYPES.items()}[
            cfg.rope_scaling], rope_theta=cfg.rope_theta)
        if cfg.rope_scaling != "none":
            rope["factor"] = cfg.rope_scaling_factor
        if cfg.rope_scaling == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                        high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_len)
        hf.update(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.kv_heads, hidden_size=cfg.embed_dim,
                  head_dim=cfg.head_size, intermediate_size=cfg.mlp_dim,
                  max_position_embeddings=cfg.max_len, hidden_act="silu",
                  rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
                  # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
                  rope_parameters=rope, rope_theta=cfg.rope_theta,
                  rope_scaling=None if cfg.rope_scaling == "none" else dict(rope, type=rope[
                      "rope_type"]))
        if model_type == "llama":
            hf.update(attention_bias=cfg.bias or cfg.qkv_bias or cfg.out_bias,
                      mlp_bias=cfg.bias, pretraining_tp=1)
        elif model_type == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=cfg.num_layers)
        else:
            hf.update(sliding_window=cfg.sliding_window or None)
    for name in ("bos", "eos", "pad"):
        hf[f"{name}_token_id"] = getattr(tokenizer, f"{name}_id", None)

    # What Hugging Face will run must be what lmjax runs: read the config back and compare.
    # (A bias lmjax lacks but Hugging Face has is exported as zeros, which computes the same.)
    back_config = config_from_hf(hf, cfg.param_dtype)
    back, own = _behaviour(back_config), _behaviour(cfg)
    differ = [name for name in own if own[name] != back.get(name)]
    differ += [name for name in ("bias", "qkv_bias", "out_bias")
               if _has_bias(cfg, name) and not _has_bias(back_config, name)]
    if cfg.param_dtype not in DTYPES:
        differ.append("param_dtype")
    if differ:
        raise ValueError(
            f"cannot export as Hugging Face {model_type!r}: " + ", ".join(
                f"model.{name}={getattr(cfg, name)!r}" for name in differ)
            + f" is not expressible (supported model types: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return hf


def _behaviour(config: ModelConfig) -> dict[str, Any]:
    """The fields of `config` that change what the model computes (biases aside), with their
    effective values."""
    fields = dataclasses.asdict(config)
    fields.update(num_kv_heads=config.kv_heads, head_dim=config.head_size)
    # sliding_window: lmjax computes full attention, within max_len <= the window (ModelConfig
    # checks it), as every model type does there; it only tells Mistral from LLaMA.
    for name in ("bias", "qkv_bias", "out_bias", "dtype", "param_dtype", "init_std", "dropout",
                 "remat", "sliding_window"):
        del fields[name]
    rope = [name for name in fields if name.startswith("rope_")]
    if config.position != "rope":
        drop = rope
    elif config.rope_scaling == "none":
        drop = [name for name in rope if name not in ("rope_theta", "rope_scaling")]
    elif config.rope_scaling == "linear":
        drop = ["rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"]
    else:
        drop = []
    for name in drop:
        del fields[name]
    return fields


def _has_bias(config: ModelConfig, name: str) -> bool:
    """Whether the biases enabled by the lmjax flag `name` exist in `config`'s model."""
    if name == "qkv_bias":
        return config.bias or config.qkv_bias
    if name == "out_bias":
        return config.bias or config.out_bias
    return config.bias


# --------------------------------------------------------------------------------- tensor rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor and the lmjax parameter(s) it holds.

    Each lmjax parameter is seen as a matrix [in, out] whose first `in_dims` axes are the input
    (in_dims=0: a vector); the HF tensor is those matrices side by side along `out`, transposed
    when `transpose` (torch nn.Linear stores [out, in]).
    """

    name: str
    paths: tuple[Path, ...]
    in_dims: int = 1
    transpose: bool = False

    def hf_shape(self, shapes: dict[Path, tuple[int, ...]]) -> tuple[int, ...]:
        ins = {math.prod(shapes[p][:self.in_dims]) for p in self.paths}
        out = sum(math.prod(shapes[p][self.in_dims:]) for p in self.paths)
        if self.in_dims == 0:
            return (out,)
        (n_in,) = ins
        return (out, n_in) if self.transpose else (n_in, out)

    def to_lmjax(self, tensor: np.ndarray, shapes) -> Iterator[tuple[Path, np.ndarray]]:
        matrix = tensor.T if self.transpose else tensor
        sizes = [math.prod(shapes[p][self.in_dims:]) for p in self.paths]
        for path, part in zip(self.paths, np.split(matrix, np.cumsum(sizes)[:-1], axis=-1)):
            yield path, part.reshape(shapes[path])

    def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
        rows = 1 if self.in_dims == 0 else math.prod(arrays[0].shape[:self.in_dims])
        matrix = np.concatenate([a.reshape(rows, -1) for a in arrays], axis=-1)
        if self.in_dims == 0:
            return matrix[0]
        return np.ascontiguousarray(matrix.T if self.transpose else matrix)


def tensor_rules(config: ModelConfig, model_type: str, prefix: str | None = None) -> list[Rule]:
    """Every tensor of a Hugging Face `model_type` checkpoint for `config`, in file order.

    `prefix` is what precedes the transformer's own names ('transformer.' for GPT-2, 'model.'
    for LLaMA: a checkpoint of the bare transformer, without the LM head, has none).
    """
    cfg, rules = config, []

    def add(name, *paths, in_dims=1, transpose=False):
        rules.append(Rule(name, tuple(tuple(p.split("/")) for p in paths), in_dims, transpose))

    if model_type == "gpt2":
        p = "transformer." if prefix is None else prefix
        add(f"{p}wte.weight", "embed/embedding")
        add(f"{p}wpe.weight", "pos_embed")
        for i in range(cfg.num_layers):
            h, b = f"{p}h.{i}.", f"blocks_{i}/"
            for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                add(f"{h}{hf_norm}.weight", f"{b}{norm}/scale", in_dims=0)
                add(f"{h}{hf_norm}.bias", f"{b}{norm}/bias", in_dims=0)
            qkv = [f"{b}attn/{name}" for name in ("query", "key", "value")]
            add(f"{h}attn.c_attn.weight", *(f"{path}/kernel" for path in qkv))
            add(f"{h}attn.c_attn.bias", *(f"{path}/bias" for path in qkv), in_dims=0)
            add(f"{h}attn.c_proj.weight", f"{b}attn/out/kernel", in_dims=2)
            add(f"{h}attn.c_proj.bias", f"{b}attn/out/bias", in_dims=0)
            for name in ("fc", "proj"):
                add(f"{h}mlp.c_{name}.weight", f"{b}mlp/{name}/kernel")
                add(f"{h}mlp.c_{name}.bias", f"{b}mlp/{name}/bias", in_dims=0)
        add(f"{p}ln_f.weight", "final_norm/scale", in_dims=0)
        add(f"{p}ln_f.bias", "final_norm/bias", in_dims=0)
    else:
        p = "model." if prefix is None else prefix
        add(f"{p}embed_tokens.weight", "embed/embedding")
        for i in range(cfg.num_layers):
            h, b = f"{p}layers.{i}.", f"blocks_{i}/"
            add(f"{h}input_layernorm.weight", f"{b}attn_norm/scale", in_dims=0)
            for hf_name, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
                add(f"{h}self_attn.{hf_name}_proj.weight", f"{b}attn/{name}/kernel",
                    in_dims=2 if name == "out" else 1, transpose=True)
                if _has_bias(cfg, "out_bias" if name == "out" else "qkv_bias"):
                    add(f"{h}self_attn.{hf_name}_proj.bias", f"{b}attn/{name}/bias", in_dims=0)
            add(f"{h}post_attention_layernorm.weight", f"{b}mlp_norm/scale", in_dims=0)
            for hf_name, name in (("gate", "gate"), ("up", "up"), ("down", "proj")):
                add(f"{h}mlp.{hf_name}_proj.weight", f"{b}mlp/{name}/kernel", transpose=True)
                if cfg.bias:
                    add(f"{h}mlp.{hf_name}_proj.bias", f"{b}mlp/{name}/bias", in_dims=0)
        add(f"{p}norm.weight", "final_norm/scale", in_dims=0)
    if not cfg.tie_embeddings:
        add("lm_head.weight", "lm_head/kernel", transpose=True)
    return rules


def param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shape of every lmjax parameter of `config`, by path (computed without memory)."""
    tokens = jax.ShapeDtypeStruct((1, min(8, config.max_len)), jnp.int32)
    boxed = jax.eval_shape(model_lib.Transformer(config).init, jax.random.key(0), tokens)
    return {path: leaf.shape for path, leaf in
            traverse_util.flatten_dict(nn.unbox(boxed)["params"]).items()}
