"""The Transformer against an independent NumPy forward pass, causality, counts and config errors."""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import attention as attention_lib
from lmjax import model as model_lib
from lmjax.config import ModelConfig, PRESETS, default_config, preset

GPT = dict(vocab_size=37, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=16)
LLAMA = dict(GPT, num_kv_heads=2, position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
             tie_embeddings=False)


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Parameters of `cfg`'s shapes drawn with NumPy: norm scales 1 + 0.1 N(0, 1), everything
    else (biases too) 0.1 N(0, 1)."""
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(
        ("scale" in jax.tree_util.keystr(path)) + 0.1 * rng.standard_normal(s.shape), s.dtype),
        shapes)


def forward(cfg: ModelConfig, params, tokens) -> jax.Array:
    """Logits in one compiled call (an unjitted apply dispatches op by op: several times slower)."""
    return jax.jit(model_lib.Transformer(cfg).apply)({"params": params}, jnp.asarray(tokens))


# ---------------------------------------------------------------- a NumPy reference forward pass

def _np_norm(x, p, cfg):
    if cfg.norm == "rmsnorm":
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p["scale"]
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + cfg.norm_eps) * p["scale"]
    return y + p["bias"] if cfg.bias else y


def _np_dense(x, p, contract):
    y = np.tensordot(x, p["kernel"], axes=contract)
    return y + p["bias"] if "bias" in p else y


def _np_rope(x, theta):  # x [L, N, K], rotate-half convention written out pair by pair
    L, _, K = x.shape
    out = np.empty_like(x)
    for pos in range(L):
        for i in range(K // 2):
            angle = pos / theta ** (2 * i / K)
            a, b = x[pos, :, i], x[pos, :, i + K // 2]
            out[pos, :, i] = a * np.cos(angle) - b * np.sin(angle)
            out[pos, :, i + K // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def np_forward(params, tokens, cfg: ModelConfig):
    """Logits [L, V] of one sequence, written loop by loop from the papers."""
    p = jax.tree.map(np.asarray, params)
    L, H, G, K = len(tokens), cfg.num_heads, cfg.kv_heads, cfg.head_size
    x = p["embed"]["embedding"][tokens]
    if cfg.position == "learned":
        x = x + p["pos_embed"][:L]
    for i in range(cfg.num_layers):
        b = p[f"blocks_{i}"]
        h = _np_norm(x, b["attn_norm"], cfg)
        q, k, v = (_np_dense(h, b["attn"][n], 1) for n in ("query", "key", "value"))
        if cfg.position == "rope":
            q, k = _np_rope(q, cfg.rope_theta), _np_rope(k, cfg.rope_theta)
        out = np.zeros((L, H, K))
        for head in range(H):
            kv = head // (H // G)  # grouped-query: H/G query heads share a KV head
            scores = q[:, head] @ k[:, kv].T / np.sqrt(K)
            scores = np.where(np.tril(np.ones((L, L))) > 0, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (weights / weights.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + _np_dense(out, b["attn"]["out"], 2)
        h = _np_norm(x, b["mlp_norm"], cfg)
        m = b["mlp"]
        if cfg.mlp == "swiglu":
            gate = _np_dense(h, m["gate"], 1)
            h = gate / (1 + np.exp(-gate)) * _np_dense(h, m["up"], 1)
        else:
            u = _np_dense(h, m["fc"], 1)
            h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + _np_dense(h, m["proj"], 1)
    x = _np_norm(x, p["final_norm"], cfg)
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("fields", [GPT, LLAMA, dict(GPT, num_kv_heads=1, position="rope")],
                         ids=["gpt2", "llama_gqa", "mqa_rope"])
def test_logits_match_numpy_reference(fields):
    cfg = ModelConfig(**fields)
    # Random non-zero biases and norm scales, so every term is exercised.
    params = random_params(cfg, seed=1)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]])
    logits = forward(cfg, params, tokens)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    for row in range(2):
        np.testing.assert_allclose(logits[row], np_forward(params, tokens[row], cfg),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields", [GPT, LLAMA], ids=["gpt2", "llama_gqa"])
def test_blocked_causal_attention_matches_numpy_reference(fields, monkeypatch):
    """The CPU attention in blocks of 4 queries (3 blocks for 12 tokens) vs the NumPy forward."""
    monkeypatch.setattr(attention_lib, "ATTENTION_BLOCK", 4)
    cfg = ModelConfig(**fields)
    params = random_params(cfg, seed=2)
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    logits = forward(cfg, params, tokens)
    np.testing.assert_allclose(logits[0], np_forward(params, tokens[0], cfg), atol=1e-4, rtol=1e-4)


def test_blocked_causal_attention_gradients_match_dot_product_attention():
    """Values and gradients of the blocked attention (2 blocks of 128, grouped-query) vs
    `jax.nn.dot_product_attention`, an independent implementation."""
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (2, 256, 4, 16))
    k, v = (jax.random.normal(key, (2, 256, 2, 16)) for key in keys[1:3])
    weights = jax.random.normal(keys[3], (2, 256, 4, 16))

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

    ours = jax.jit(jax.value_and_grad(loss(attention_lib.causal_attention), argnums=(0, 1, 2)))(
        q, k, v)
    reference = jax.jit(jax.value_and_grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True)), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields", [GPT, LLAMA], ids=["gpt2", "llama"])
def test_causality(fields):
    cfg = ModelConfig(**fields)
    params = random_params(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    apply = lambda t: forward(cfg, params, t)
    base = apply(tokens)
    for t in (0, 5, 14):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
        logits = apply(changed)
        np.testing.assert_array_equal(logits[:, :t + 1], base[:, :t + 1])
        assert np.abs(logits[:, t + 1:] - base[:, t + 1:]).max() > 1e-3  # later ones do change


def test_gpt2_124m_parameter_count():
    assert model_lib.num_params(preset("gpt2_124m")) == 124_439_808
    # LLaMA-2-7B shapes give the well-known 6,738,415,616 parameters.
    assert model_lib.num_params(preset("llama_7b")) == 6_738_415_616


def test_flops_per_token_formula():
    cfg = preset("gpt2_124m")
    D, Lyr, T, V = 768, 12, 1024, 50257
    matmul_params = Lyr * 12 * D * D + D * V  # 4D^2 attention + 8D^2 MLP per layer, and the head
    assert model_lib.flops_per_token(cfg, T) == 6 * matmul_params + 12 * Lyr * T * D
    assert model_lib.flops_per_token(cfg, T, training=False) == 2 * matmul_params + 4 * Lyr * T * D


def test_logical_axes_name_every_parameter():
    cfg = ModelConfig(**LLAMA)
    axes = model_lib.logical_axes(cfg)
    params = model_lib.init_params(cfg, jax.random.key(0))
    for spec, param in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(params)):
        assert len(spec) == param.ndim and all(name is not None for name in spec)
    assert tuple(axes["blocks_0"]["attn"]["key"]["kernel"]) == ("embed", "kv_heads", "head_dim")


def test_bf16_compute_with_f32_params():
    cfg = ModelConfig(**GPT, dtype="bfloat16")
    params = random_params(cfg, seed=0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = np.arange(12)[None] % cfg.vocab_size
    logits = forward(cfg, params, tokens)
    reference = np_forward(params, tokens[0], ModelConfig(**GPT))  # NumPy, float32 params
    assert logits.dtype == jnp.float32
    assert np.abs(logits[0] - reference).max() < 0.05 * np.abs(reference).max()


def _bf16(x):
    """x rounded to bfloat16, as float64 for NumPy."""
    return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("spec, shape_a, shape_b", [
    ("bld,dh->blh", (2, 3, 8), (8, 5)),  # a projection
    ("xqk,xsk->xqs", (3, 4, 8), (3, 6, 8)),  # attention scores
])
def test_mixed_precision_matmul_and_its_gradients(spec, shape_a, shape_b):
    """bf16 inputs, f32 accumulation; the gradients are the transposed products of the cotangent
    rounded to bf16, returned in each input's own dtype."""
    ka, kb, kw = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, shape_a, jnp.bfloat16)  # an activation
    b = jax.random.normal(kb, shape_b, jnp.float32)  # a float32 parameter
    out = attention_lib.matmul(spec, a, b, jnp.bfloat16)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.einsum(spec, _bf16(a), _bf16(b)), rtol=1e-5, atol=1e-5)

    w = jax.random.normal(kw, out.shape, jnp.float32)
    grad_a, grad_b = jax.grad(lambda a, b: jnp.sum(attention_lib.matmul(spec, a, b, "bfloat16") * w),
                              argnums=(0, 1))(a, b)
    assert grad_a.dtype == jnp.bfloat16 and grad_b.dtype == jnp.float32
    (spec_a, spec_b), spec_out = spec.split("->")[0].split(","), spec.split("->")[1]
    np.testing.assert_allclose(np.asarray(grad_a, np.float64),
                               _bf16(np.einsum(f"{spec_out},{spec_b}->{spec_a}", _bf16(w), _bf16(b))),
                               rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(grad_b, np.einsum(f"{spec_a},{spec_out}->{spec_b}", _bf16(a), _bf16(w)),
                               rtol=1e-5, atol=1e-5)


def test_bf16_training_gradient_matmuls_all_take_bf16_inputs():
    """The point of `matmul`'s custom gradient: in a bf16 model's loss gradient, every matmul
    (forward and backward) multiplies bf16 operands (autodiff alone gives the backward ones a
    float32 cotangent), and the gradients stay close to the float32 model's."""
    cfg = ModelConfig(**dict(GPT, dtype="bfloat16"))
    params = model_lib.init_params(cfg, jax.random.key(0))
    tokens = jnp.arange(16)[None] % cfg.vocab_size

    def loss(params, cfg):
        logits = model_lib.Transformer(cfg).apply({"params": params}, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[0, :-1, tokens[0, 1:]])

    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, cfg)
    dots = []

    def collect(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(tuple(v.aval.dtype for v in eqn.invars))
            for value in eqn.params.values():  # sub-jaxprs: scan, custom_vjp, remat, pjit
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        collect(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        collect(sub)
    collect(jaxpr.jaxpr)
    # q, k, v (one matmul over stacked kernels), out, fc, proj, 2 attention
    assert len(dots) >= 3 * (2 + 2 + 2) * cfg.num_layers
    assert set(dots) == {(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))}
    grads = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    reference = jax.jit(jax.grad(loss), static_argnums=1)(params, ModelConfig(**GPT))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, atol=0.05 * np.abs(r).max() + 1e-6)


