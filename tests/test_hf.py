"""Hugging Face interop against `transformers` itself: logits, greedy decoding, round trips,
tokenizers, errors.

Every Hugging Face model here is a tiny randomly initialised `transformers` model saved with
`save_pretrained` into a temporary folder (nothing is downloaded). Its weights are re-drawn with a
larger spread than `transformers`' init (norm scales and biases too), so that logits are far from
zero and a wrong conversion shows up far above the 1e-4 tolerance.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
# The references: installed by the `test` extra (pip install -e ".[test]"), so imported plainly:
# a missing or broken install fails here instead of skipping the file.
import torch
import transformers

from lmjax import hf, hf_layout
from lmjax import model as model_lib
from lmjax import sample as sample_lib
from lmjax import tokenizers as tokenizers_lib
from lmjax.config import ModelConfig, default_config

V = 128  # vocabulary of the test models
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
HF_CONFIGS = {
    "gpt2": ("gpt2", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          bos_token_id=1, eos_token_id=2)),
    "gpt2_untied_inner": ("gpt2", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                       n_positions=64, n_inner=80, tie_word_embeddings=False,
                                       bos_token_id=1, eos_token_id=2)),
    "llama_gqa": ("llama", LLAMA),
    "llama_tied_mqa": ("llama", dict(LLAMA, num_key_value_heads=1, tie_word_embeddings=True,
                                     rope_theta=500.0)),
    "llama_head_dim": ("llama", dict(LLAMA, head_dim=24)),
    "llama3_scaling": ("llama", dict(LLAMA, rope_theta=50.0, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear_scaling": ("llama", dict(LLAMA, rope_scaling=dict(rope_type="linear", factor=3.0))),
    "llama_attention_bias": ("llama", dict(LLAMA, attention_bias=True)),
    "llama_all_biases": ("llama", dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "qwen2": ("qwen2", dict(LLAMA, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(LLAMA, sliding_window=None)),
}
_CLASSES = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"),
            "llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}

# Three rows, right-padded to 12 with token 0 (row lengths 12, 7 and 3).
TOKENS = np.array([[5, 17, 99, 3, 64, 8, 127, 42, 42, 0, 1, 77],
                   [9, 2, 88, 31, 120, 6, 50, 0, 0, 0, 0, 0],
                   [100, 4, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
LENGTHS = [12, 7, 3]
MASK = (np.arange(12)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)


def _randomize_torch(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + 0.2 * noise)  # norm scales around 1
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def make_hf_model(name, **overrides):
    model_type, fields = HF_CONFIGS[name]
    config_cls, model_cls = (getattr(transformers, c) for c in _CLASSES[model_type])
    config = config_cls(**{**fields, **overrides})
    torch.manual_seed(0)
    return _randomize_torch(model_cls(config))


def save_hf_model(name, folder, save_options=None, **overrides):
    model = make_hf_model(name, **overrides)
    model.save_pretrained(str(folder), **(save_options or {}))
    return model


def torch_logits(model, tokens=TOKENS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
                     ).logits.float().numpy()


def lmjax_logits(config, params, tokens=TOKENS):
    # One compiled call (an unjitted apply dispatches op by op: several times slower).
    apply = jax.jit(model_lib.Transformer(config).apply)
    return np.asarray(apply({"params": params}, jnp.asarray(tokens)))


def max_diff_unpadded(a, b):
    return max(float(np.abs(a[row, :n] - b[row, :n]).max()) for row, n in enumerate(LENGTHS))


def random_lmjax_params(config, seed=1):
    """Parameters of `config`'s shapes drawn with NumPy (norm scales around 1, everything else
    with spread 0.15): no compile per shape, as an unjitted `init_params` would need."""
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, config), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(
        ("scale" in jax.tree_util.keystr(path)) + 0.15 * rng.standard_normal(s.shape), s.dtype),
        shapes)


# ------------------------------------------------------------------------------ logits parity


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    model = save_hf_model(name, tmp_path)
    config, params, tokenizer = hf.load_hf(str(tmp_path))
    assert tokenizer is None  # no tokenizer files in this folder
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    reference = torch_logits(model)
    logits = lmjax_logits(config, params)
    assert np.abs(reference).max() > 1.0  # logits are not trivially small
    assert max_diff_unpadded(logits, reference) <= 1e-4


def test_imported_configs():
    gpt2 = hf_layout.config_from_hf(dict(HF_CONFIGS["gpt2_untied_inner"][1], model_type="gpt2"))
    assert (gpt2.mlp_dim, gpt2.tie_embeddings, gpt2.position, gpt2.mlp) == (80, False, "learned",
                                                                           "gelu")
    assert hf_layout.config_from_hf(dict(HF_CONFIGS["gpt2"][1], model_type="gpt2")).mlp_dim == 256
    llama3 = hf_layout.config_from_hf(dict(HF_CONFIGS["llama3_scaling"][1], model_type="llama"))
    assert (llama3.rope_scaling, llama3.rope_scaling_factor, llama3.rope_original_max_len,
            llama3.rope_theta, llama3.kv_heads) == ("llama3", 4.0, 16, 50.0, 2)
    qwen = hf_layout.config_from_hf(dict(LLAMA, model_type="qwen2"))
    assert (qwen.bias, qwen.qkv_bias, qwen.out_bias) == (False, True, False)
    # Mistral's sliding window: lmjax attends to everything, which is the same up to the window.
    mistral = hf_layout.config_from_hf(dict(LLAMA, model_type="mistral", sliding_window=64))
    assert mistral.max_len == 64
    # transformers 5's rope_parameters and 4.x's rope_theta + rope_scaling read the same.
    new = hf_layout.config_from_hf(dict(LLAMA, model_type="llama", rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=99.0)))
    old = hf_layout.config_from_hf(dict(LLAMA, model_type="llama", rope_theta=99.0,
                                 rope_scaling=dict(type="linear", factor=2.0)))
    assert new == old and new.rope_scaling == "linear" and new.rope_theta == 99.0


def test_rope_scaling_is_needed_for_parity(tmp_path):
    """The scaled-RoPE models differ measurably from unscaled RoPE: the parity above has teeth."""
    import dataclasses
    for name in ("llama3_scaling", "linear_scaling"):
        model = save_hf_model(name, tmp_path / name)
        config, params, _ = hf.load_hf(str(tmp_path / name))
        plain = dataclasses.replace(config, rope_scaling="none")
        assert max_diff_unpadded(lmjax_logits(plain, params), torch_logits(model)) > 1e-2


# ---------------------------------------------------------------------------- greedy decoding


def _plain_greedy(config, params, prompt, steps):
    """Greedy decoding by full recomputation: the reference for the KV-cache sampler.

    The tokens sit in a fixed-length buffer (one compile); the model is causal, so the slots
    after the last token do not change the logits at it.
    """
    @jax.jit
    def next_token(buffer, last):
        logits = model_lib.Transformer(config).apply({"params": params}, buffer[None])[0]
        return jnp.argmax(logits[last])

    buffer = np.zeros(len(prompt) + steps, np.int32)
    buffer[:len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        buffer[n] = next_token(jnp.asarray(buffer), n - 1)
    return buffer[len(prompt):].tolist()


# The full-recompute loop checks the model's greedy path, which the logits parity above already
# pins (slow: redundant); the KV-cache sampler is the one to test against transformers.
@pytest.mark.parametrize("decoder", [pytest.param("full_recompute_loop", marks=pytest.mark.slow),
                                     "lmjax.sample.generate"])
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_greedy_decoding_matches_transformers(name, decoder, tmp_path):
    model = save_hf_model(name, tmp_path)
    config, params, _ = hf.load_hf(str(tmp_path))
    prompts = [[5, 17, 99, 3, 64], [9], [100, 4, 3, 0, 1, 2, 120, 6, 50, 7, 8]]
    # No end token on either side: min_new_tokens would otherwise forbid transformers the eos
    # token that lmjax (no eos_ids) may pick.
    model.generation_config.eos_token_id = None
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                  dtype=torch.long),
                                 do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                 pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    assert all(len(row) == 32 for row in expected)
    if decoder == "full_recompute_loop":
        got = [_plain_greedy(config, params, prompt, 32) for prompt in prompts]
    else:
        tokens, _, lengths = sample_lib.generate(
            params, config, prompts, sample_lib.SamplingConfig(max_new_tokens=32, greedy=True), 0)
        assert np.asarray(lengths).tolist() == [32] * len(prompts)
        got = np.asarray(tokens).tolist()
    assert got == expected


# ---------------------------------------------------------------------------------- round trips


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied_inner", "llama3_scaling", "qwen2",
                                  "mistral", "llama_attention_bias", "llama_all_biases"])
def test_import_export_import(name, tmp_path):
    model = save_hf_model(name, tmp_path / "hf")
    config, params, _ = hf.load_hf(str(tmp_path / "hf"))
    model_type = HF_CONFIGS[name][0]
    hf.save_hf(str(tmp_path / "export"), config, params, model_type=model_type)
    exported = json.load(open(tmp_path / "export" / "config.json"))
    assert exported["model_type"] == model_type
    assert exported["architectures"] == [_CLASSES[model_type][1].replace("Config", "")]
    config2, params2, _ = hf.load_hf(str(tmp_path / "export"))
    assert config2 == config
    _assert_same_tree(params, params2)
    # transformers loads the export and computes the same logits as the original.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), atol=1e-5)


@pytest.mark.parametrize("window", [96, 64])
def test_mistral_exports_as_mistral(window, tmp_path):
    """A Mistral folder comes back as Mistral without naming model_type (its config.json differs
    from LLaMA's by sliding_window), and transformers computes the same logits from it. A window
    shorter than the context is the context (lmjax has full attention only), with a warning."""
    model = save_hf_model("mistral", tmp_path / "hf", sliding_window=window)
    if window < LLAMA["max_position_embeddings"]:
        with pytest.warns(UserWarning, match="sliding_window=64 < max_position_embeddings=96"):
            config, params, _ = hf.load_hf(str(tmp_path / "hf"))
    else:
        config, params, _ = hf.load_hf(str(tmp_path / "hf"))
    assert (config.sliding_window, config.max_len) == (window, window)
    hf.save_hf(str(tmp_path / "export"), config, params)
    exported = json.load(open(tmp_path / "export" / "config.json"))
    assert (exported["model_type"], exported["sliding_window"]) == ("mistral", window)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert type(reloaded) is transformers.MistralForCausalLM
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), atol=1e-5)
    np.testing.assert_allclose(lmjax_logits(config, params, TOKENS[:1]),
                               torch_logits(model, TOKENS[:1], MASK[:1]), atol=1e-4)
    # Beyond the window full attention is not Mistral's: lmjax refuses.
    with pytest.raises(ValueError, match=f"exceed model.sliding_window={window}"):
        model_lib.Transformer(config).apply({"params": params},
                                            jnp.zeros((1, window + 1), jnp.int32))


LMJAX_CONFIGS = {
    # nanoGPT style: no biases at all (exported to GPT-2 as zero biases).
    "gpt2_no_bias": dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=80,
                         max_len=32, bias=False),
    "gpt2_bias_untied": dict(vocab_size=V, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                             max_len=32, tie_embeddings=False, norm_eps=1e-6),
    "llama_tiny": dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                       mlp_dim=176, max_len=128, position="rope", norm="rmsnorm", mlp="swiglu",
                       bias=False, tie_embeddings=False),
}
LMJAX_CONFIGS.update(
    qwen2_style=dict(LMJAX_CONFIGS["llama_tiny"], qkv_bias=True, tie_embeddings=True,
                     rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=8,
                     rope_theta=100.0),
    out_bias_only=dict(LMJAX_CONFIGS["llama_tiny"], out_bias=True, head_dim=8,
                       rope_scaling="linear", rope_scaling_factor=2.0),
    llama_mlp_biases=dict(LMJAX_CONFIGS["llama_tiny"], bias=True, num_kv_heads=1),
)
EXPECTED_TYPES = {"gpt2_no_bias": "gpt2", "gpt2_bias_untied": "gpt2", "llama_tiny": "llama",
                  "qwen2_style": "qwen2", "out_bias_only": "llama", "llama_mlp_biases": "llama"}


@pytest.mark.parametrize("name", list(LMJAX_CONFIGS))
def test_lmjax_model_exports_to_transformers(name, tmp_path):
    config = ModelConfig(**LMJAX_CONFIGS[name])
    params = random_lmjax_params(config)
    hf.save_hf(str(tmp_path), config, params)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == EXPECTED_TYPES[name]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert max_diff_unpadded(lmjax_logits(config, params), torch_logits(reloaded)) <= 1e-4
    # And back: the same logits (biases lmjax lacked come back as zeros).
    config2, params2, _ = hf.load_hf(str(tmp_path))
    assert max_diff_unpadded(lmjax_logits(config2, params2), lmjax_logits(config, params)) <= 1e-5


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    model = save_hf_model("llama_gqa", tmp_path / "hf_sharded", dict(max_shard_size="40KB"))
    assert os.path.exists(tmp_path / "hf_sharded" / "model.safetensors.index.json")
    config, params, _ = hf.load_hf(str(tmp_path / "hf_sharded"))
    assert max_diff_unpadded(lmjax_logits(config, params), torch_logits(model)) <= 1e-4

    # lmjax's own sharded export, read back by transformers and by lmjax.
    hf.save_hf(str(tmp_path / "ours"), config, params, max_shard_bytes=50_000)
    assert len([f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors")]) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), atol=1e-5)
    _assert_same_tree(hf.load_hf(str(tmp_path / "ours"))[1], params)

    # pytorch_model.bin, in bfloat16: read as float32, the values are exactly the bf16 ones.
    (tmp_path / "bin").mkdir()
    model.config.to_json_file(str(tmp_path / "bin" / "config.json"))
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
               str(tmp_path / "bin" / "pytorch_model.bin"))
    _, params_bin, _ = hf.load_hf(str(tmp_path / "bin"))
    expected = model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).float()
    np.testing.assert_array_equal(np.asarray(params_bin["blocks_1"]["mlp"]["proj"]["kernel"]),
                                  expected.numpy().T)


def test_bfloat16_import(tmp_path):
    model = save_hf_model("llama_gqa", tmp_path)
    config, params, _ = hf.load_hf(str(tmp_path), dtype="bfloat16")
    assert config.param_dtype == config.dtype == "bfloat16"
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    reference = torch_logits(model)
    logits = lmjax_logits(config, params)
    assert logits.dtype == np.float32
    assert max_diff_unpadded(logits, reference) < 0.05 * np.abs(reference).max()
    # A bfloat16 checkpoint (as most released models are) imports to the same bf16 params.
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    _assert_same_tree(hf.load_hf(str(tmp_path / "bf16"), dtype="bfloat16")[1], params)


# --------------------------------------------------------------------------------- bad input


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, model_type="llama")))
    with pytest.raises(FileNotFoundError, match="no weights in .*expected model.safetensors"):
        hf.load_hf(str(tmp_path))


def test_damaged_folder_names_the_file(tmp_path):
    save_hf_model("gpt2", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a cut download
    with pytest.raises(ValueError, match="cannot read the weights file .*model.safetensors.*"
                                         "truncated or damaged"):
        hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        hf.load_hf(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 'bert'; supported "
                                         "model types are gpt2, llama, mistral, qwen2"):
        hf.load_hf(str(tmp_path))


def test_unsupported_rope_type_and_activation():
    with pytest.raises(ValueError, match="rope_type='yarn'.*supported: default, linear, llama3"):
        hf_layout.config_from_hf(dict(LLAMA, model_type="llama", rope_scaling=dict(
            rope_type="yarn", factor=2.0)))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        hf_layout.config_from_hf(dict(model_type="gpt2", activation_function="relu"))


def test_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file
    save_hf_model("llama_gqa", tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' "
                                         r"\(expected shape \(96, 64\)\)"):
        hf.load_hf(str(tmp_path))


def test_mismatched_shape(tmp_path):
    save_hf_model("llama_gqa", tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                         r"\(96, 64\) in the checkpoint, but the config needs "
                                         r"shape \(80, 64\)"):
        hf.load_hf(str(tmp_path))


def test_unexpected_tensors(tmp_path):
    save_hf_model("llama_attention_bias", tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    config["attention_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected tensors .*self_attn.k_proj.bias"):
        hf.load_hf(str(tmp_path))


def test_export_errors(tmp_path):
    rope_layernorm = ModelConfig(**dict(LMJAX_CONFIGS["llama_tiny"], norm="layernorm"))
    params = random_lmjax_params(rope_layernorm)
    with pytest.raises(ValueError, match="cannot export as Hugging Face 'llama': "
                                         "model.norm='layernorm'"):
        hf.save_hf(str(tmp_path), rope_layernorm, params)
    gqa_gpt = ModelConfig(**dict(LMJAX_CONFIGS["gpt2_no_bias"], num_kv_heads=2))
    with pytest.raises(ValueError, match="'gpt2': model.num_kv_heads=2"):
        hf.save_hf(str(tmp_path), gqa_gpt, random_lmjax_params(gqa_gpt))
    qwen = ModelConfig(**LMJAX_CONFIGS["llama_mlp_biases"])
    with pytest.raises(ValueError, match="'mistral': model.bias=True"):
        hf.save_hf(str(tmp_path), qwen, random_lmjax_params(qwen),
                   model_type="mistral")
    assert not os.path.exists(tmp_path / "config.json")


# --------------------------------------------------------------------------------- tokenizers

TEXTS = ["Hello world! The quick brown fox jumps over the lazy dog.",
         "  Leading spaces,\ttabs\nand newlines\n\n  kept.",
         "Ünïcödé: 日本語のテキスト, emoji 🤖🚀, math ∑x²",
         "<s> looks like a special token",
         ""]
CORPUS = [" ".join(TEXTS[:3]) * 3, "to be or not to be, that is the question\n" * 20,
          "All the world's a stage, and all the men and women merely players.\n" * 10]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE trained here, saved as transformers' fast tokenizer does."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("bpe")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A SentencePiece model trained here, as a LLaMA-style tokenizer.model folder."""
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(CORPUS).split("\n")),
                                   model_writer=model, vocab_size=500, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return folder


