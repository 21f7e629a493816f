"""Transformer.apply(..., attention_mask=...) on padded batches vs transformers' logits with the
same mask and position ids (cumsum(mask) - 1), left and right padding, GPT-2 and LLaMA (GQA)."""
import numpy as np
import pytest
import torch
import transformers

from lmjax import hf
from lmjax.model import Transformer

V = 96
MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
}
PROMPTS = [[5, 17, 60, 3, 64], [9], [70, 4, 3, 0, 1, 2, 88, 6, 50, 7, 8]]


def padded(side: str):
    width = max(map(len, PROMPTS))
    tokens, mask = np.zeros((len(PROMPTS), width), np.int64), np.zeros((len(PROMPTS), width),
                                                                       np.int64)
    for b, prompt in enumerate(PROMPTS):
        at = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        tokens[b, at], mask[b, at] = prompt, 1
    return tokens, mask


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_batch_logits_match_transformers(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():  # std 0.25: logits of std ~2, as in a trained model
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(tmp_path)
    config, params, _ = hf.load_hf(str(tmp_path))
    for side in ("left", "right"):
        tokens, mask = padded(side)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        with torch.no_grad():
            expected = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(positions)).logits.numpy()
        got = np.asarray(Transformer(config).apply({"params": params}, tokens.astype(np.int32),
                                                   attention_mask=mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)
        # Each row alone, unpadded, gives the same logits: padding changes nothing.
        for b, prompt in enumerate(PROMPTS):
            alone = np.asarray(Transformer(config).apply({"params": params},
                                                         np.array([prompt], np.int32)))[0]
            np.testing.assert_allclose(got[b][real[b]], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_mask is for full forward passes"):
        Transformer(config).apply({"params": params}, tokens.astype(np.int32),
                                  attention_mask=mask, segment_ids_BxL=mask)
