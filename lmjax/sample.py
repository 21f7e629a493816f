"""Generation from a Transformer, option for option as Hugging Face `generate`: greedy,
sampling (temperature, top-k, top-p), beam search, with a KV cache in one jitted program.

    tokens, logprobs, lengths = generate(params, model_config, [[1, 2, 3]], SamplingConfig(
        max_new_tokens=50, num_beams=4, no_repeat_ngram_size=3, num_return_sequences=2))
    texts = sample_text(params, model_config, tokenizer, ["ROMEO."], SamplingConfig(stop="\\n"))

Where things are:
  * logits_process.py: `SamplingConfig` (every option, validated) and the logits processors and
    warpers, in transformers' order;
  * decode.py: prompts padded to buckets, the KV cache, prefill, the phased while loop;
  * beam_search.py: beam search as transformers' `_beam_search`;
  * this file: greedy / sampled decoding, and the entry points `generate` and `sample_text`.

Shape letters as in decode.py (B rows, L padded prompt length, S max_new_tokens, V vocab).

Sampling a token: the processors (repetition penalty, n-gram blocking, bad words, minimum
length) then, when sampling, temperature, top-k and top-p. Randomness is per row: row b at step
s uses `fold_in(fold_in(rng, b), s)`, so a batch is reproducible given a seed and a row's tokens
do not depend on the other rows' prompts (for the same batch size and bucket). With
`num_return_sequences=R`, prompt b is rows b * R .. b * R + R - 1.

Log-probabilities returned next to the tokens are always those of the **unmodified model**
(temperature 1, no processor): `log_softmax(logits)[token]`. They score what the model thinks of
the text, whatever the sampling knobs; their sum is the sequence log-likelihood.

Stopping: a row ends on an end token (`eos_ids`) or on a stop sequence (`stop_sequences`, token
ids), both checked inside the jitted loop, which stops when every row has ended. Stop strings
(`stop`, in `sample_text` and the pipeline) are encoded into stop sequences for the loop and
matched again on the decoded text, which is cut before the first match: so a stop string that
the model spells with other tokens still ends the text, though not the loop.

`max_new_tokens` (or `max_length` - the longest prompt) is capped to what fits the model:
model.max_len minus the longest prompt (with a warning); a prompt with no room for a new token is
an error. When no new option is used, the decode step's program is the one without them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import decode
from lmjax import logits_process as lp_lib
from lmjax.beam_search import BeamResult, _beam_jit, beam_search
from lmjax.config import ModelConfig
from lmjax.decode import (CACHE_AXES, CacheLayout, bucket_length, cache_layout, cache_phases,
                          grow_cache, new_cache, prepare_prompts, shard_cache, take_beams)
from lmjax.logits_process import (SamplingConfig, process_logits, row_keys, sample_logits,
                                  warp_logits)

# The names callers and tests used before the split into modules.
__all__ = ["SamplingConfig", "Generation", "BeamResult", "generate", "beam_search", "sample_text",
           "process_logits", "warp_logits", "sample_logits", "row_keys", "prepare_prompts",
           "CACHE_AXES", "CacheLayout", "bucket_length", "cache_layout", "cache_phases",
           "grow_cache", "new_cache", "shard_cache", "take_beams", "_beam_jit", "_sample_jit",
           "_prefill", "_forward_one"]
_prefill, _forward_one = decode.prefill, decode.forward_one


class Generation(NamedTuple):
    """What `generate` returns (a tuple: `tokens, logprobs, lengths = generate(...)`)."""

    tokens: jax.Array  # int32[B * R, S]: generated ids, pad_id after each row's end
    logprobs: jax.Array  # float32[B * R, S]: log p(token | prefix), unmodified model; 0 on pad
    lengths: jax.Array  # int32[B * R]: generated tokens per row, end token included


# ----------------------------------------------------------------------------------- sampling


@functools.partial(jax.jit, static_argnames=("model_config", "sampling", "phases", "layout"))
def _sample_jit(params, prompt_BxL: jax.Array, lengths_B: jax.Array, rng: jax.Array, *,
                model_config: ModelConfig, sampling: SamplingConfig, phases: tuple[int, ...],
                layout: CacheLayout = CacheLayout()):
    """Greedy / sampled decoding of a padded batch; returns (tokens, logprobs, lengths, steps)."""
    B, L = prompt_BxL.shape
    S = sampling.max_new_tokens
    keys_B = row_keys(rng, B)
    pad = jnp.int32(sampling.pad_id)
    prompt_hist_BxL = (decode.prompt_history(prompt_BxL, lengths_B) if sampling.needs_history
                       else None)

    def emit(state, logits_BxV):
        """Picks token `step` for every unfinished row and records it."""
        step = state["step"]
        history_BxT = None if prompt_hist_BxL is None else jnp.concatenate(
            [prompt_hist_BxL, jnp.where(jnp.arange(S) < step, state["tokens"], -1)], axis=1)
        scores_BxV = process_logits(logits_BxV, history_BxT, L + step, step, sampling)
        tokens_B = sample_logits(scores_BxV, lp_lib.step_keys(keys_B, step), sampling)
        active_B = ~state["done"]
        logprob_B = jnp.where(active_B, lp_lib.token_logprob(logits_BxV, tokens_B), 0.0)
        state = dict(
            state, step=step + 1,
            feed=jnp.where(active_B, tokens_B, 0),  # finished rows feed a harmless token 0
            tokens=state["tokens"].at[:, step].set(jnp.where(active_B, tokens_B, pad)),
            logprobs=state["logprobs"].at[:, step].set(logprob_B),
            lengths=jnp.where(active_B, step + 1, state["lengths"]))
        end_B = (lp_lib.ends(tokens_B, state["tokens"], step, sampling) if sampling.stop_sequences
                 else lp_lib.is_end(tokens_B, sampling.eos_ids))
        return dict(state, done=state["done"] | (active_B & end_B))

    def body(state):
        # Token step - 1 goes in at slot L + step - 1, position len_b + step - 1; out come the
        # logits of token step.
        logits_BxV, cache = decode.forward_one(params, model_config, state["feed"],
                                               lengths_B + state["step"] - 1, state["cache"],
                                               L + state["step"] - 1, layout)
        return emit(dict(state, cache=cache), logits_BxV)

    first_BxV, cache = decode.prefill(params, model_config, prompt_BxL, lengths_B, phases[0],
                                      layout)
    state = dict(step=jnp.int32(0), feed=jnp.zeros(B, jnp.int32), cache=cache,
                 tokens=jnp.full((B, S), pad, jnp.int32), logprobs=jnp.zeros((B, S), jnp.float32),
                 lengths=jnp.zeros(B, jnp.int32), done=jnp.zeros(B, bool))
    state = emit(state, first_BxV)
    state = decode.phased_loop(state, body, lambda s: ~jnp.all(s["done"]), phases, L, S, layout)
    return state["tokens"], state["logprobs"], state["lengths"], state["step"]


# ------------------------------------------------------------------------------ entry points


def _as_key(rng) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def generate(params: Any, model_config: ModelConfig, prompt_ids, sampling: SamplingConfig,
             rng: jax.Array | int = 0, prompt_lengths=None) -> Generation:
    """Continues each prompt by up to `sampling.max_new_tokens` tokens (see SamplingConfig for
    every option; capped to what fits model.max_len after the longest prompt, with a warning).

    On a mesh (`jax.set_mesh` and `nn.logical_axis_rules`), the KV cache is sharded by the
    rules' `cache_*` axes (see decode.py).

    Args:
      params: model parameters (as from `init_params` or a checkpoint).
      prompt_ids: list of token-id lists (any lengths >= 1), or an int array [B, W] of
        right-padded prompts with `prompt_lengths` [B].
      sampling: how to pick tokens; `num_beams > 1` runs `beam_search` (rng unused).
      rng: a jax key or an int seed (`sampling.seed`, when set, takes its place).
    Returns:
      `Generation(tokens int32[B * R, S], logprobs float32[B * R, S], lengths int32[B * R])`,
      R = num_return_sequences (the best beams, best first, or R samples per prompt).
    """
    if sampling.stop:
        raise ValueError(f"sampling.stop={sampling.stop!r} (strings) needs a tokenizer: use "
                         "sample_text or lmjax.pipeline, or give token ids as "
                         "sampling.stop_sequences")
    R = sampling.num_return_sequences
    if sampling.num_beams > 1:
        best = beam_search(params, model_config, prompt_ids, sampling, prompt_lengths)
        S = best.tokens.shape[-1]
        return Generation(best.tokens[:, :R].reshape(-1, S), best.logprobs[:, :R].reshape(-1, S),
                          best.lengths[:, :R].reshape(-1))
    rng = _as_key(rng if sampling.seed is None else sampling.seed)
    prompt_BxL, lengths_B, fitted = prepare_prompts(prompt_ids, model_config, sampling,
                                                    prompt_lengths, repeat=R)
    tokens, logprobs, lengths, _ = _sample_jit(
        params, jnp.asarray(prompt_BxL), jnp.asarray(lengths_B), rng,
        model_config=model_config, sampling=fitted,
        phases=cache_phases(prompt_BxL.shape[1], fitted.max_new_tokens, model_config.max_len),
        layout=cache_layout(model_config))
    return Generation(tokens, logprobs, lengths)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (the whole text if none; an empty
    stop string cuts nothing, as in lm-evaluation-harness)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def sample_text(params: Any, model_config: ModelConfig, tokenizer, prompts: Sequence[str],
                sampling: SamplingConfig, seed: int = 0) -> list[str]:
    """Generates completions (the new text only) for prompt strings: num_return_sequences per
    prompt (prompt b's are items b * R .. b * R + R - 1).

    Prompts are encoded as they are (training data has no bos); an empty prompt is [bos]
    (`sampling.bos_id`, else the tokenizer's) and an error without one. The tokenizer's eos_id
    (if any) is added to the end tokens; end and pad tokens are not decoded. Stop strings
    (`sampling.stop`) end the loop when their tokens are emitted, and each text is cut before
    the first one it contains.
    """
    bos = sampling.bos_id if sampling.bos_id is not None else getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    prompt_ids = []
    for i, prompt in enumerate(prompts):
        ids = list(tokenizer.encode(prompt))
        if not ids:
            if bos is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no bos token: "
                                 "give at least one character of prompt")
            ids = [bos]
        prompt_ids.append(ids)
    if eos is not None and eos not in sampling.eos_ids:
        sampling = dataclasses.replace(sampling, eos_ids=sampling.eos_ids + (eos,))
    stop = sampling.stop
    if stop:
        encoded = tuple(tuple(tokenizer.encode(s)) for s in stop)
        sampling = dataclasses.replace(sampling, stop=(), stop_sequences=sampling.stop_sequences
                                       + tuple(seq for seq in encoded if seq))
    tokens, _, lengths = generate(params, model_config, prompt_ids, sampling, seed)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    ends = set(sampling.eos_ids)
    return [cut_at_stop(tokenizer.decode([t for t in row[:n].tolist() if t not in ends]), stop)
            for row, n in zip(tokens, lengths)]