def test_tokenizer_json_matches_tokenizers_and_transformers(bpe_folder):
    import tokenizers
    reference = tokenizers.Tokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(bpe_folder))
    ours = tokenizers_lib.HFTokenizer.from_folder(str(bpe_folder))
    assert (ours.kind, ours.pad_id, ours.bos_id, ours.eos_id) == ("hf", 0, 1, 2)
    assert ours.vocab_size == reference.get_vocab_size() == len(auto)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ids == auto.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == auto(text)["input_ids"] == [1] + ids
        assert ours.decode(ids) == reference.decode(ids) == auto.decode(
            ids, skip_special_tokens=True)
        with_specials = [1] + ids + [2, 0, 0]
        assert ours.decode(with_specials) == auto.decode(with_specials, skip_special_tokens=True)
        if "<s>" not in text:
            assert ours.decode(ids) == text


def test_sentencepiece_model_matches_sentencepiece(spm_folder):
    import sentencepiece as spm
    reference = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    ours = tokenizers_lib.HFTokenizer.from_folder(str(spm_folder))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 3)
    assert ours.vocab_size == reference.get_piece_size()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text)
        assert ours.encode(text, add_special_tokens=True) == [1] + ids
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode([1] + ids + [2, 3]) == reference.decode(ids)


def _reference_encoder(folder):
    """The folder's tokenizer as its own library reads it (no special tokens added)."""
    if (folder / "tokenizer.json").exists():
        import tokenizers
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode


