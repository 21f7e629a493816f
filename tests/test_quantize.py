"""bfloat16 and int8 inference weights, the int8 KV cache (lmjax/quantize.py), against NumPy's
quantization arithmetic, the float model's logits, transformers (export) and the compiled HLO."""
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from lmjax import hf, int8, quantize, sample
from lmjax import attention as attention_lib
from lmjax import model as model_lib
from lmjax.commands import common
from lmjax.config import ModelConfig

# Tiny models with sizes that no activation or cache of the tests shares (for the HLO test).
LLAMA = ModelConfig(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=48,
                    mlp_dim=104, max_len=64, position="rope", norm="rmsnorm", mlp="swiglu",
                    bias=False, tie_embeddings=False)
GPT2 = ModelConfig(vocab_size=97, num_layers=2, num_heads=4, embed_dim=48, mlp_dim=104,
                   max_len=64)
PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [60, 1, 33]]
GREEDY = sample.SamplingConfig(max_new_tokens=24, temperature=0.0)


def random_params(config, seed=0):
    """NumPy-drawn params (norm scales around 1, the rest spread 0.15: peaked logits)."""
    shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(
        ("scale" in jax.tree_util.keystr(path)) + 0.15 * rng.standard_normal(s.shape), s.dtype),
        shapes)


