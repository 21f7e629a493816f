"""Inference weights in fewer bytes: bfloat16, or int8 weight-only quantization.

    params, model_config = convert(params, model_config, "int8")      # or "bfloat16", "float32"
    export_quantized("models/demo_int8", params, model_config, tokenizer)   # load_params reads it
    params, model_config = dequantize(params, model_config)           # float32 again (HF export)

Decoding reads every weight once per token, so its speed is bounded by the bytes of the weights:
bfloat16 halves them, int8 quarters them (what llama.cpp's Q8_0 and gpt-fast's int8 weight-only
path do). `convert` runs once, at load; nothing is converted per step.

* **bfloat16**: every floating parameter in bfloat16 and the compute dtype bfloat16
  (`model.param_dtype = model.dtype = 'bfloat16'`), so no matmul casts a weight.
* **int8**: every projection kernel (query, key, value, out, the MLP's, lm_head) and the token
  embedding become int8 with a float32 scale per output channel, symmetric (scale = max|w| / 127
  over the input axes, `int8.quantize_int8`); for the embedding [V, D] a scale per vocabulary row,
  which is also the output channel of the tied logits. The int8 kernels are stored output-major
  (out_shape + in_shape, as the embedding already is: XLA:CPU's s8 dot is faster so, see
  `int8.int8_dot`), transposed here once. Norms, biases and GPT-2's position embedding stay
  float. `model.quantization='int8'` makes the model declare these int8 kernels
  and scales (with logical axis names: scales are sharded like their kernel's output axes), so
  `logical_axes`, `abstract_params` and Orbax restore of a quantized checkpoint need nothing more.
* **int8 KV cache** (`model.kv_cache_dtype='int8'`, `with_int8_kv_cache`): keys and values int8
  with a float32 scale per token and KV head (see `attention.init_kv_cache`).

A quantized checkpoint is `checkpoint.export_params` of the int8 params with their config:
`checkpoint.load_params` restores it without ever holding the float weights.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from lmjax import checkpoint, int8
from lmjax import model as model_lib
from lmjax.config import ModelConfig

# int8_g32: int8 with a scale per output channel and block of 32 input channels (Q8_0's blocks);
# convert() takes any int8_g<N>.
WEIGHTS_DTYPES = ("float32", "bfloat16", "int8", "int8_g32")


def group_size_of(weights_dtype: str) -> int:
    """The quant_group_size an int8 weights_dtype names: int8 -> 0 (per output channel),
    int8_g<N> -> N; ValueError otherwise."""
    if weights_dtype == "int8":
        return 0
    if weights_dtype.startswith("int8_g") and weights_dtype[6:].isdigit() and int(
            weights_dtype[6:]) > 0:
        return int(weights_dtype[6:])
    raise ValueError(f"weights_dtype={weights_dtype!r} is not int8 or int8_g<N>")


def check_weights_dtype(weights_dtype: str | None) -> None:
    """ValueError naming the allowed values, before anything is loaded."""
    if weights_dtype is None or weights_dtype in WEIGHTS_DTYPES:
        return
    if weights_dtype.startswith("int8_g"):
        group_size_of(weights_dtype)
        return
    raise ValueError(f"weights_dtype={weights_dtype!r} is not one of "
                     f"{', '.join(WEIGHTS_DTYPES)}, int8_g<N> (or None: as stored)")


def _abstract_flat(model_config: ModelConfig) -> dict:
    return traverse_util.flatten_dict(jax.eval_shape(
        lambda: model_lib.init_params(model_config, jax.random.key(0))))


def _output_ranks(model_config: ModelConfig) -> dict[tuple[str, ...], int]:
    """{path of each Projection kernel: its number of output axes} (its per-channel scale's rank,
    as the int8 model declares it). The embedding [V, D] is not listed: it is the same array in
    both layouts."""
    flat = _abstract_flat(dataclasses.replace(model_config, quantization="int8",
                                              quant_group_size=0))
    return {path: flat[path[:-1] + ("scale",)].ndim for path, leaf in flat.items()
            if path[-1] == "kernel" and leaf.dtype == jnp.int8}


def leading_axes_last(kernel, n: int):
    """`kernel` with its first `n` axes moved to the end: a float kernel in_shape + out_shape
    (n = its input axes) becomes the int8 model's out_shape + in_shape, and back again
    (n = its output axes)."""
    return jnp.transpose(kernel, tuple(range(n, kernel.ndim)) + tuple(range(n)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_leaf(w, n_in: int | None, group_size: int):
    """(q, scale) of one float kernel (n_in input axes, transposed output-major first) or of the
    embedding (n_in None, [V, D] as it is): per output channel, over the trailing input axes,
    or per block of `group_size` along the last input axis. Jitted: XLA fuses the transpose."""
    if n_in is not None:
        w = leading_axes_last(w, n_in)
    if group_size:
        return int8.quantize_int8_groups(w, w.ndim - 1, group_size)
    n_out = 1 if n_in is None else w.ndim - n_in
    q, scale = int8.quantize_int8(w, tuple(range(n_out, w.ndim)))
    return q, scale.reshape(w.shape[:n_out])


@functools.partial(jax.jit, static_argnums=2)
def _dequantize_leaf(q, scale, n_out: int | None):
    """The float32 kernel (input-major again: n_out output axes) or embedding (n_out None) of
    an int8 one and its scale (per output channel, or per block along the last axis)."""
    if scale.ndim == q.ndim:  # per block (quant_group_size)
        w = int8.dequantize_groups(q, scale, q.ndim - 1)
    else:
        w = q.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * (q.ndim - scale.ndim))
    return w if n_out is None else leading_axes_last(w, n_out)


def quantize(params: dict, model_config: ModelConfig,
             group_size: int = 0) -> tuple[dict, ModelConfig]:
    """Float params -> (int8 params, config with quantization='int8') as `model.Transformer`
    with that config declares them (every kernel and the embedding int8 plus its `scale`; the
    kernels transposed output-major, out_shape + in_shape, once, here).
    group_size > 0: a scale per block of that many input channels as well (Q8_0: 32), along a
    kernel's last input axis and the embedding's D (`model.quant_group_size`)."""
    if model_config.quantization == "int8":
        if model_config.quant_group_size == group_size:
            return params, model_config
        params, model_config = dequantize(params, model_config)  # requantized below
    qconfig = dataclasses.replace(model_config, quantization="int8", quant_group_size=group_size)
    target, ranks = _abstract_flat(qconfig), _output_ranks(qconfig)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        want = target.get(path)
        if want is not None and want.dtype == jnp.int8:
            n_in = leaf.ndim - ranks[path] if path in ranks else None
            out[path], out[path[:-1] + ("scale",)] = _quantize_leaf(leaf, n_in, group_size)
        else:
            out[path] = leaf
    _check_tree(out, target)
    return traverse_util.unflatten_dict(out), qconfig


def dequantize(params: dict, model_config: ModelConfig) -> tuple[dict, ModelConfig]:
    """int8 params -> float32 params (q * scale, kernels input-major again) and the config with
    quantization='none' (float32 params and compute); float params are returned as they are."""
    if model_config.quantization == "none":
        return params, model_config
    fconfig = dataclasses.replace(model_config, quantization="none", param_dtype="float32",
                                  dtype="float32", quant_group_size=0)
    ranks = _output_ranks(model_config)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        if path[-1] == "scale" and path[:-1] + ("kernel",) in flat:
            continue
        if path[-1] == "scale" and path[-2:-1] == ("embed",):
            continue
        if leaf.dtype == jnp.int8:
            out[path] = _dequantize_leaf(leaf, flat[path[:-1] + ("scale",)], ranks.get(path))
        else:
            out[path] = leaf.astype(jnp.float32)
    _check_tree(out, _abstract_flat(fconfig))
    return traverse_util.unflatten_dict(out), fconfig


def to_bfloat16(params: dict, model_config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Every floating parameter in bfloat16, and the config's param and compute dtypes."""
    params, model_config = dequantize(params, model_config)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return params, dataclasses.replace(model_config, param_dtype="bfloat16", dtype="bfloat16")


