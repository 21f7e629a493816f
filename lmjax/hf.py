"""Hugging Face interop: GPT-2 and LLaMA-family (LLaMA, Mistral, Qwen2) checkpoints in and out.

    model_config, params, tokenizer = load_hf("path/to/folder")       # float32 or bfloat16
    save_hf("path/to/export", model_config, params, tokenizer)        # transformers loads it

A folder is what `transformers`' `save_pretrained` writes: `config.json`, the weights as
`model.safetensors`, sharded safetensors (`model.safetensors.index.json` + shards) or
`pytorch_model.bin` (sharded or not), and optionally the tokenizer files (`tokenizer.json` or
`tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`).

Both directions go through one table per architecture (`_tensor_rules`): each Hugging Face tensor
is one rule naming the lmjax parameter(s) it holds. Only the layout differs between the two:

* torch `nn.Linear` weights are [out, in] and are transposed; GPT-2's `Conv1D` weights are already
  [in, out]. lmjax's attention kernels keep the heads as their own axes ([D, H, K] and [H, K, D]),
  so a projection is reshaped, never permuted: HF LLaMA checkpoints already use the rotate-half
  RoPE layout of `model.apply_rope`.
* GPT-2's `c_attn` holds query, key and value side by side ([D, 3D]) and is split into three.

Weights are read one tensor at a time (memory-mapped safetensors; a .bin shard at a time), and each
is converted to its lmjax layout and dtype before the next is read, so two full copies of a model
never coexist. Only the `.bin` path imports torch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from lmjax import model as model_lib
from lmjax import quantize
from lmjax import tokenizers as tokenizers_lib
from lmjax.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}  # HF rope_type -> lmjax
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Tensors a checkpoint may hold that are not parameters (GPT-2's causal-mask buffers, old LLaMA's
# RoPE frequencies): skipped on import.
_BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$|(^|\.)rotary_emb\.inv_freq$")

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
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
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
    if cfg.param_dtype not in _DTYPES:
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
class _Rule:
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


def _tensor_rules(config: ModelConfig, model_type: str, prefix: str | None = None) -> list[_Rule]:
    """Every tensor of a Hugging Face `model_type` checkpoint for `config`, in file order.

    `prefix` is what precedes the transformer's own names ('transformer.' for GPT-2, 'model.'
    for LLaMA: a checkpoint of the bare transformer, without the LM head, has none).
    """
    cfg, rules = config, []

    def add(name, *paths, in_dims=1, transpose=False):
        rules.append(_Rule(name, tuple(tuple(p.split("/")) for p in paths), in_dims, transpose))

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


def _param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shape of every lmjax parameter of `config`, by path (computed without memory)."""
    tokens = jax.ShapeDtypeStruct((1, min(8, config.max_len)), jnp.int32)
    boxed = jax.eval_shape(model_lib.Transformer(config).init, jax.random.key(0), tokens)
    return {path: leaf.shape for path, leaf in
            traverse_util.flatten_dict(nn.unbox(boxed)["params"]).items()}


# -------------------------------------------------------------------------------- reading files


def _read_json(path: str) -> dict:
    """A JSON file's object; ValueError naming the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the folder is damaged or incomplete "
                         "(re-download or re-export it)") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(content).__name__}")
    return content


@contextlib.contextmanager
def _weights_file(path: str):
    """Errors while reading a weights file name the file (a truncated download otherwise
    surfaces as a bare deserialisation message)."""
    try:
        yield
    except Exception as e:  # SafetensorError, or torch.load's RuntimeError and pickle errors
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read the weights file {path}: {type(e).__name__}: {e} "
                         "(is it truncated or damaged? re-download or re-export the folder)"
                         ) from None


def read_hf_config(folder: str) -> dict:
    """The folder's config.json as a dict; FileNotFoundError if it has none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder!r} is not a Hugging Face model folder: it has no {CONFIG_FILE}")
    return _read_json(path)


# GenerationConfig fields that lmjax's SamplingConfig reads (logits_process.hf_generation_fields).
GENERATION_FIELDS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_k", "top_p",
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "num_beams",
    "length_penalty", "early_stopping", "num_return_sequences", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "stop_strings")