def numpy_q8(w: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp Q8_0's rule per output channel: d = max|w| / 127, q = round(w / d)."""
    d = np.abs(w).max(axis=axes, keepdims=True) / 127
    return np.clip(np.round(w / np.where(d == 0, 1, d)), -127, 127).astype(np.int8), d


def assert_int8_close(ours, expected):
    """Equal, but for a rare 1 where x / d lands on a rounding boundary (XLA may divide as a
    multiplication by 1 / d)."""
    diff = np.abs(np.asarray(ours).astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def logits(config, params, tokens):
    return np.asarray(jax.jit(model_lib.Transformer(config).apply)({"params": params},
                                                                     jnp.asarray(tokens)))


def input_major(q: np.ndarray, n_out: int) -> np.ndarray:
    """An int8 kernel stored output-major (out_shape + in_shape, `n_out` output axes) in the
    float kernel's layout, in_shape + out_shape."""
    return np.transpose(q, tuple(range(n_out, q.ndim)) + tuple(range(n_out)))


def dequantized_in_numpy(qparams):
    """The float params q * d, computed in NumPy from the int8 tree (the reference): a kernel
    [out.., in..] with its scale [out..] becomes the float kernel [in.., out..]."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(qparams).items()}
    out = {}
    for path, leaf in flat.items():
        if leaf.dtype == np.int8:
            scale = flat[path[:-1] + ("scale",)]
            w = leaf.astype(np.float32) * scale.reshape(scale.shape + (1,) * (
                leaf.ndim - scale.ndim))
            out[path] = w if path[-2:] == ("embed", "embedding") else input_major(w, scale.ndim)
        elif not (path[-1] == "scale" and (path[:-1] + ("kernel",) in flat
                                           or path[:-1] == ("embed",))):
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_int8_matches_numpy_quantization_and_float_logits(config):
    params = random_params(config)
    qparams, qconfig = quantize.quantize(params, config)
    assert qconfig.quantization == "int8"
    flat, qflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(qparams)
    kernels = [p for p in qflat if qflat[p].dtype == jnp.int8]
    # Every projection and the embedding is int8; nothing else.
    assert sorted("/".join(p[-3:-1]) for p in kernels if p[0] == "blocks_0") == sorted(
        f"{m}/{n}" for m, names in (("attn", ("query", "key", "value", "out")),
                                    ("mlp", ("gate", "up", "proj") if config.mlp == "swiglu"
                                     else ("fc", "proj"))) for n in names)
    assert ("embed", "embedding") in kernels
    assert (("lm_head", "kernel") in kernels) == (not config.tie_embeddings)
    # Kernels are stored output-major, out_shape + in_shape (the embedding [V, D] as it was).
    H, K, D = config.num_heads, config.head_size, config.embed_dim
    assert qflat[("blocks_0", "attn", "query", "kernel")].shape == (H, K, D)
    assert qflat[("blocks_0", "attn", "out", "kernel")].shape == (D, H, K)
    assert qflat[("blocks_0", "mlp", "proj", "kernel")].shape == (D, config.mlp_dim)
    for path in kernels:
        w = np.asarray(flat[path])
        axes = (1,) if path[-2:] == ("embed", "embedding") else (
            (0, 1) if path[-2] == "out" else (0,))
        q, d = numpy_q8(w, axes)
        stored = np.asarray(qflat[path])
        assert_int8_close(stored if axes == (1,) else input_major(stored, w.ndim - len(axes)), q)
        np.testing.assert_allclose(np.asarray(qflat[path[:-1] + ("scale",)]), d.squeeze(axes),
                                   rtol=1e-6)
    # The int8 model stays close to the float model of the same weights, and to that of the
    # dequantized weights q * d (computed in NumPy).
    tokens = np.array([PROMPTS[0] * 4])
    ours = logits(qconfig, qparams, tokens)
    dequantized = logits(config, dequantized_in_numpy(qparams), tokens)
    assert np.abs(ours - dequantized).max() <= 0.05 * np.abs(dequantized).max()
    reference = logits(config, params, tokens)
    assert np.abs(reference).max() > 2  # peaked logits: the comparison means something
    # (measured: 6.6% / 2.3% of the largest logit for these llama / gpt2 models; weight-only
    # rounding alone 4.4% / 1.4%)
    assert np.abs(ours - reference).max() <= 0.08 * np.abs(reference).max()
    # Perplexity of these (arbitrary) tokens, int8 vs float: within 2% (measured 1.5% / 0.2%
    # at a perplexity of ~160; the 1% goal on trained models: benchmarks/quantize_quality.py).
    def nll(logits_BxLxV):
        lp = jax.nn.log_softmax(logits_BxLxV[:, :-1], -1)
        return -np.take_along_axis(np.asarray(lp), tokens[:, 1:, None], -1).mean()
    assert abs(np.exp(nll(ours) - nll(reference)) - 1) < 0.02


@pytest.mark.parametrize("spec,x_shape,y_shape", [
    ("abd,hkd->abhk", (1, 1, 40), (4, 10, 40)),  # one decode row (padded to two inside)
    ("abd,hd->abh", (2, 3, 40), (104, 40)),  # output-major, as the model stores kernels
    ("abd,dh->abh", (2, 3, 40), (40, 104)),
    ("xqk,xsk->xqs", (4, 2, 10), (4, 64, 10)),  # attention over an int8 cache
])
def test_int8_dot_is_numpy_dynamic_quantization(spec, x_shape, y_shape):
    """int8_dot == NumPy's per-row dynamic quantization of x (PyTorch's quantize_dynamic rule)
    times the int8 operand, exactly in int32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = rng.integers(-127, 128, y_shape).astype(np.int8)
    x_axes, out = spec.split("->")[0].split(",")[0], spec.split("->")[1]
    axes = tuple(i for i, c in enumerate(x_axes) if c not in out)
    x_q, x_scale = numpy_q8(x, axes)
    expected = np.einsum(spec, x_q.astype(np.int64), y.astype(np.int64)).astype(np.float32)
    kept = [c for c in x_axes if c in out]
    x_scale = np.expand_dims(x_scale.reshape([x.shape[x_axes.index(c)] for c in kept]),
                             [i for i, c in enumerate(out) if c not in kept])
    np.testing.assert_allclose(np.asarray(int8.int8_dot(spec, jnp.asarray(x), jnp.asarray(y))),
                               expected * x_scale, rtol=1e-6)


@pytest.mark.parametrize("spec,x_shape,kernel_shape,scale_shape", [
    ("abd,hkd->abhk", (2, 3, 40), (4, 10, 40), (4, 10)),  # query/key/value, output-major
    ("abhk,dhk->abd", (2, 3, 4, 10), (40, 4, 10), (40,)),  # out
    ("bld,vd->blv", (2, 3, 40), (104, 40), (104,)),  # tied logits: a scale per vocabulary row
])
def test_int8_matmul_gradient_is_straight_through(spec, x_shape, kernel_shape, scale_shape):
    """QLoRA's backward: the vjp of int8_matmul is NumPy's float dot gradient on the
    dequantized kernel, dx = (dy * scale) @ kernel^T (the activation rounding passed straight
    through); its value is int8_dot's times the scale."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.integers(-127, 128, kernel_shape).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, scale_shape).astype(np.float32)
    y, vjp = jax.vjp(lambda x_: int8.int8_matmul(spec, x_, jnp.asarray(kernel),
                                                 jnp.asarray(scale)), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(
        int8.int8_dot(spec, jnp.asarray(x), jnp.asarray(kernel))) * scale, rtol=1e-6)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(dy))
    (x_axes, k_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    # the scale belongs to the kernel's output channel: its leading axes (output-major)
    dequantized = kernel * scale.reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
    expected = np.einsum(f"{out_axes},{k_axes}->{x_axes}", dy.astype(np.float64),
                         dequantized.astype(np.float64))
    np.testing.assert_allclose(np.asarray(dx), expected, rtol=1e-5, atol=1e-5)


def float_agreement(params, config, prompt, new_tokens) -> float:
    """How often the float model's argmax is the token decoded (teacher-forced on that text,
    so one early difference does not make every later token differ)."""
    text = np.array([list(prompt) + list(new_tokens)])
    predicted = logits(config, params, text[:, :-1]).argmax(-1)[0, len(prompt) - 1:]
    return float((predicted == text[0, len(prompt):]).mean())


def _float_copies(hlo: str, sizes: set[int], dtypes: str = "f32|bf16|f16|s32") -> list[str]:
    """Instructions outside fused computations whose result (of `dtypes`) has as many elements
    as a quantized weight: a float copy of that weight made per call."""
    found, fused = [], False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation's header
            fused = "fused" in line.split("(")[0] or "fusion" in line.split(" ")[0]
        match = re.match(rf"\s+(?:ROOT )?\S+ = ({dtypes})\[([\d,]*)\]", line)
        if match and not fused and match.group(2):
            if int(np.prod([int(n) for n in match.group(2).split(",")])) in sizes:
                found.append(line.strip()[:200])
    return found


def _loop_bodies(hlo: str) -> str:
    """The text of the computations that while loops run as their bodies (the decode steps)."""
    bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo))
    keep, text = False, []
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation's header, or its closing brace
            keep = line.lstrip("%").split(" ")[0] in bodies or (keep and line == "}")
        if keep:
            text.append(line)
    return "\n".join(text)


def _s8_relayouts(hlo: str, sizes: set[int]) -> list[str]:
    """Transposes and copies, fused or not, whose int8 result has as many elements as a
    quantized weight: the int8 weight laid out anew per call (XLA does so to a kernel with
    several output axes unless the dot sees it as [out, in], see model.Projection)."""
    found = []
    for line in hlo.splitlines():
        match = re.match(r"\s+(?:ROOT )?\S+ = s8\[([\d,]*)\]\S* (transpose|copy)\(", line)
        if match and match.group(1) and int(np.prod(
                [int(n) for n in match.group(1).split(",")])) in sizes:
            found.append(line.strip()[:200])
    return found


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_int8_decoding_reads_int8_and_agrees_with_float(kv_cache_dtype):
    """The compiled decode program (prefill + while loop, as `generate` runs it) takes the int8
    arrays as they are: no instruction outside a fusion makes a full-size float (or int32) copy
    of a quantized weight, nor of an int8 KV cache, and no instruction at all transposes or
    copies one as int8 (the kernels are stored output-major, as the s8 dot reads them). Its greedy tokens are the float model's
    argmax >= 80% of the time (this random model; trained ones: quantize_quality.py)."""
    params = random_params(LLAMA)
    qparams, qconfig = quantize.quantize(params, dataclasses.replace(
        LLAMA, kv_cache_dtype=kv_cache_dtype))
    prompt, lengths, fitted = sample.prepare_prompts(PROMPTS, qconfig, GREEDY)
    phases = sample.cache_phases(prompt.shape[1], fitted.max_new_tokens, qconfig.max_len)
    compiled = sample._sample_jit.lower(qparams, prompt, lengths, jax.random.key(0),
                                        model_config=qconfig, sampling=fitted,
                                        phases=phases).compile()
    hlo = compiled.as_text()
    sizes = {int(x.size) for x in jax.tree.leaves(qparams) if x.dtype == jnp.int8}
    if kv_cache_dtype == "int8":  # the cache [B * G, T, K] of each phase
        sizes |= {len(PROMPTS) * LLAMA.kv_heads * T * LLAMA.head_size for T in phases}
        assert re.search(rf"s8\[{len(PROMPTS) * LLAMA.kv_heads},{phases[0]},", hlo)
    assert re.search(r"s8\[4,12,48\]", hlo)  # the int8 query kernel [H, K, D] is an input
    assert not _float_copies(hlo, sizes), _float_copies(hlo, sizes)[:5]
    assert not _s8_relayouts(hlo, sizes), _s8_relayouts(hlo, sizes)[:5]
    tokens = np.asarray(compiled(qparams, prompt, lengths, jax.random.key(0))[0])
    agreement = [float_agreement(params, LLAMA, p, tokens[row]) for row, p in enumerate(PROMPTS)]
    assert min(agreement) >= 0.8, agreement  # random weights have near-ties (measured 0.875)
    if kv_cache_dtype == "auto":  # beam search runs on int8 weights too
        beams = sample.generate(qparams, qconfig, PROMPTS, sample.SamplingConfig(
            max_new_tokens=8, num_beams=3))
        assert beams.tokens.shape == (2, 8)


def test_int8_kv_cache_matches_float_cache():
    """Keys and values stored int8 with a scale per token and KV head: the cached logits stay
    within 1% of the float cache's, and decoding agrees."""
    params = random_params(LLAMA)
    kv8 = quantize.with_int8_kv_cache(LLAMA)
    tokens = jnp.asarray([PROMPTS[0] * 2, PROMPTS[0][::-1] * 2])  # [2, 14]

    def prefill(config):
        cache = attention_lib.init_kv_cache(config, 2, 64)
        return jax.jit(model_lib.Transformer(config).apply)(
            {"params": params}, tokens, kv_cache=cache, cache_index=0)
    float_logits, float_cache = prefill(LLAMA)
    cached, cache = prefill(kv8)
    assert cache[1]["v"].dtype == jnp.int8 and cache[0]["k_scale"].shape == (2 * 2, 64, 1)
    # The cache holds NumPy's per-(token, head) quantization of the float keys and values.
    for name in ("k", "v"):
        q, d = numpy_q8(np.asarray(float_cache[0][name][:, :14]), 2)
        assert_int8_close(cache[0][name][:, :14], q)
        np.testing.assert_allclose(np.asarray(cache[0][f"{name}_scale"][:, :14]), d, rtol=1e-6)
    assert np.abs(np.asarray(cached) - float_logits).max() <= 0.03 * np.abs(float_logits).max()


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_bfloat16_decoding_of_one_row_makes_no_float32_copy(config):
    """One prompt (one row per decode step): the compiled decode step makes no float32 copy
    of a bfloat16 weight (XLA:CPU converts the weights of a one-row bf16 dot to float32 unless
    the row is padded to two, int8.one_row_as_two), and decodes the float model's tokens.
    (Outside the loop XLA:CPU upcasts the embedding tables once per call for their gathers:
    bf16 gathers are float32 on that backend; a step reads one row of them.)"""
    params = random_params(config)
    bparams, bconfig = quantize.convert(params, config, "bfloat16")
    prompt, lengths, fitted = sample.prepare_prompts(PROMPTS[:1], bconfig, GREEDY)
    phases = sample.cache_phases(prompt.shape[1], fitted.max_new_tokens, bconfig.max_len)
    compiled = sample._sample_jit.lower(bparams, prompt, lengths, jax.random.key(0),
                                        model_config=bconfig, sampling=fitted,
                                        phases=phases).compile()
    sizes = {int(x.size) for x in jax.tree.leaves(bparams) if x.size >= config.embed_dim ** 2}
    steps = _loop_bodies(compiled.as_text())
    assert "dot(" in steps or "ynn_fusion" in steps  # the body is found
    copies = [line for line in _float_copies(steps, sizes, "f32|f16|s32")
              if "get-tuple-element(" not in line]  # the loop's carried values are not copies
    assert not copies, copies[:5]
    tokens = np.asarray(compiled(bparams, prompt, lengths, jax.random.key(0))[0])
    assert float_agreement(params, config, PROMPTS[0], tokens[0]) >= 0.8