def convert(params: dict, model_config: ModelConfig,
            weights_dtype: str | None) -> tuple[dict, ModelConfig]:
    """The params (and config) in `weights_dtype`: None keeps them as stored; 'float32' and
    'bfloat16' store and compute in that dtype (an int8 model is dequantized); 'int8' quantizes
    (see the module docstring), 'int8_g<N>' with a scale per block of N input channels too.
    Runs once, at load."""
    check_weights_dtype(weights_dtype)
    if weights_dtype is None:
        return params, model_config
    if weights_dtype.startswith("int8"):
        return quantize(params, model_config, group_size_of(weights_dtype))
    if weights_dtype == "bfloat16":
        return to_bfloat16(params, model_config)
    params, model_config = dequantize(params, model_config)
    if model_config.param_dtype != "float32" or model_config.dtype != "float32":
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        model_config = dataclasses.replace(model_config, param_dtype="float32", dtype="float32")
    return params, model_config


def with_int8_kv_cache(model_config: ModelConfig, enabled: bool = True) -> ModelConfig:
    """The config with an int8 KV cache (or the compute dtype's: enabled=False)."""
    return dataclasses.replace(model_config, kv_cache_dtype="int8" if enabled else "auto")


def weight_bytes(params) -> int:
    """Bytes of a parameter tree (what a decode step reads, up to GPT-2's position rows)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def _check_tree(flat: dict, target: dict) -> None:
    """The converted tree has exactly the target's paths, shapes and dtypes (else a bug here)."""
    bad = sorted(set(flat) ^ set(target)) or [
        p for p in target if (tuple(flat[p].shape), flat[p].dtype) != (target[p].shape,
                                                                        target[p].dtype)]
    if bad:
        raise ValueError(f"converted params do not match the model at {'/'.join(bad[0])}")


def export_quantized(path: str, params: dict, model_config: ModelConfig, tokenizer) -> str:
    """Writes an int8 params-only folder (quantizing float params first): `load_params(path)`
    and `--workdir=PATH` restore the int8 arrays, never the float weights; int8 params (per
    channel or per block) are written as they are. Returns the path."""
    if model_config.quantization != "int8":
        params, model_config = quantize(params, model_config)
    return checkpoint.export_params(path, params, model_config, tokenizer)
