"""lmjax.sample.generate against transformers' `generate`, option for option, on small random
GPT-2 / LLaMA / Qwen2 / Mistral models built here from their configs (the same weights loaded
into lmjax through lmjax.hf), with an end token the model really emits, so that hypotheses end
mid-sequence. Also: the processed logit vectors against transformers' LogitsProcessor classes,
and generation defaults read from a model folder."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from transformers import generation as hf_gen

from lmjax import hf, logits_process
from lmjax import sample as sample_lib
from lmjax.sample import SamplingConfig

V = 96
_LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, _LLAMA_LIKE),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, _LLAMA_LIKE),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(_LLAMA_LIKE, sliding_window=None)),
}
PROMPTS = [[5, 17, 60, 3, 64], [9], [70, 4, 3, 0, 1, 2, 88, 6, 50, 7, 8]]
S = 12  # new tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (torch model, lmjax config, lmjax params)}, random weights of std 0.25 (peaked
    next-token distributions, as in a trained model, so that beams differ clearly)."""
    out = {}
    for i, (family, (config_class, model_class, fields)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = model_class(config_class(**fields, attn_implementation="eager")).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.25)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        config, params, _ = hf.load_hf(str(folder))
        out[family] = (model, config, params)
    return out


def hf_generate(model, prompt, **options):
    """transformers' generate on one prompt: (generated rows, sequences_scores or None)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=S,
                             return_dict_in_generate=True, output_scores=True, **options)
    scores = getattr(out, "sequences_scores", None)
    return out.sequences[:, len(prompt):].tolist(), None if scores is None else scores.numpy()


def until_end(row, eos):
    """The tokens up to and including the first end token."""
    return row[:row.index(eos) + 1] if eos in row else row


def torch_greedy(model, prompt, steps=S) -> list[int]:
    """Greedy tokens by full forward passes of the torch model (no end token)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def emitted_token(model, prompt) -> int:
    """The token greedy decoding emits most often (the first such): as the end token, it makes
    hypotheses end mid-sequence."""
    greedy = torch_greedy(model, prompt)
    return max(greedy, key=greedy.count)


# ---------------------------------------------------------------------------------- beam search


def check_beams(models, family, num_beams, length_penalty, early_stopping, prompts=PROMPTS[:1],
                require_early_end=True, **options):
    model, config, params = models[family]
    beam_options = dict(do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
                        early_stopping=early_stopping, num_return_sequences=num_beams, **options)
    greedy = torch_greedy(model, prompts[0])
    # The end token: among the tokens greedy decoding emits (most frequent first), the first
    # with which transformers returns a hypothesis that ends mid-sequence.
    eos = next((t for t in sorted(set(greedy), key=lambda t: (-greedy.count(t), t))
                if any(t in row[:-1] for row in hf_generate(model, prompts[0], eos_token_id=t,
                                                            pad_token_id=t, **beam_options)[0])),
               emitted_token(model, prompts[0]))
    sampling = SamplingConfig(S, num_beams=num_beams, length_penalty=length_penalty,
                              early_stopping=early_stopping, eos_ids=(eos,), pad_id=eos, **options)
    result = sample_lib.beam_search(params, config, prompts, sampling)
    tokens, lengths, scores = map(np.asarray, (result.tokens, result.lengths, result.scores))
    ended_early = False
    for b, prompt in enumerate(prompts):
        expected, expected_scores = hf_generate(model, prompt, eos_token_id=eos, pad_token_id=eos,
                                                **beam_options)
        got = [tokens[b, n, :lengths[b, n]].tolist() for n in range(num_beams)]
        assert got == [until_end(row, eos) for row in expected], (b, got, expected)
        np.testing.assert_allclose(scores[b], expected_scores, atol=1e-5, rtol=0)
        ended_early |= bool((lengths[b] < S).any())
    # The end token really ends returned hypotheses mid-sequence (with a strong length penalty
    # and early_stopping="never" the best ones may all be full length: the slow grid allows it).
    assert ended_early or not require_early_end
    # generate returns the best num_return_sequences of them, prompt after prompt.
    R = max(1, num_beams - 1)
    out = sample_lib.generate(params, config, prompts,
                              dataclasses.replace(sampling, num_return_sequences=R))
    np.testing.assert_array_equal(np.asarray(out.tokens).reshape(len(prompts), R, S),
                                  tokens[:, :R])


