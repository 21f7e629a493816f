"""int8 layers: symmetric quantization, the integer dot, the int8 projection matmul (with a
straight-through gradient, for QLoRA-style training) and the int8 token embedding.

model.py builds its layers on these when `config.quantization == 'int8'` (and the int8 KV
cache); lmjax/quantize.py converts float weights into them. This module imports nothing from
lmjax but the config.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import ModelConfig


def quantize_int8(x: jax.Array, axes) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization over `axes` (llama.cpp's Q8_0 rule): scale = max|x| / 127,
    q = round(x / scale); returns (q int8, scale float32 with `axes` kept as size 1)."""
    scale = jnp.abs(x.astype(jnp.float32)).max(axis=axes, keepdims=True) / 127.0
    q = jnp.round(x.astype(jnp.float32) / jnp.where(scale == 0, 1.0, scale))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def int8_dot(spec: str, x: jax.Array, y_int8: jax.Array) -> jax.Array:
    """`einsum(spec, x, y)` (float32) for a float x and an int8 y, as an integer dot: x is
    quantized to int8 per row (symmetric, over the axes it contracts: PyTorch's dynamic
    quantization, per token), multiplied with y in int32, and the result scaled back.

    Hand-written because XLA:CPU (jax 0.10.2) has no fast dot with an int8 or bf16 operand: it
    converts that operand to a full float32 copy, every call. Measured on this 2-core machine,
    x [1, 768] @ w [768, 3072] (benchmarks/sample_speed.py's shapes): f32 dot 0.59 ms; f32 x with
    the int8 w converted (in the dot or before it: the same HLO, also qwix 0.1.8's weight-only
    `dot_general(x, qvalue) * scale`) 1.6-2.2 ms; bf16 x bf16 1.2 ms; multiply-and-reduce forms
    37-52 ms; this s8 x s8 -> s32 dot 0.42 ms (no float copy of w in the optimised HLO). A dot
    with a single row is padded to two (`one_row_as_two`): XLA rewrites a one-row dot into a
    multiply-reduce that materialises w as int32 (1.5 ms).

    The s8 dot is faster with y stored output-major, [out, in] (W @ x^T), so lmjax's int8
    kernels are (model.Projection; the embedding [V, D] always was). `python
    benchmarks/int8_dot_layout.py` (this function, input- vs output-major y, interleaved, load
    ~7-8 on 2 cores, 2026-12-02), ms: [1, 768] x [768, 3072] 0.63 -> 0.32, [1, 3072] x [3072,
    768] 0.67 -> 0.51, 2 rows 0.46 -> 0.34 and 0.47 -> 0.27, 8 rows 1.55 -> 1.06 and 1.61 ->
    1.11; [768, 50257] 1.1-1.5x (float32 x @ W: 0.49, 0.57 ms at one row).
    """
    inputs, out = spec.split("->")
    x_axes, y_axes = inputs.split(",")
    contracted = tuple(i for i, c in enumerate(x_axes) if c not in out)
    x_q, x_scale = quantize_int8(x, contracted)
    y = one_row_as_two(spec, x_q, y_int8, functools.partial(
        jnp.einsum, spec, preferred_element_type=jnp.int32))
    # x's scale (a size-1 axis per contracted one) laid out along the output's axes (x's
    # letters keep their order in every spec here).
    kept = [c for c in x_axes if c in out]
    x_scale = x_scale.reshape([x.shape[x_axes.index(c)] for c in kept])
    x_scale = jnp.expand_dims(x_scale, [i for i, c in enumerate(out) if c not in kept])
    return y.astype(jnp.float32) * x_scale