def generation_defaults(folder: str) -> dict:
    """The generation defaults of a Hugging Face model folder, as `GenerationConfig` fields:
    the bos/eos/pad token ids of config.json, overridden by generation_config.json's fields
    (those in GENERATION_FIELDS that are set). `SamplingConfig.from_hf` turns them into lmjax's.
    """
    hf = read_hf_config(folder)
    defaults = {name: hf[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf.get(name) is not None}
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if os.path.isfile(path):
        defaults.update({name: value for name, value in _read_json(path).items()
                         if name in GENERATION_FIELDS and value is not None})
    return defaults


class _Checkpoint:
    """The tensors of a folder's weight files, read one file (shard) at a time."""

    def __init__(self, folder: str):
        self.folder = folder

        def files_of(index):
            weight_map = _read_json(os.path.join(folder, index))["weight_map"]
            return {name: os.path.join(folder, file) for name, file in weight_map.items()}

        if os.path.isfile(os.path.join(folder, SAFETENSORS_FILE)):
            from safetensors import safe_open
            path = os.path.join(folder, SAFETENSORS_FILE)
            with _weights_file(path), safe_open(path, "np") as f:
                self.file_of = {name: path for name in f.keys()}
        elif os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
            self.file_of = files_of(SAFETENSORS_INDEX)
        elif os.path.isfile(os.path.join(folder, BIN_FILE)):
            self.file_of = None  # names known once the file is loaded
            self.bin_file = os.path.join(folder, BIN_FILE)
        elif os.path.isfile(os.path.join(folder, BIN_INDEX)):
            self.file_of = files_of(BIN_INDEX)
        else:
            raise FileNotFoundError(
                f"no weights in {folder!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                f"{BIN_FILE} or {BIN_INDEX}")
        if self.file_of is None:
            state = self._load_bin(self.bin_file)
            self.file_of = {name: self.bin_file for name in state}
            del state

    @staticmethod
    def _load_bin(path: str) -> dict:
        import torch  # only this path needs torch
        with _weights_file(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, tensor as NumPy) for `names`, grouped by file, one tensor at a time."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        for path, file_names in by_file.items():
            if path.endswith(".safetensors"):
                from safetensors import safe_open
                with _weights_file(path), safe_open(path, "np") as f:
                    for name in file_names:
                        yield name, f.get_tensor(name)
            else:
                state = self._load_bin(path)
                for name in file_names:
                    yield name, _torch_to_numpy(state.pop(name))
                del state


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _detect_prefix(model_type: str, names: set[str]) -> str:
    """'transformer.' / 'model.' (a ...LMHeadModel / ...ForCausalLM checkpoint) or '' (bare)."""
    first = "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"
    for prefix in ("transformer." if model_type == "gpt2" else "model.", ""):
        if prefix + first in names:
            return prefix
    return "transformer." if model_type == "gpt2" else "model."


def load_hf_params(folder: str, config: ModelConfig, model_type: str) -> dict:
    """The folder's weights as an lmjax parameter tree for `config`, in `config.param_dtype`.

    Raises ValueError naming the tensor for a missing tensor, a shape mismatch (both shapes), or
    tensors that this architecture does not have.
    """
    checkpoint = _Checkpoint(folder)
    rules = _tensor_rules(config, model_type, _detect_prefix(model_type, checkpoint.names()))
    return read_tensors(checkpoint, rules, _param_shapes(config), config.param_dtype,
                        ignore=lambda name: bool(_BUFFERS.search(name)) or (
                            name == "lm_head.weight" and config.tie_embeddings),
                        what=f"{model_type} with this config.json")


def read_tensors(checkpoint: "_Checkpoint", rules: list[_Rule], shapes: dict[Path, tuple],
                 param_dtype: str, ignore=lambda name: False, what: str = "") -> dict:
    """The parameter tree that `rules` read from `checkpoint` (any architecture's rules), one
    tensor at a time, in `param_dtype`. Tensors for which `ignore(name)` is true may be in the
    checkpoint without a rule; any other extra, missing or misshapen tensor is a ValueError
    naming it."""
    folder, names = checkpoint.folder, checkpoint.names()
    expected = {rule.name: rule.hf_shape(shapes) for rule in rules}
    missing = [name for name in expected if name not in names]
    if missing:
        raise ValueError(
            f"missing tensor {missing[0]!r} (expected shape {expected[missing[0]]}) in {folder}"
            + (f", and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else ""))
    unexpected = sorted(name for name in names - set(expected) if not ignore(name))
    if unexpected:
        raise ValueError(f"unexpected tensors in {folder} for {what}: "
                         f"{unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))

    dtype = _DTYPES[param_dtype]
    rule_of = {rule.name: rule for rule in rules}
    flat = {}
    for name, tensor in checkpoint.read(expected):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"but the config needs shape {expected[name]}")
        for path, array in rule_of[name].to_lmjax(tensor, shapes):
            flat[path] = jnp.asarray(array.astype(dtype, copy=False))
        del tensor
    return traverse_util.unflatten_dict(flat)


def load_hf(folder: str, dtype: str = "float32"
            ) -> tuple[ModelConfig, dict, tokenizers_lib.Tokenizer | None]:
    """Imports a Hugging Face GPT-2 / LLaMA / Mistral / Qwen2 folder.

    Returns (ModelConfig, params, tokenizer): params in `dtype` ('float32' or 'bfloat16', also
    the compute dtype of the config); the tokenizer is an `HFTokenizer` when the folder has
    tokenizer.json or tokenizer.model (an lmjax tokenizer if `save_hf` wrote one), else None.
    """
    hf = read_hf_config(folder)
    config = config_from_hf(hf, dtype)
    params = load_hf_params(folder, config, hf["model_type"])
    return config, params, load_hf_tokenizer(folder)


def load_hf_tokenizer(folder: str) -> tokenizers_lib.Tokenizer | None:
    """The tokenizer saved in a model folder, or None if it has none."""
    if tokenizers_lib.has_saved_tokenizer(folder):
        return tokenizers_lib.load_tokenizer(folder)
    if tokenizers_lib.HFTokenizer.in_folder(folder):
        return tokenizers_lib.HFTokenizer.from_folder(folder)
    return None


# ------------------------------------------------------------------------------------- writing


def write_tensors(folder: str, rules: list[_Rule], shapes: dict[Path, tuple], flat: dict,
                  param_dtype: str, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Writes the tensors of `rules` (any architecture's) built from the flat parameter dict
    `flat` as model.safetensors, or shards of at most `max_shard_bytes` and
    model.safetensors.index.json, in `param_dtype`; a parameter missing from `flat` is
    written as zeros of its shape in `shapes`."""
    from safetensors.numpy import save_file

    dtype = _DTYPES[param_dtype]

    def hf_tensor(rule: _Rule) -> np.ndarray:
        arrays = [np.asarray(flat[p]).astype(dtype) if p in flat else np.zeros(shapes[p], dtype)
                  for p in rule.paths]
        return rule.to_hf(arrays)

    # Plan the shards from sizes alone, then build and write one shard at a time.
    itemsize = np.dtype(dtype).itemsize
    shards: list[list[_Rule]] = [[]]
    size = 0
    for rule in rules:
        nbytes = math.prod(rule.hf_shape(shapes)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(rule)
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = (SAFETENSORS_FILE if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({rule.name: hf_tensor(rule) for rule in shard}, os.path.join(folder, file),
                  metadata={"format": "pt"})
        weight_map.update({rule.name: file for rule in shard})
    if len(shards) > 1:
        total = sum(math.prod(r.hf_shape(shapes)) * itemsize for r in rules)
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(folder: str, model_config: ModelConfig, params: dict,
            tokenizer: tokenizers_lib.Tokenizer | None = None, model_type: str | None = None,
            max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Exports lmjax params as a Hugging Face folder that `transformers` `from_pretrained` loads.

    Writes config.json and model.safetensors (or shards of at most `max_shard_bytes` and
    model.safetensors.index.json), in the params' dtype. `model_type` defaults to
    `default_model_type(model_config)`; ValueError if the config cannot be expressed in it.
    With a tokenizer, its files are written too (Hugging Face ones for an `HFTokenizer`; other
    lmjax tokenizers in lmjax's own format, which `load_hf` reads but `transformers` does not).
    """
    params, model_config = quantize.dequantize(params, model_config)  # int8: float32 out
    hf = hf_config(model_config, model_type, tokenizer)
    model_type = hf["model_type"]
    # The HF side's config may have more biases than lmjax's (exported as zeros).
    hf_side = config_from_hf(hf, model_config.param_dtype)
    rules = _tensor_rules(hf_side, model_type)
    shapes = _param_shapes(hf_side)
    flat = traverse_util.flatten_dict(params)
    own = _param_shapes(model_config)
    if set(own) != set(flat) or any(tuple(flat[p].shape) != own[p] for p in own):
        bad = sorted(set(own) ^ set(flat)) or [p for p in own if tuple(flat[p].shape) != own[p]]
        raise ValueError(f"params do not match model_config: check parameter {'/'.join(bad[0])}")
    write_tensors(folder, rules, shapes, flat, model_config.param_dtype, max_shard_bytes)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save(folder)