BEAM_CASES = [("gpt2", 2, 1.0, False), ("llama", 3, 0.5, True), ("qwen2", 4, 0.5, "never"),
              ("mistral", 5, 1.0, False), ("llama", 4, 1.0, "never"), ("gpt2", 3, 2.0, True)]


@pytest.mark.parametrize("family,num_beams,length_penalty,early_stopping", BEAM_CASES)
def test_beam_search_with_end_token_matches_transformers(models, family, num_beams,
                                                         length_penalty, early_stopping):
    check_beams(models, family, num_beams, length_penalty, early_stopping)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("num_beams", [2, 3, 4, 5])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_grid_matches_transformers(models, family, num_beams, length_penalty,
                                               early_stopping):
    check_beams(models, family, num_beams, length_penalty, early_stopping, prompts=PROMPTS,
                require_early_end=False)


def test_batched_beam_search_of_different_lengths_matches_transformers(models):
    """Three prompts of lengths 5, 1 and 11 in one lmjax batch, each against transformers
    alone; with n-gram blocking and a repetition penalty (applied to log-probabilities in beam
    search, as transformers does)."""
    check_beams(models, "llama", 3, 1.0, False, prompts=PROMPTS, no_repeat_ngram_size=2,
                repetition_penalty=1.3)


# --------------------------------------------------------------------------------- greedy options


GREEDY_CASES = [("gpt2", dict(min_new_tokens=6)), ("llama", dict(repetition_penalty=1.5)),
                ("qwen2", dict(no_repeat_ngram_size=2)),
                ("mistral", dict(min_new_tokens=4, repetition_penalty=0.8,
                                 no_repeat_ngram_size=3))]


@pytest.mark.parametrize("family,options", GREEDY_CASES)
def test_greedy_options_match_transformers(models, family, options):
    """Batched prompts of different lengths in lmjax, each against transformers alone."""
    model, config, params = models[family]
    eos = torch_greedy(model, PROMPTS[0])[2]  # emitted at step 2: min_new_tokens has to act
    out = sample_lib.generate(params, config, PROMPTS, SamplingConfig(
        S, greedy=True, eos_ids=(eos,), pad_id=eos, **options))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b, prompt in enumerate(PROMPTS):
        expected, _ = hf_generate(model, prompt, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos, **options)
        assert tokens[b, :lengths[b]].tolist() == until_end(expected[0], eos), (b, options)


def test_sampling_with_top_k_1_equals_transformers_greedy(models):
    """The sampling path applies the processors before its warpers: top_k=1 sampling with a
    repetition penalty and n-gram blocking is transformers' greedy decoding with them."""
    model, config, params = models["llama"]
    options = dict(repetition_penalty=1.4, no_repeat_ngram_size=2)
    eos = emitted_token(model, PROMPTS[0])
    out = sample_lib.generate(params, config, PROMPTS, SamplingConfig(
        S, top_k=1, eos_ids=(eos,), pad_id=eos, **options), rng=3)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b, prompt in enumerate(PROMPTS):
        expected, _ = hf_generate(model, prompt, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos, **options)
        assert tokens[b, :lengths[b]].tolist() == until_end(expected[0], eos)


# ------------------------------------------------------------------------ processed logit vectors