def test_bfloat16_weights_are_stored_and_computed_in_bfloat16():
    params = random_params(GPT2)
    bparams, bconfig = quantize.convert(params, GPT2, "bfloat16")
    assert (bconfig.param_dtype, bconfig.dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bparams)} == {jnp.dtype(jnp.bfloat16)}
    assert quantize.weight_bytes(bparams) * 2 == quantize.weight_bytes(params)
    tokens = np.array([PROMPTS[0] * 3])
    reference = logits(GPT2, params, tokens)
    assert np.abs(logits(bconfig, bparams, tokens) - reference).max() <= 0.03 * np.abs(
        reference).max()
    with pytest.raises(ValueError, match="weights_dtype='int4' is not one of float32, "
                                         "bfloat16, int8"):
        quantize.convert(params, GPT2, "int4")


def test_quantized_checkpoint_loads_without_float_weights_and_exports_to_hf(tmp_path):
    """export_quantized -> a params-only folder of int8 arrays (~4x smaller on disk) that
    load_params / load_model restore as int8; save_hf writes the dequantized float model
    (transformers' logits = lmjax's float model of NumPy's q * d)."""
    from lmjax import tokenizers
    config = dataclasses.replace(LLAMA, vocab_size=259, embed_dim=64, mlp_dim=192)
    params = random_params(config)
    tokenizer = tokenizers.ByteTokenizer()
    quantize.export_quantized(str(tmp_path / "int8"), params, config, tokenizer)
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path / "int8")
               for f in files)
    # The float32 arrays alone weigh 2.76x the whole int8 folder (Orbax metadata, the configs,
    # the tokenizer and float norms weigh at this size; lmjax quantize on GPT-2 124M: README).
    assert quantize.weight_bytes(params) / disk > 2.6, quantize.weight_bytes(params) / disk
    qparams, qconfig, _ = common.load_model(str(tmp_path / "int8"), None, "float32")
    assert qconfig.quantization == "int8"
    assert qparams["blocks_1"]["mlp"]["up"]["kernel"].dtype == jnp.int8
    expected, _ = quantize.quantize(params, config)
    for a, b in zip(jax.tree.leaves(qparams), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # load_model converts at load: the same folder as bfloat16 or float32.
    bparams, bconfig, _ = common.load_model(str(tmp_path / "int8"), None, "float32",
                                            weights_dtype="bfloat16")
    assert bconfig.quantization == "none" and bparams["embed"]["embedding"].dtype == jnp.bfloat16
    # To Hugging Face: float32 tensors of q * d.
    hf.save_hf(str(tmp_path / "hf"), qconfig, qparams)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = np.array([PROMPTS[0] * 3])
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits(config, dequantized_in_numpy(qparams), tokens), theirs,
                               atol=2e-4, rtol=1e-4)