def one_row_as_two(spec: str, a: jax.Array, b: jax.Array, product) -> jax.Array:
    """`product(a, b)` (an einsum of `spec`) with a one-row operand padded to two rows and the
    result sliced back. A "row" is an operand's free axes (in the output, not in the other
    operand), e.g. one decode token. XLA:CPU (jax 0.10.2) rewrites a one-row dot with an int8
    or bfloat16 operand into float32 work on a full copy of the other: s8 weights materialised
    as int32 (1.5 ms for 768 x 3072), bf16 weights converted to float32 (in a decode loop the
    conversion is hoisted, and every step reads the float32 copy: twice the bytes; 768 x 3072
    alone: 0.35-0.86 ms at one row against 0.29-0.34 ms for two rows, whose dot is
    YNNPACK's bf16 x bf16 -> f32 fusion; float32 0.26-0.33 ms; weights not in cache, AVX512-BF16
    CPU, 2 cores). float32 dots are left alone: their one-row kernel is the fast one."""
    a_axes, b_axes = spec.split("->")[0].split(",")
    out = spec.split("->")[1]
    for axes, other, operand in ((a_axes, b_axes, a), (b_axes, a_axes, b)):
        free = [i for i, c in enumerate(axes) if c in out and c not in other]
        if free and all(operand.shape[i] == 1 for i in free):
            padded = jnp.concatenate([operand, jnp.zeros_like(operand)], axis=free[0])
            y = product(padded, b) if operand is a else product(a, padded)
            return jax.lax.slice_in_dim(y, 0, 1, axis=out.index(axes[free[0]]))
    return product(a, b)