def test_processors_then_warpers_equal_transformers_classes():
    """process_logits then warp_logits on random logits and histories vs transformers'
    LogitsProcessorList of the same processors and warpers, in _get_logits_processor's order."""
    rng = np.random.RandomState(0)
    B, T, prompt_len, V_ = 4, 14, 6, 40
    ids = rng.randint(0, 12, (B, T))  # few distinct tokens: repeats and n-gram hits happen
    logits = (rng.randn(B, V_) * 2).astype(np.float32)
    eos, bad = (3,), ((5,), (7, 8), (ids[0, -1], 9))
    sampling = SamplingConfig(4, temperature=0.7, top_k=12, top_p=0.8, repetition_penalty=1.3,
                              no_repeat_ngram_size=2, bad_words_ids=bad, min_new_tokens=20,
                              eos_ids=eos)
    processors = hf_gen.LogitsProcessorList([
        hf_gen.RepetitionPenaltyLogitsProcessor(1.3), hf_gen.NoRepeatNGramLogitsProcessor(2),
        hf_gen.NoBadWordsLogitsProcessor([list(w) for w in bad], list(eos)),
        hf_gen.MinNewTokensLengthLogitsProcessor(prompt_len, 20, list(eos)),
        hf_gen.TemperatureLogitsWarper(0.7), hf_gen.TopKLogitsWarper(12),
        hf_gen.TopPLogitsWarper(0.8)])
    expected = processors(torch.tensor(ids), torch.tensor(logits)).numpy()
    history = np.concatenate([ids, np.full((B, 5), -1)], axis=1)  # unfilled slots are -1
    processed = logits_process.process_logits(logits, history, T, T - prompt_len, sampling)
    got = np.asarray(logits_process.warp_logits(processed, sampling))
    assert np.isfinite(expected).sum(-1).min() >= 2  # something is left to sample from
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)


@pytest.mark.parametrize("scale", [8.0, 0.05], ids=["peaked", "flat"])
def test_top_k_top_p_past_the_candidates_equal_transformers(scale):
    """warp_logits and warp_rows take top-k's threshold from the 256 largest logits and
    top-p's from the 1024 largest (lax.top_k), and fall back to a full sort when a row needs
    more: peaked logits (top-p's set within the 1024), flat ones (a top-p 0.95 set of ~2,800 of
    3,000 tokens) and a top-k of 1,200, against transformers' warpers."""
    assert (logits_process.TOP_K_CANDIDATES, logits_process.TOP_P_CANDIDATES) == (256, 1024)
    rng = np.random.RandomState(1)
    logits = (rng.randn(3, 3000) * scale).astype(np.float32)
    settings = [(1.0, 0, 0.95), (0.8, 1200, 0.9), (1.2, 20, 0.5)]  # temperature, top_k, top_p

    def transformers_warped(row, t, k, p):
        x = hf_gen.TemperatureLogitsWarper(t)(None, torch.tensor(logits[row:row + 1]))
        x = hf_gen.TopKLogitsWarper(k)(None, x) if k else x
        return hf_gen.TopPLogitsWarper(p)(None, x).numpy()[0]
    rows = np.asarray(logits_process.warp_rows(logits, *(np.array(c) for c in zip(*settings))))
    for row, (t, k, p) in enumerate(settings):
        expected = transformers_warped(row, t, k, p)
        one = np.asarray(logits_process.warp_logits(
            logits[row:row + 1], SamplingConfig(4, temperature=t, top_k=k, top_p=p)))[0]
        for got in (rows[row], one):
            np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
            np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)],
                                       rtol=1e-6)
    if scale < 1:  # the flat rows' top-p sets reach past the candidates
        assert np.isfinite(rows[0]).sum() > logits_process.TOP_P_CANDIDATES


# ------------------------------------------------------------------------ defaults from a folder


def test_sampling_config_from_hf_folder(tmp_path):
    """config.json's token ids, then generation_config.json (written by transformers)."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", bos_token_id=1, eos_token_id=2, pad_token_id=None)))
    greedy = SamplingConfig.from_hf(str(tmp_path))
    assert (greedy.eos_ids, greedy.pad_id, greedy.bos_id, greedy.is_greedy) == ((2,), 2, 1, True)
    transformers.GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.9, max_length=30, eos_token_id=[2, 5],
        pad_token_id=0, no_repeat_ngram_size=3, repetition_penalty=1.1,
        stop_strings=["\n\n"]).save_pretrained(tmp_path)
    sampling = SamplingConfig.from_hf(str(tmp_path), num_return_sequences=2)
    assert not sampling.is_greedy and sampling.top_k == 50  # transformers' default when sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_length) == (0.7, 0.9, 30)
    assert (sampling.eos_ids, sampling.pad_id, sampling.bos_id) == ((2, 5), 0, 1)
    assert (sampling.no_repeat_ngram_size, sampling.repetition_penalty) == (3, 1.1)
    assert sampling.stop == ("\n\n",) and sampling.num_return_sequences == 2