@pytest.mark.parametrize("fields, message", [
    (dict(GPT, num_heads=5), "model.num_heads=5 must divide model.embed_dim=32"),
    (dict(GPT, num_kv_heads=3), "model.num_kv_heads=3 must divide model.num_heads=4"),
    (dict(GPT, norm="batchnorm"), "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
    (dict(GPT, position="alibi"), "model.position='alibi' is not one of learned, rope"),
    (dict(GPT, num_layers=0), "model.num_layers=0 must be a positive integer"),
    (dict(GPT, position="rope", sliding_window=8), "model.sliding_window=8 needs "
     "model.position='rope' and model.max_len=16 <= the window"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig(**fields)


def test_unknown_model_keys_and_presets():
    with pytest.raises(ValueError, match=r"unknown model config keys \['num_layer'\]"):
        ModelConfig.from_dict(dict(GPT, num_layer=3))
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        preset("gpt3")
    for name in PRESETS:  # every preset is a valid config and survives JSON
        cfg = preset(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg and hash(cfg) == hash(preset(name))
    # Every ModelConfig field is a config.model field, but the LoRA ones: the `lora` section's
    # (less lora.weight_decay, the optimizer's).
    assert set(default_config().model.keys()) == {
        name for name in ModelConfig.__dataclass_fields__ if not name.startswith("lora_")}
    assert {f"lora_{name}" for name in default_config().lora.keys()
            if name != "weight_decay"} == {
        name for name in ModelConfig.__dataclass_fields__ if name.startswith("lora_")}


# ---------------------------------------------------------------- packed rows (segment ids)

# Two packed rows of 16 tokens: documents of 5, 7 and 4 tokens; of 9 and 3 tokens + 4 padding.
PACKED_LENGTHS = [[5, 7, 4], [9, 3]]


def packed_rows(vocab_size: int, seed: int = 0):
    """(tokens, segment ids, positions) [2, 16] of PACKED_LENGTHS (documents 1, 2.., padding 0),
    and the documents' tokens one by one."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (2, 16))
    segments, positions = np.zeros((2, 16), np.int32), np.zeros((2, 16), np.int32)
    docs = []
    for row, lengths in enumerate(PACKED_LENGTHS):
        start = 0
        for doc, length in enumerate(lengths, 1):
            segments[row, start:start + length] = doc
            positions[row, start:start + length] = np.arange(length)
            docs.append((row, start, tokens[row, start:start + length]))
            start += length
    return tokens, segments, positions, docs


def test_positions_from_segments():
    _, segments, positions, _ = packed_rows(10)
    positions[1, 12:] = np.arange(4)  # the padding is one more run of equal ids
    np.testing.assert_array_equal(attention_lib.positions_from_segments(jnp.asarray(segments)),
                                  positions)


@pytest.mark.parametrize("fields, blocked", [(GPT, True), (LLAMA, True), (LLAMA, False)],
                         ids=["gpt2_learned", "llama_rope_gqa", "llama_dot_product_attention"])
def test_packed_documents_equal_separate_forward_passes(fields, blocked, monkeypatch):
    """Each document of a packed row gets the logits it gets alone (positions restarting at 0),
    in the blocked CPU attention (blocks of 4 queries, documents straddling blocks) and in
    `jax.nn.dot_product_attention`'s path; and the NumPy reference of the document alone."""
    monkeypatch.setattr(attention_lib, "ATTENTION_BLOCK", 4)
    monkeypatch.setattr(model_lib, "causal_attention",
                        functools.partial(attention_lib.causal_attention, blocked=blocked))
    cfg = ModelConfig(**fields)
    params = random_params(cfg, seed=3)
    tokens, segments, positions, docs = packed_rows(cfg.vocab_size)
    apply = jax.jit(lambda t, p, s: model_lib.Transformer(cfg).apply(
        {"params": params}, t, p, segment_ids_BxL=s))  # (positions None: test above)
    packed = np.asarray(apply(tokens, positions, segments))
    # Reference: each document alone at the start of its own row (causal: what follows it in
    # that row cannot matter), one row per document, no segment ids.
    alone = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(docs), 16))
    for i, (_, _, doc) in enumerate(docs):
        alone[i, :len(doc)] = doc
    alone_logits = np.asarray(forward(cfg, params, alone))
    for i, (row, start, doc) in enumerate(docs):
        got = packed[row, start:start + len(doc)]
        np.testing.assert_allclose(got, alone_logits[i, :len(doc)], atol=1e-5, rtol=1e-5)
    row, start, doc = docs[1]  # and the NumPy reference of a document in mid-row, alone
    np.testing.assert_allclose(packed[row, start:start + len(doc)], np_forward(params, doc, cfg),
                               atol=1e-4, rtol=1e-4)


def test_segment_ids_with_a_kv_cache_is_an_error():
    cfg = ModelConfig(**GPT)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids_BxL is for full forward passes"):
        model_lib.Transformer(cfg).apply({"params": {}}, tokens,  # raised before any parameter
                                         kv_cache=attention_lib.init_kv_cache(cfg, 1),
                                         segment_ids_BxL=jnp.ones((1, 4), jnp.int32))