def group_shape(shape: tuple[int, ...], axis: int, group_size: int) -> tuple[int, ...]:
    """`shape` with `axis` split into blocks of `group_size`: that axis becomes the block count
    (the shape of a per-block scale)."""
    if shape[axis] % group_size:
        raise ValueError(f"quant_group_size={group_size} does not divide axis {axis} of {shape}")
    return shape[:axis] + (shape[axis] // group_size,) + shape[axis + 1:]


def quantize_int8_groups(w: jax.Array, axis: int,
                         group_size: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization per block of `group_size` consecutive entries along `axis`
    (llama.cpp Q8_0's 32-wide blocks): q has w's shape, the float32 scale `group_shape`'s."""
    blocks = w.reshape(w.shape[:axis] + (w.shape[axis] // group_size, group_size)
                       + w.shape[axis + 1:])
    q, scale = quantize_int8(blocks, axis + 1)
    return q.reshape(w.shape), jnp.squeeze(scale, axis + 1)


def _laid_out(a: jax.Array, a_axes: str, target_axes: str) -> jax.Array:
    """a (einsum letters a_axes) transposed and padded with size-1 axes to broadcast against
    target_axes."""
    order = [c for c in target_axes if c in a_axes]
    a = jnp.transpose(a, [a_axes.index(c) for c in order])
    return a.reshape([a.shape[order.index(c)] if c in a_axes else 1 for c in target_axes])


def int8_group_dot(spec: str, x: jax.Array, kernel: jax.Array, scale: jax.Array,
                   group_size: int) -> jax.Array:
    """`einsum(spec, x, dequantized kernel)` (float32) for an int8 kernel with a float32 scale
    per block of `group_size` along the axis x contracts last (`quantize_int8_groups`): x is
    quantized per token and block (llama.cpp quantizes activations to Q8_0 blocks too), each
    block is an s8 x s8 -> s32 dot (the blocks a batch axis; for a few rows one block-diagonal
    dot, `_block_diagonal_dot`), and the per-block products are scaled by both scales and summed
    in float32. No float copy of the kernel."""
    inputs, out = spec.split("->")
    x_axes, k_axes = inputs.split(",")
    rows = int(np.prod([n for ch, n in zip(x_axes, x.shape) if ch in out]))
    if rows <= _BLOCK_DIAGONAL_ROWS:
        return _block_diagonal_dot(spec, x, kernel, scale, group_size)
    c, b = x_axes[-1], next(ch for ch in "zyxwvutsrq" if ch not in spec)  # b: the block axis
    xg_axes, kg_axes = x_axes[:-1] + b + c, k_axes.replace(c, b + c)
    blocks = x.shape[-1] // group_size
    xg = x.reshape(x.shape[:-1] + (blocks, group_size))
    ci = k_axes.index(c)
    kg = kernel.reshape(kernel.shape[:ci] + (blocks, group_size) + kernel.shape[ci + 1:])
    x_q, x_scale = quantize_int8(xg, -1)
    y_axes = x_axes[:-1] + b + "".join(ch for ch in k_axes if ch not in x_axes)
    # (No one-row padding as in int8_dot: one row takes _block_diagonal_dot above.)
    y = jnp.einsum(f"{xg_axes},{kg_axes}->{y_axes}", x_q, kg, preferred_element_type=jnp.int32)
    y = (y.astype(jnp.float32) * _laid_out(x_scale[..., 0], x_axes[:-1] + b, y_axes)
         * _laid_out(scale, k_axes.replace(c, b), y_axes))
    return jnp.einsum(f"{y_axes}->{out}", y)


# Up to this many rows (decode steps, short prompts) the blocks are rows of one plain s8 dot
# instead of a batch of small dots. Measured, x [rows, 768] @ [768, 3072] in blocks of 32, load
# ~9 on 2 cores: 1 row 7.1 -> 0.85 ms (per-channel int8 0.23-0.48, f32 0.47-1.0 in the same
# runs), 8 rows 25.6 -> 15.8 ms, 32 rows 85.7 -> 51.9 ms; beyond that it is unmeasured, and the
# block-diagonal form's G-fold multiply-adds grow with the rows.
_BLOCK_DIAGONAL_ROWS = 32


def _block_diagonal_dot(spec, x, kernel, scale, group_size):
    """int8_group_dot for a few rows: x's blocks laid out block-diagonally, [rows, G, D] (row
    g holds block g, zeros elsewhere), so one plain s8 dot with the whole kernel gives every
    block's partial product [rows, G, F] (G times the multiply-adds, in one fast dot).
    Needs x's contracted axes trailing and the kernel's together at its front or back (the
    Projection and tied-logits specs)."""
    inputs, out = spec.split("->")
    x_axes, k_axes = inputs.split(",")
    contracted = "".join(ch for ch in x_axes if ch not in out)
    lead, k_free = x_axes[:-len(contracted)], "".join(ch for ch in k_axes if ch not in x_axes)
    front = k_axes.startswith(contracted)
    assert x_axes.endswith(contracted) and out == lead + k_free and (
        front or k_axes.endswith(contracted)), spec
    lead_shape = x.shape[:len(lead)]
    d_in = int(np.prod(x.shape[len(lead):]))
    blocks, f_out = d_in // group_size, kernel.size // d_in
    x_q, x_scale = quantize_int8(x.reshape(lead_shape + (blocks, group_size)), -1)
    eye = jnp.eye(blocks, dtype=jnp.int8)[:, :, None]
    x_bd = (x_q[..., None, :, :] * eye).reshape(lead_shape + (blocks, d_in))
    if front:
        y = jnp.einsum("...gd,df->...gf", x_bd, kernel.reshape(d_in, f_out),
                       preferred_element_type=jnp.int32)
        scale_gf = scale.reshape(blocks, f_out)
    else:
        y = jnp.einsum("...gd,fd->...gf", x_bd, kernel.reshape(f_out, d_in),
                       preferred_element_type=jnp.int32)
        scale_gf = scale.reshape(f_out, blocks).T
    y = (y.astype(jnp.float32) * x_scale * scale_gf).sum(-2)
    return y.reshape(lead_shape + kernel.shape[len(contracted):] if front
                     else lead_shape + kernel.shape[:-len(contracted)])


def dequantize_groups(q: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
    """float32 q * scale for per-block scales along `axis` (`quantize_int8_groups`'s inverse)."""
    group_size = q.shape[axis] // scale.shape[axis]
    return q.astype(jnp.float32) * jnp.repeat(scale, group_size, axis=axis)


def int8_matmul(spec: str, x: jax.Array, kernel: jax.Array, scale: jax.Array,
                dtype: Any = None, group_size: int = 0) -> jax.Array:
    """`einsum(spec, x, kernel * scale)` for an int8 `kernel` and its float32 `scale` per output
    channel (broadcast against the result's trailing axes): `int8_dot`, then the scale, so no
    float copy of the kernel is ever made in the forward pass. float32 result. With
    `group_size` > 0 the scale is per block of input channels too (`int8_group_dot`).

    Differentiable in x (QLoRA-style training: adapters on a frozen int8 base) with a
    straight-through estimator: the per-token rounding of x counts as the identity, so
    dx = (dy * scale) @ kernel^T, the float dot's gradient on the dequantized kernel (the kernel
    and scale themselves are frozen: zero gradients). The backward converts the kernel to
    float32 for that dot (XLA:CPU has no mixed int8 dot, see int8_dot), one kernel at a time;
    quantizing dy instead would round the logits' small softmax terms to zero.
    """
    del dtype  # the dot is integer whatever the compute dtype
    return _int8_matmul(spec, jnp.dtype(x.dtype).name, group_size, x, kernel, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _int8_matmul(spec, x_dtype, group_size, x, kernel, scale):
    del x_dtype  # the cotangent's dtype (a static name: dtypes are not residuals)
    if group_size:
        return int8_group_dot(spec, x, kernel, scale, group_size)
    return int8_dot(spec, x, kernel) * scale


def _int8_matmul_fwd(spec, x_dtype, group_size, x, kernel, scale):
    return _int8_matmul(spec, x_dtype, group_size, x, kernel, scale), (kernel, scale)


def _int8_matmul_bwd(spec, x_dtype, group_size, residuals, dy):
    kernel, scale = residuals
    inputs, out = spec.split("->")
    x_axes, kernel_axes = inputs.split(",")
    if group_size:  # the straight-through gradient of the dequantized kernel
        kernel_f = dequantize_groups(kernel, scale, kernel_axes.index(x_axes[-1]))
        dx = jnp.einsum(f"{out},{kernel_axes}->{x_axes}", dy.astype(jnp.float32), kernel_f)
    else:
        dx = jnp.einsum(f"{out},{kernel_axes}->{x_axes}", dy.astype(jnp.float32) * scale,
                        kernel.astype(jnp.float32))
    return (dx.astype(x_dtype), np.zeros(kernel.shape, jax.dtypes.float0),
            jnp.zeros_like(scale))


_int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)


def input_major_permutations(stored: dict, wanted: dict) -> dict:
    """How to read an int8 params tree written before 2026-12-02, whose Projection kernels (and
    per-block scales) were stored input-major, in_shape + out_shape: {flat path: the axis
    permutation that makes the stored array the output-major one the model declares}. Empty when
    the tree is stored as declared, or differs otherwise (the restore then names the mismatch).
    `stored` and `wanted`: {flat path: shape}; an int8 kernel is a 'kernel' with a 'scale'
    beside it. One kernel tells: a query kernel [D, H, K] never equals its [H, K, D], even when
    a square [D, D] one does (those are transposed too)."""
    kernels = [p for p in wanted if p[-1] == "kernel" and p[:-1] + ("scale",) in wanted]
    if all(tuple(stored.get(p, ())) == tuple(wanted[p]) for p in kernels):
        return {}
    perms = {}
    for path in kernels:
        shape, want = tuple(stored.get(path, ())), tuple(wanted[path])
        splits = [k for k in range(1, len(shape)) if shape[k:] + shape[:k] == want]
        if len(splits) != 1:
            return {}
        k = splits[0]  # the number of input axes
        perms[path] = tuple(range(k, len(shape))) + tuple(range(k))
        scale = path[:-1] + ("scale",)
        if len(wanted[scale]) == len(shape):  # per-block scales: laid out as their kernel
            perms[scale] = perms[path]
    return perms


class Int8Embed(nn.Module):
    """The token embedding [V, D] stored as int8 with a float32 scale per vocabulary row (the
    output channel of the tied logits): the parameters `embedding` and `scale` of nn.Embed's
    place. Frozen (no gradient to the table); the tied logits pass gradients to their input."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab", "embed")),
            (cfg.vocab_size, cfg.embed_dim), jnp.int8)
        g = cfg.quant_group_size  # 0: a scale per row; else per row and block of g: [V, D / g]
        self.scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                  ("vocab", "embed") if g else ("vocab",)),
            group_shape((cfg.vocab_size, cfg.embed_dim), 1, g) if g else (cfg.vocab_size,),
            jnp.float32)

    def __call__(self, tokens_BxL):
        rows_BxLxD = jnp.take(self.embedding, tokens_BxL, axis=0).astype(jnp.float32)
        scale_BxLxG = jnp.take(self.scale, tokens_BxL, axis=0)
        if self.config.quant_group_size:
            rows_BxLxD = dequantize_groups(rows_BxLxD, scale_BxLxG, -1)
        else:
            rows_BxLxD = rows_BxLxD * scale_BxLxG[..., None]
        return rows_BxLxD.astype(self.config.dtype)

    def attend(self, x_BxLxD):
        """Tied logits [B, L, V]: x @ embedding.T, scaled per vocabulary row (and block)."""
        return int8_matmul("bld,vd->blv", x_BxLxD, self.embedding, self.scale,
                           group_size=self.config.quant_group_size)