# Head size 32 and every input axis a multiple of 32: Q8_0-sized blocks of input channels.
LLAMA_G = dataclasses.replace(LLAMA, embed_dim=96, num_heads=3, num_kv_heads=3, mlp_dim=160)


def numpy_q8_blocks(w: np.ndarray, axis: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp Q8_0 per block of g consecutive entries along `axis`: (q like w, d with that
    axis n / g long)."""
    blocks = w.reshape(w.shape[:axis] + (w.shape[axis] // g, g) + w.shape[axis + 1:])
    q, d = numpy_q8(blocks, axis + 1)
    return q.reshape(w.shape), d.squeeze(axis + 1)


@pytest.mark.parametrize("config", [LLAMA_G, dataclasses.replace(
    GPT2, embed_dim=96, num_heads=3, mlp_dim=160)], ids=["llama", "gpt2"])
def test_int8_group_scales_match_numpy_q8_0_blocks(config):
    """weights_dtype='int8_g32': every kernel's blocks of 32 along its last input axis (the
    embedding's D) are NumPy's Q8_0 blocks; the model's logits are those of the NumPy-dequantized
    weights (up to the activations' rounding), and closer to the float model's than per channel."""
    params = random_params(config)
    qparams, qconfig = quantize.convert(params, config, "int8_g32")
    assert (qconfig.quantization, qconfig.quant_group_size) == ("int8", 32)
    flat, qflat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(qparams)
    kernels = [p for p in qflat if qflat[p].dtype == jnp.int8]
    assert len(kernels) == (7 if config.mlp == "swiglu" else 6) * config.num_layers + 1 + (
        not config.tie_embeddings)
    dequantized = {}
    for path in kernels:
        w = np.asarray(flat[path])
        axis = 1 if path[-2:] == ("embed", "embedding") else 1 if path[-2] == "out" else 0
        q, d = numpy_q8_blocks(w, axis, 32)
        stored, stored_d = (np.asarray(qflat[p]) for p in (path, path[:-1] + ("scale",)))
        if path[-2:] != ("embed", "embedding"):  # output-major: [out.., in..] as [in.., out..]
            n_out = w.ndim - (2 if path[-2] == "out" else 1)
            stored, stored_d = input_major(stored, n_out), input_major(stored_d, n_out)
        assert_int8_close(stored, q)
        np.testing.assert_allclose(stored_d, d, rtol=1e-6)
        dequantized[path] = q.astype(np.float32) * np.repeat(d, 32, axis=axis)
    float_params = traverse_util.unflatten_dict(
        {p: dequantized.get(p, v) for p, v in flat.items()})
    np.testing.assert_allclose(  # dequantize() is q * d too
        np.asarray(traverse_util.flatten_dict(quantize.dequantize(qparams, qconfig)[0])[
            ("embed", "embedding")]), dequantized[("embed", "embedding")], rtol=1e-6)
    tokens = np.array([PROMPTS[0] * 4])
    ours = logits(qconfig, qparams, tokens)
    ours_dequantized = logits(config, float_params, tokens)
    assert np.abs(ours - ours_dequantized).max() <= 0.05 * np.abs(ours_dequantized).max()
    reference = logits(config, params, tokens)
    assert np.abs(ours - reference).max() <= 0.08 * np.abs(reference).max()
    # Blocks of 32 round the weights less than whole channels (squared error, every kernel;
    # measured 0.72x for both: the channels are only 96-160 long).
    per_channel = traverse_util.flatten_dict(dequantized_in_numpy(quantize.quantize(params,
                                                                                    config)[0]))
    assert sum(((dequantized[p] - flat[p]) ** 2).sum() for p in kernels) < 0.9 * sum(
        ((per_channel[p] - flat[p]) ** 2).sum() for p in kernels)
    # The compiled decode program (KV cache, one-row steps) makes no float copy of a kernel
    # (one prompt: 2 x 16 prefill tokens x 3 blocks of the per-block products would be a
    # [96, 96] kernel's size).
    prompt, lengths, fitted = sample.prepare_prompts(PROMPTS[:1], qconfig, GREEDY)
    compiled = sample._sample_jit.lower(
        qparams, prompt, lengths, jax.random.key(0), model_config=qconfig, sampling=fitted,
        phases=sample.cache_phases(prompt.shape[1], fitted.max_new_tokens, qconfig.max_len)
    ).compile()
    sizes = {int(x.size) for x in jax.tree.leaves(qparams) if x.dtype == jnp.int8}
    assert not _float_copies(compiled.as_text(), sizes), _float_copies(compiled.as_text(), sizes)
    assert not _s8_relayouts(compiled.as_text(), sizes), _s8_relayouts(compiled.as_text(), sizes)
    tokens_out = np.asarray(compiled(qparams, prompt, lengths, jax.random.key(0))[0])
    assert tokens_out.shape == (1, GREEDY.max_new_tokens)


@pytest.mark.parametrize("spec,x_shape,kernel_shape", [
    ("abd,hkd->abhk", (1, 1, 40), (4, 10, 40)),  # one decode row, output-major query
    ("abhk,dhk->abd", (2, 3, 4, 16), (24, 4, 16)),  # out: blocks along the head's K
    ("bld,vd->blv", (2, 3, 40), (104, 40)),  # tied logits: blocks along D of [V, D]
    ("abd,hd->abh", (3, 12, 40), (24, 40)),  # 36 rows: a batch of per-block dots
    ("abhk,dhk->abd", (3, 12, 4, 16), (24, 4, 16)),
    ("abd,dh->abh", (3, 12, 40), (40, 24)),  # input-major: the dot takes any layout
    ("bld,vd->blv", (3, 12, 40), (104, 40)),
])
def test_int8_group_matmul_is_numpy_blockwise_dot(spec, x_shape, kernel_shape):
    """int8_matmul(group_size=8) == NumPy: x quantized per row and block of 8, each block's
    product exact in int64, times x's and the kernel's block scales, summed; its gradient is
    the float dot's on the dequantized kernel (straight through)."""
    g, rng = 8, np.random.default_rng(2)
    (x_axes, k_axes), out_axes = spec.split("->")[0].split(","), spec.split("->")[1]
    axis = k_axes.index(x_axes[-1])
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.integers(-127, 128, kernel_shape).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, int8.group_shape(kernel_shape, axis, g)).astype(np.float32)
    x_q, x_d = numpy_q8_blocks(x, x.ndim - 1, g)
    c = x_axes[-1]
    xb = x_q.reshape(x.shape[:-1] + (-1, g)).astype(np.int64)
    kb = kernel.reshape(kernel_shape[:axis] + (-1, g) + kernel_shape[axis + 1:]).astype(np.int64)
    xd, kd = x_axes[:-1] + "z", k_axes.replace(c, "z")
    expected = np.einsum(f"{xd + c},{k_axes.replace(c, 'z' + c)},{xd},{kd}->{out_axes}",
                         xb.astype(np.float64), kb.astype(np.float64), x_d, scale)
    y, vjp = jax.vjp(lambda x_: int8.int8_matmul(spec, x_, jnp.asarray(kernel), jnp.asarray(
        scale), group_size=g), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dequantized = kernel * np.repeat(scale, g, axis=axis)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), np.einsum(
        f"{out_axes},{k_axes}->{x_axes}", dy, dequantized), rtol=1e-5, atol=1e-5)