def test_hf_tokenizer_save_load_build(bpe_folder, spm_folder, tmp_path):
    for folder in (bpe_folder, spm_folder):
        reference = _reference_encoder(folder)
        original = tokenizers_lib.HFTokenizer.from_folder(str(folder))
        saved = tmp_path / folder.name
        original.save(str(saved))
        loaded = tokenizers_lib.load_tokenizer(str(saved))
        assert isinstance(loaded, tokenizers_lib.HFTokenizer)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
            original.bos_id, original.eos_id, original.pad_id, original.vocab_size)
        assert all(loaded.encode(t) == original.encode(t) == reference(t) for t in TEXTS)

        # kind 'hf' with tokenizer.path = the folder; saved into the workdir and reused there.
        config = default_config().tokenizer
        config.kind, config.path = "hf", str(folder)
        workdir = tmp_path / ("work_" + folder.name)
        built = tokenizers_lib.build_tokenizer(config, "ignored text", str(workdir))
        assert built.encode(TEXTS[0]) == reference(TEXTS[0])
        assert tokenizers_lib.load_tokenizer(str(workdir)).kind == "hf"
        assert tokenizers_lib.build_tokenizer(config, "", str(workdir)).encode(TEXTS[1]) == \
            reference(TEXTS[1])
    config = default_config().tokenizer
    config.kind = "hf"
    with pytest.raises(ValueError, match="tokenizer.kind = 'hf' needs tokenizer.path"):
        tokenizers_lib.build_tokenizer(config, "text")
    config.path = str(tmp_path)  # a folder without tokenizer files
    with pytest.raises(ValueError, match="tokenizer.kind = 'hf' needs tokenizer.path"):
        tokenizers_lib.build_tokenizer(config, "text")


def test_special_ids_from_model_config(bpe_folder, tmp_path):
    """Without special tokens in the tokenizer files, config.json's *_token_id count."""
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": None}))
    tokenizer = tokenizers_lib.HFTokenizer.from_folder(str(tmp_path))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, None)


def test_model_and_tokenizer_through_a_folder(bpe_folder, tmp_path):
    model = save_hf_model("llama_gqa", tmp_path / "model", vocab_size=400)
    for name in os.listdir(bpe_folder):
        (tmp_path / "model" / name).write_bytes((bpe_folder / name).read_bytes())
    config, params, tokenizer = hf.load_hf(str(tmp_path / "model"))
    assert isinstance(tokenizer, tokenizers_lib.HFTokenizer) and tokenizer.eos_id == 2
    hf.save_hf(str(tmp_path / "export"), config, params, tokenizer)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert auto.encode(TEXTS[2], add_special_tokens=False) == tokenizer.encode(TEXTS[2])
    exported = json.load(open(tmp_path / "export" / "config.json"))
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (
        1, 2, 0)
    config2, _, tokenizer2 = hf.load_hf(str(tmp_path / "export"))
    assert config2 == config and tokenizer2.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(model), atol=1e-5)
