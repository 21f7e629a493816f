"""Beam search with a KV cache, step for step as transformers' `_beam_search` (v5).

Shape letters as in decode.py, plus K candidates per prompt per step (`candidates`).

Each step, every alive beam's processed log-probabilities (`logits_process.process_logits` on
log_softmax(logits)) are added to its running sum, and the best K = max(2, 1 + #end tokens) * N
(beam, token) continuations of each prompt are ranked. Then, as in transformers:

* only candidates **ranked among the top N** that end (an end token, a stop sequence, or the
  length limit) become finished hypotheses, scored sum / generated_length ** length_penalty and
  merged into the best N finished so far; ending candidates ranked below N are dropped;
* the best N candidates that do not end stay alive (K leaves at least N of them);
* a prompt is done, and takes no more hypotheses, when N hypotheses have finished and
  - early_stopping=True: at once;
  - early_stopping=False: the best alive beam's sum / current length ** length_penalty cannot
    beat the worst finished score;
  - early_stopping="never": the same bound at max_new_tokens when length_penalty > 0 (a longer
    hypothesis could still win), at the current length otherwise.

The KV cache holds B * N sequences and follows the beams (each prompt's sequences gathered by
parent beam each step; `decode.take_beams`). The returned log-probabilities are those of the
unmodified model; the scores are what transformers returns as `sequences_scores`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lmjax import decode
from lmjax import logits_process as lp_lib
from lmjax.config import ModelConfig
from lmjax.decode import CacheLayout
from lmjax.logits_process import SamplingConfig


class BeamResult(NamedTuple):
    """All beams of `beam_search`, best first."""

    tokens: jax.Array  # int32[B, N, S]
    logprobs: jax.Array  # float32[B, N, S]: the unmodified model's
    lengths: jax.Array  # int32[B, N]
    scores: jax.Array  # float32[B, N]: sum of processed logprobs / length ** length_penalty


def candidates(sampling: SamplingConfig, vocab_size: int) -> int:
    """K: the continuations ranked per prompt per step (transformers' beams_to_keep)."""
    return min(max(2, 1 + len(sampling.eos_ids)) * sampling.num_beams,
               sampling.num_beams * vocab_size)


def _take(x_BxM, index_BxN):
    """Gathers along axis 1 (works for [B, M] and [B, M, S])."""
    index = index_BxN.reshape(index_BxN.shape + (1,) * (x_BxM.ndim - 2))
    return jnp.take_along_axis(x_BxM, index, axis=1)


def _done(fin_score_BxN, alive_sum_BxN, step, sampling: SamplingConfig):
    """Whether each prompt is done after step `step` (see the module docstring)."""
    full_B = fin_score_BxN[:, -1] > -jnp.inf
    if sampling.early_stopping is True:
        return full_B
    lp = sampling.length_penalty
    if sampling.early_stopping == "never" and lp > 0:
        length = jnp.float32(sampling.max_new_tokens)
    else:
        length = (step + 1).astype(jnp.float32)
    return full_B & (fin_score_BxN[:, -1] >= alive_sum_BxN[:, 0] / length ** lp)


def _select(state: dict, scores_BxNxV, logprobs_BxNxV, sampling: SamplingConfig):
    """Chooses token `step` of every beam and updates the finished hypotheses."""
    B, N, V = scores_BxNxV.shape
    S, K = sampling.max_new_tokens, candidates(sampling, V)
    step = state["step"]
    neg_inf = jnp.float32(-jnp.inf)
    total_BxNxV = state["alive_sum"][:, :, None] + scores_BxNxV
    total_BxK, index_BxK = lax.top_k(total_BxNxV.reshape(B, N * V), K)
    parent_BxK, token_BxK = index_BxK // V, (index_BxK % V).astype(jnp.int32)
    token_lp_BxK = _take(logprobs_BxNxV.reshape(B, N * V), index_BxK)
    seq_BxKxS = _take(state["alive_seq"], parent_BxK).at[:, :, step].set(token_BxK)
    lp_BxKxS = _take(state["alive_lp"], parent_BxK).at[:, :, step].set(token_lp_BxK)
    ends_BxK = lp_lib.ends(token_BxK, seq_BxKxS, step, sampling) | (step == S - 1)

    # Finished hypotheses: the ending candidates among the top N, merged into the best N.
    length = (step + 1).astype(jnp.float32)
    may_finish_BxK = ends_BxK & (jnp.arange(K) < N) & ~state["done"][:, None]
    new_score_BxK = jnp.where(may_finish_BxK, total_BxK / length ** sampling.length_penalty,
                              neg_inf)
    fin_score_BxN, keep_BxN = lax.top_k(
        jnp.concatenate([state["fin_score"], new_score_BxK], axis=1), N)
    fin_seq = _take(jnp.concatenate([state["fin_seq"], seq_BxKxS], axis=1), keep_BxN)
    fin_lp = _take(jnp.concatenate([state["fin_lp"], lp_BxKxS], axis=1), keep_BxN)
    fin_len = _take(jnp.concatenate(
        [state["fin_len"], jnp.full((B, K), step + 1, jnp.int32)], axis=1), keep_BxN)

    # Alive beams: the best N candidates that did not end.
    alive_sum_BxN, pick_BxN = lax.top_k(jnp.where(ends_BxK, neg_inf, total_BxK), N)
    done_B = _done(fin_score_BxN, alive_sum_BxN, step, sampling)
    return dict(
        state, step=step + 1, done=state["done"] | done_B,
        alive_seq=_take(seq_BxKxS, pick_BxN), alive_lp=_take(lp_BxKxS, pick_BxN),
        alive_sum=alive_sum_BxN, parent=_take(parent_BxK, pick_BxN),
        feed=_take(token_BxK, pick_BxN),
        fin_score=fin_score_BxN, fin_seq=fin_seq, fin_lp=fin_lp, fin_len=fin_len)


def _beam_history(prompt_BxT, alive_seq_BxNxS, step):
    """[B * N, L + S] histories of the beams for the processors: prompt, then tokens < step."""
    B, N, S = alive_seq_BxNxS.shape
    generated = jnp.where(jnp.arange(S) < step, alive_seq_BxNxS, -1)
    prompt = jnp.broadcast_to(prompt_BxT[:, None], (B, N, prompt_BxT.shape[1]))
    return jnp.concatenate([prompt, generated], axis=-1).reshape(B * N, -1)


@functools.partial(jax.jit, static_argnames=("model_config", "sampling", "phases", "layout"))
def _beam_jit(params, prompt_BxL: jax.Array, lengths_B: jax.Array, *,
              model_config: ModelConfig, sampling: SamplingConfig, phases: tuple[int, ...],
              layout: CacheLayout = CacheLayout()):
    """Beam search over a padded batch; returns the finished beams (best first) and steps."""
    B, L = prompt_BxL.shape
    N, S, V = sampling.num_beams, sampling.max_new_tokens, model_config.vocab_size
    pad = jnp.int32(sampling.pad_id)
    history = sampling.needs_history
    prompt_hist_BxL = decode.prompt_history(prompt_BxL, lengths_B) if history else None

    def scores(logits, state):
        """(processed, unmodified) log-probabilities [B, N, V] of every beam's next token."""
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        hist = _beam_history(prompt_hist_BxL, state["alive_seq"], state["step"]) if history \
            else None
        processed = lp_lib.process_logits(logprobs, hist, L + state["step"], state["step"],
                                          sampling)
        return processed.reshape(B, N, V), logprobs.reshape(B, N, V)

    def body(state):
        cache = decode.take_beams(state["cache"], state["parent"], model_config, layout)
        positions = jnp.repeat(lengths_B, N) + state["step"] - 1
        logits, cache = decode.forward_one(params, model_config, state["feed"].reshape(B * N),
                                           positions, cache, L + state["step"] - 1, layout)
        state = dict(state, cache=cache)
        return _select(state, *scores(logits, state), sampling)

    first_BxV, cache = decode.prefill(params, model_config, prompt_BxL, lengths_B, phases[0],
                                      layout)
    cache = decode.take_beams(cache, jnp.zeros((B, N), jnp.int32), model_config, layout)
    neg_inf = jnp.float32(-jnp.inf)
    # Only beam 0 is alive at first (the others would be copies of it).
    alive_sum = jnp.where(jnp.arange(N) == 0, 0.0, neg_inf)
    state = dict(
        step=jnp.int32(0), done=jnp.zeros(B, bool), cache=cache,
        alive_seq=jnp.full((B, N, S), pad, jnp.int32), alive_lp=jnp.zeros((B, N, S), jnp.float32),
        alive_sum=jnp.broadcast_to(alive_sum, (B, N)).astype(jnp.float32),
        parent=jnp.zeros((B, N), jnp.int32), feed=jnp.zeros((B, N), jnp.int32),
        fin_score=jnp.full((B, N), neg_inf), fin_seq=jnp.full((B, N, S), pad, jnp.int32),
        fin_lp=jnp.zeros((B, N, S), jnp.float32), fin_len=jnp.zeros((B, N), jnp.int32))
    first = jnp.repeat(first_BxV, N, axis=0)  # [B * N, V]: every beam starts from the prompt
    state = _select(state, *scores(first, state), sampling)
    state = decode.phased_loop(state, body, lambda s: ~jnp.all(s["done"]), phases, L, S, layout)
    return (BeamResult(state["fin_seq"], state["fin_lp"], state["fin_len"], state["fin_score"]),
            state["step"])


def beam_search(params: Any, model_config: ModelConfig, prompt_ids, sampling: SamplingConfig,
                prompt_lengths=None) -> BeamResult:
    """Beam search with `sampling.num_beams` beams; returns all N finished beams, best first
    (`generate` returns the best `num_return_sequences` of them).

    Scores are transformers' `sequences_scores`: sum of processed log-probabilities / length **
    length_penalty, length counting the generated tokens (end token included).
    """
    prompt_BxL, lengths_B, fitted = decode.prepare_prompts(prompt_ids, model_config, sampling,
                                                           prompt_lengths)
    result, _ = _beam_jit(
        params, jnp.asarray(prompt_BxL), jnp.asarray(lengths_B),
        model_config=model_config, sampling=fitted,
        phases=decode.cache_phases(prompt_BxL.shape[1], fitted.max_new_tokens,
                                   model_config.max_len),
        layout=decode.cache_layout(model_config))
    return result