def test_int8_group_checkpoint_round_trips(tmp_path):
    """An int8_g32 params folder restores its per-block scales as they were written."""
    from lmjax import checkpoint, tokenizers
    config = dataclasses.replace(LLAMA_G, vocab_size=259)
    qparams, qconfig = quantize.convert(random_params(config), config, "int8_g32")
    quantize.export_quantized(str(tmp_path / "g32"), qparams, qconfig, tokenizers.ByteTokenizer())
    loaded, loaded_config, _ = checkpoint.load_params(str(tmp_path / "g32"))
    assert loaded_config.quant_group_size == 32
    assert loaded["blocks_0"]["attn"]["out"]["scale"].shape == (96, 3, 1)  # [D, H, K / 32]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("weights_dtype", ["int8", "int8_g32"])
def test_input_major_int8_checkpoint_is_transposed_at_load(tmp_path, capsys, weights_dtype):
    """A quantized folder from lmjax before 2026-12-02 (kernels, and per-block scales,
    input-major: in_shape + out_shape) loads as today's output-major arrays, bit for bit, with a
    note naming `lmjax quantize`; square [D, D] MLP kernels (mlp_dim = embed_dim) included."""
    from lmjax import checkpoint, tokenizers
    config = dataclasses.replace(LLAMA_G, vocab_size=259, mlp_dim=96)
    qparams, qconfig = quantize.convert(random_params(config), config, weights_dtype)
    old = {}  # the old layout, made in NumPy
    for path, leaf in traverse_util.flatten_dict(qparams).items():
        leaf = np.asarray(leaf)
        kernel = path[:-1] + ("kernel",)
        if path[-1] == "kernel" and leaf.dtype == np.int8 or (
                path[-1] == "scale" and weights_dtype == "int8_g32" and path[-2] != "embed"):
            n_out = 2 if kernel[-2] in ("query", "key", "value") else 1
            leaf = input_major(leaf, n_out)
        old[path] = leaf
    old = traverse_util.unflatten_dict(old)
    assert old["blocks_0"]["attn"]["query"]["kernel"].shape == (96, 3, 32)  # [D, H, K]
    checkpoint.export_params(str(tmp_path / "old"), old, qconfig, tokenizers.ByteTokenizer())
    loaded, loaded_config, _ = checkpoint.load_params(str(tmp_path / "old"))
    assert "input-major" in capsys.readouterr().err
    assert loaded_config == qconfig
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # `lmjax quantize --workdir=OLD` loads it so (load_model), int8 as it was: rewritten new.
    again, again_config, _ = common.load_model(str(tmp_path / "old"), None, "float32",
                                               weights_dtype=weights_dtype)
    assert again_config == qconfig
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    # Today's layout loads without the note.
    quantize.export_quantized(str(tmp_path / "new"), qparams, qconfig, tokenizers.ByteTokenizer())
    checkpoint.load_params(str(tmp_path / "new"))
    assert "input-major" not in capsys.readouterr().err
