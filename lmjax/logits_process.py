"""What `generate` is asked to do (`SamplingConfig`), and how a next-token distribution is shaped:
Hugging Face's logits processors, then its warpers, in Hugging Face's order.

Shape letters: B rows (prompts, or prompts x beams), V vocab_size, T history slots (the padded
prompt, then the generated tokens; -1 where there is no token), S max_new_tokens.

For each new token, `generate` computes the model's logits and then, as transformers'
`generate` does (`_get_logits_processor` in transformers/generation/utils.py):

1. **processors** (`process_logits`), in this order: repetition_penalty (on every token of the
   prompt and of the generated text; a logit < 0 is multiplied by the penalty, one >= 0 divided),
   no_repeat_ngram_size (a token that would repeat an n-gram of the history gets -inf),
   bad_words_ids (-inf for the last token of a bad sequence whose other tokens end the history),
   min_new_tokens / min_length (-inf for the end tokens until enough tokens are generated);
2. **warpers** (`warp_logits`, sampling only): temperature, then top-k, then top-p;
3. a token: argmax (greedy), a draw (sampling), or, in beam search, the processed
   log-probabilities rank the candidates (`beam_search.py`; beam search applies the processors
   to log_softmax(logits), as transformers does).

Where lmjax differs on purpose: left padding is not part of the history (transformers' n-gram
and bad-words processors see the pad tokens of a left-padded batch; its repetition penalty
already skips them), and `min_length` counts the longest prompt of the batch where transformers
counts the padded width (the same when prompts are padded to the longest).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from lmjax.config import ModelConfig

DEFAULT_MAX_NEW_TOKENS = 64  # when neither max_new_tokens nor max_length is given
EARLY_STOPPING = (True, False, "never")


# ---------------------------------------------------------------------------------------- config


def _id_tuples(value, name: str) -> tuple[tuple[int, ...], ...]:
    """[[1, 2], [3]] -> ((1, 2), (3,)); ValueError naming the field otherwise."""
    try:
        out = tuple(tuple(int(i) for i in seq) for seq in value)
    except (TypeError, ValueError):
        raise ValueError(f"sampling.{name}={value!r} must be a list of token-id lists") from None
    if any(not seq or min(seq) < 0 for seq in out):
        raise ValueError(f"sampling.{name}={value!r} must be non-empty lists of token ids >= 0")
    return out


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens, with the options (and semantics) of Hugging Face `generate`.

    Frozen and hashable: `generate` passes its `fitted` form to the jitted decoders as a static
    argument. Every field is checked when the config is made (ValueError naming the field).

    Greedy decoding is `greedy=True` or `temperature=0`; otherwise tokens are sampled from
    softmax(processed logits / temperature) restricted by `top_k` (0 = off) and `top_p` (1.0 =
    off). `num_beams > 1` is (deterministic) beam search; the sampling knobs must then be off
    (or greedy=True, which ignores them). A row ends after emitting any of `eos_ids` (the end
    token is kept in its tokens and counted in its length), or one of `stop_sequences`; positions
    after the end hold `pad_id`.
    """

    max_new_tokens: int | None = None  # None: max_length - longest prompt, else 64
    temperature: float = 1.0  # > 0 to sample; 0 means greedy
    greedy: bool = False
    top_k: int = 0  # keep the k most likely tokens (ties kept); 0 = off; >= vocab = off
    top_p: float = 1.0  # nucleus: smallest set with probability >= top_p; 1.0 = off
    num_beams: int = 1  # 1 = no beam search
    length_penalty: float = 1.0  # beam score = sum logprob / generated_length ** length_penalty
    early_stopping: bool | str = False  # beam: True, False (HF's heuristic) or "never"
    eos_ids: tuple[int, ...] = ()  # end tokens (may be empty)
    pad_id: int = 0  # written after the end of each row (never fed to the model)
    max_length: int | None = None  # prompt + new tokens (longest prompt); max_new_tokens wins
    min_new_tokens: int = 0  # end tokens are forbidden before this many new tokens
    min_length: int = 0  # ... before the longest prompt + new tokens reach this
    num_return_sequences: int = 1  # per prompt: sampled ones, or the best beams (<= num_beams)
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in the text
    no_repeat_ngram_size: int = 0  # 0 = off; n: no n-gram occurs twice
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences that are never completed
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # a row ends when it emits one of these
    stop: tuple[str, ...] = ()  # stop strings (text APIs: sample_text, pipeline)
    seed: int | None = None  # overrides generate's rng (a per-call seed)
    bos_id: int | None = None  # what an empty prompt becomes in the text APIs

    def __post_init__(self):
        eos = (self.eos_ids,) if isinstance(self.eos_ids, (int, np.integer)) else self.eos_ids
        try:
            eos = tuple(int(i) for i in eos)
        except (TypeError, ValueError):
            raise ValueError(
                f"sampling.eos_ids={self.eos_ids!r} must be a tuple of token ids") from None
        object.__setattr__(self, "eos_ids", eos)
        for name in ("bad_words_ids", "stop_sequences"):
            object.__setattr__(self, name, _id_tuples(getattr(self, name), name))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"sampling.stop={self.stop!r} must be non-empty strings")
        object.__setattr__(self, "stop", stop)
        if isinstance(self.early_stopping, (bool, np.bool_)):
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether a processor reads the tokens so far (the decoders then build the history)."""
        return (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
                or any(len(seq) > 1 for seq in self.bad_words_ids))

    def validate(self) -> None:
        """Checks every field on its own; raises ValueError naming the field and allowed range."""
        def integer(name, minimum, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < minimum:
                raise ValueError(f"sampling.{name}={value!r} must be an integer >= {minimum}"
                                 + (" (or None)" if optional else ""))

        integer("max_new_tokens", 1, optional=True)
        integer("max_length", 2, optional=True)
        for name in ("top_k", "min_new_tokens", "min_length", "no_repeat_ngram_size"):
            integer(name, 0)
        integer("num_beams", 1)
        integer("num_return_sequences", 1)
        integer("seed", 0, optional=True)
        integer("bos_id", 0, optional=True)
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, (int, np.integer)):
            raise ValueError(f"sampling.pad_id={self.pad_id!r} must be an integer")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"sampling.temperature={self.temperature!r} must be > 0 to sample "
                "(or 0, or greedy=True, for greedy decoding)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p={self.top_p!r} must be in (0, 1] (1.0 = off)")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"sampling.length_penalty={self.length_penalty!r} must be finite")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"sampling.repetition_penalty={self.repetition_penalty!r} must be "
                             "> 0 (1.0 = off)")
        if self.early_stopping not in EARLY_STOPPING or (
                isinstance(self.early_stopping, str) and self.early_stopping != "never"):
            raise ValueError(f"sampling.early_stopping={self.early_stopping!r} must be True, "
                             "False or 'never'")
        if any(i < 0 for i in self.eos_ids):
            raise ValueError(f"sampling.eos_ids={self.eos_ids} must be token ids >= 0")
        if self.num_beams > 1 and not self.is_greedy and (
                self.top_k or self.top_p < 1.0 or self.temperature != 1.0):
            raise ValueError(
                f"sampling.num_beams={self.num_beams} is deterministic beam search: leave "
                "temperature (1.0), top_k (0) and top_p (1.0) off")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"sampling.num_return_sequences={self.num_return_sequences} must "
                             f"be <= num_beams={self.num_beams}")
        if self.num_beams == 1 and self.is_greedy and self.num_return_sequences > 1:
            raise ValueError(f"sampling.num_return_sequences={self.num_return_sequences} needs "
                             "sampling or beam search: greedy decoding gives one sequence")

    def check_model(self, model_config: ModelConfig) -> None:
        """Checks the fields that depend on the model (vocabulary size)."""
        V = model_config.vocab_size
        if self.num_beams > V:
            raise ValueError(
                f"sampling.num_beams={self.num_beams} must be in [1, vocab_size={V}]")
        for name in ("eos_ids", "bad_words_ids", "stop_sequences", "bos_id"):
            value = getattr(self, name)
            ids = [] if value is None else [value] if isinstance(value, int) else value
            flat = [i for x in ids for i in (x if isinstance(x, tuple) else (x,))]
            bad = [i for i in flat if i >= V]
            if bad:
                raise ValueError(f"sampling.{name} {bad} are not below vocab_size={V}")

    def fitted(self, longest_prompt: int, max_len: int) -> "SamplingConfig":
        """The config the jitted decoders get for prompts of at most `longest_prompt` tokens:
        max_new_tokens resolved (from max_length; capped, with a warning, to what fits
        model.max_len), min_length folded into min_new_tokens, and the fields that only the
        entry points read (seed, stop strings, bos, num_return_sequences) cleared, so that they
        do not cause a new compile."""
        if self.max_new_tokens is not None:
            wanted, name = self.max_new_tokens, "max_new_tokens"
        elif self.max_length is not None:
            wanted, name = self.max_length - longest_prompt, "max_length"
            if wanted < 1:
                raise ValueError(f"sampling.max_length={self.max_length} leaves no new token "
                                 f"after a {longest_prompt}-token prompt")
        else:
            wanted, name = DEFAULT_MAX_NEW_TOKENS, "max_new_tokens"
        room = max_len - longest_prompt
        if wanted > room:
            value = self.max_length if name == "max_length" else wanted
            logging.warning("sampling.%s=%d does not fit model.max_len=%d after a %d-token "
                            "prompt: generating at most %d tokens", name, value, max_len,
                            longest_prompt, room)
        min_new = max(self.min_new_tokens, self.min_length - longest_prompt)
        return dataclasses.replace(
            self, max_new_tokens=min(wanted, room), max_length=None, min_length=0,
            min_new_tokens=min_new if self.eos_ids else 0, num_return_sequences=1, stop=(),
            seed=None, bos_id=None)

    @classmethod
    def from_hf(cls, folder_or_config, **overrides) -> "SamplingConfig":
        """The defaults of a Hugging Face model: `folder_or_config` is a model folder (its
        config.json, then its generation_config.json, see `hf.generation_defaults`) or such a
        dict of `GenerationConfig` fields. `overrides` are SamplingConfig fields.

        As in transformers, do_sample (default False) chooses greedy or sampling, and sampling
        uses top_k=50 unless the file says otherwise. A pad_token_id of None becomes the first
        end token (transformers does the same, with a warning).
        """
        if isinstance(folder_or_config, (str, os.PathLike)):
            from lmjax import hf  # hf.py reads files; nothing else here does
            folder_or_config = hf.generation_defaults(str(folder_or_config))
        return cls(**{**hf_generation_fields(folder_or_config), **overrides})


def hf_generation_fields(gen: dict[str, Any]) -> dict[str, Any]:
    """SamplingConfig fields from Hugging Face `GenerationConfig` fields (unset ones left out)."""
    fields: dict[str, Any] = {}
    sample = bool(gen.get("do_sample") or False)
    fields["greedy"] = not sample
    if sample:
        fields["top_k"] = int(gen.get("top_k") if gen.get("top_k") is not None else 50)
        for name in ("temperature", "top_p"):
            if gen.get(name) is not None:
                fields[name] = float(gen[name])
    same = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "num_beams",
            "length_penalty", "early_stopping", "num_return_sequences", "repetition_penalty",
            "no_repeat_ngram_size", "bad_words_ids")
    fields.update({name: gen[name] for name in same if gen.get(name) is not None})
    eos = gen.get("eos_token_id")
    if eos is not None:
        fields["eos_ids"] = (eos,) if isinstance(eos, int) else tuple(eos)
    pad = gen.get("pad_token_id")
    if pad is None and fields.get("eos_ids"):
        pad = fields["eos_ids"][0]
    if pad is not None:
        fields["pad_id"] = int(pad)
    if gen.get("bos_token_id") is not None:
        fields["bos_id"] = int(gen["bos_token_id"])
    if gen.get("stop_strings"):
        fields["stop"] = gen["stop_strings"]
    return fields


# --------------------------------------------------------------------------------- processors


def token_mask(ids_BxT: jax.Array, V: int) -> jax.Array:
    """bool[B, V]: which tokens occur in each row (ids < 0 or >= V are ignored)."""
    B = ids_BxT.shape[0]
    ids_BxT = jnp.where((ids_BxT < 0) | (ids_BxT >= V), V, ids_BxT)
    mask = jnp.zeros((B, V + 1), bool).at[jnp.arange(B)[:, None], ids_BxT].set(True)
    return mask[:, :V]


def ngram_banned(history_BxT: jax.Array, filled: jax.Array, n: int, V: int) -> jax.Array:
    """bool[B, V]: the tokens that would complete an n-gram already in the history (its first
    `filled` slots hold tokens, -1 where there is none), as transformers'
    NoRepeatNGramLogitsProcessor: every window whose first n - 1 tokens equal the last n - 1
    bans its own last token."""
    if n == 1:  # every token of the history is a 1-gram already there
        return token_mask(history_BxT, V)
    T = history_BxT.shape[1]
    prefix_Bx1xP = lax.dynamic_slice_in_dim(history_BxT, filled - (n - 1), n - 1, axis=1)[:, None]
    windows_BxWxP = jnp.stack([history_BxT[:, j:T - n + 1 + j] for j in range(n - 1)], axis=-1)
    real_B = jnp.all(prefix_Bx1xP >= 0, axis=(1, 2)) & (filled >= n - 1)
    match_BxW = jnp.all(windows_BxWxP == prefix_Bx1xP, axis=-1) & real_B[:, None]
    return token_mask(jnp.where(match_BxW, history_BxT[:, n - 1:], -1), V)


def _ban_bad_words(scores_BxV, history_BxT, filled, bad_words, eos_ids):
    """-inf for the last token of each bad sequence whose other tokens end the history (a bad
    word equal to [eos] is ignored, as by transformers' NoBadWordsLogitsProcessor)."""
    V = scores_BxV.shape[-1]
    bad_words = [w for w in bad_words if not (len(w) == 1 and w[0] in eos_ids)]
    singles = [w[0] for w in bad_words if len(w) == 1]
    if singles:
        scores_BxV = jnp.where(jnp.isin(jnp.arange(V), jnp.asarray(singles)), -jnp.inf,
                               scores_BxV)
    for word in (w for w in bad_words if len(w) > 1):
        m = len(word) - 1
        tail_BxM = lax.dynamic_slice_in_dim(history_BxT, jnp.maximum(filled - m, 0), m, axis=1)
        hit_B = jnp.all(tail_BxM == jnp.asarray(word[:-1]), axis=1) & (filled >= m)
        scores_BxV = scores_BxV.at[:, word[-1]].set(
            jnp.where(hit_B, -jnp.inf, scores_BxV[:, word[-1]]))
    return scores_BxV


def process_logits(scores_BxV: jax.Array, history_BxT: jax.Array | None, filled, step,
                   sampling: SamplingConfig) -> jax.Array:
    """transformers' logits processors, in its order (see the module docstring).

    `history_BxT`: prompt then generated tokens, -1 where there is none (None when
    `sampling.needs_history` is False); `filled`: slots of it holding tokens so far; `step`:
    tokens generated so far. Without any processor on, the scores themselves.
    """
    V = scores_BxV.shape[-1]
    if sampling.repetition_penalty != 1.0:
        seen_BxV = token_mask(history_BxT, V)
        p = sampling.repetition_penalty
        scores_BxV = jnp.where(seen_BxV, jnp.where(scores_BxV < 0, scores_BxV * p,
                                                   scores_BxV / p), scores_BxV)
    if sampling.no_repeat_ngram_size:
        banned = ngram_banned(history_BxT, filled, sampling.no_repeat_ngram_size, V)
        scores_BxV = jnp.where(banned, -jnp.inf, scores_BxV)
    if sampling.bad_words_ids:
        scores_BxV = _ban_bad_words(scores_BxV, history_BxT, filled, sampling.bad_words_ids,
                                    sampling.eos_ids)
    if sampling.min_new_tokens and sampling.eos_ids:
        is_eos_V = jnp.isin(jnp.arange(V), jnp.asarray(sampling.eos_ids))
        scores_BxV = jnp.where(is_eos_V & (step < sampling.min_new_tokens), -jnp.inf, scores_BxV)
    return scores_BxV


# ------------------------------------------------------------------------------------ warpers


def warp_logits(logits_BxV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The logits actually sampled from: / temperature, then top-k, then top-p (HF's warpers).

    Tokens outside the kept set get -inf. Top-k keeps every token tied with the k-th; top-p keeps
    the smallest set of most likely tokens whose probability reaches top_p (the most likely
    token is always kept).
    """
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    V = logits_BxV.shape[-1]
    if 0 < sampling.top_k < V:
        kth_Bx1 = lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        top_p_B = jnp.full(logits_BxV.shape[:1], sampling.top_p, jnp.float32)
        logits_BxV = jnp.where(logits_BxV < top_p_threshold(logits_BxV, top_p_B), -jnp.inf,
                               logits_BxV)
    return logits_BxV


# Top-k and top-p thresholds come from the largest logits (lax.top_k), not a sort over the
# vocabulary: GPT-2's 50,257 logits, 16 rows, 2 cores: sort 150-168 ms, lax.top_k of 256 / 1024 /
# 4096 candidates 3.5 / 8.1 / 25 ms. 256 hold the top-k values in use (40, 50); 1024 a trained
# model's usual top-p 0.9-0.95 set. The result is the same: the sort runs instead (lax.cond)
# when a row needs more (top_k > 256, or a top-p set the 1024 do not complete).
TOP_K_CANDIDATES = 256
TOP_P_CANDIDATES = 1024


def kth_largest(logits_BxV: jax.Array, k_B: jax.Array) -> jax.Array:
    """[B, 1]: row b's k_B[b]-th largest logit (k >= 1; ties counted), top-k's threshold."""
    V = logits_BxV.shape[-1]
    K = min(V, TOP_K_CANDIDATES)
    k_Bx1 = k_B[:, None] - 1

    def from_sort():
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
        return jnp.take_along_axis(sorted_BxV, jnp.clip(k_Bx1, 0, V - 1), axis=-1)
    return lax.cond(jnp.all(k_B <= K), lambda: jnp.take_along_axis(
        lax.top_k(logits_BxV, K)[0], jnp.clip(k_Bx1, 0, K - 1), axis=-1), from_sort)


def top_p_threshold(logits_BxV: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """[B, 1]: the smallest logit of row b's top-p set, the fewest most likely tokens whose
    probability reaches top_p_B[b] (the most likely token is always in it)."""
    V = logits_BxV.shape[-1]
    K = min(V, TOP_P_CANDIDATES)
    # The max over V, not candidates[:, :1]: taking it from lax.top_k's output made the
    # candidates cost a sort again (16 GPT-2 rows: top-p 0.9 13 -> 155 ms, top-k 40 6 -> 63).
    max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    total_Bx1 = jnp.sum(jnp.exp(logits_BxV - max_Bx1), axis=-1, keepdims=True)  # softmax's sum

    def threshold(sorted_BxN):  # the N largest logits, descending
        probs_BxN = jnp.exp(sorted_BxN - max_Bx1) / total_Bx1
        mass_before_BxN = jnp.cumsum(probs_BxN, axis=-1) - probs_BxN  # exclusive; first is 0
        keep_B = jnp.sum(mass_before_BxN < top_p_B[:, None], axis=-1)
        kept_Bx1 = jnp.take_along_axis(sorted_BxN, jnp.maximum(keep_B, 1)[:, None] - 1, axis=-1)
        # Exact unless all N are kept and their mass is short of top_p (more may be needed).
        complete_B = (keep_B < sorted_BxN.shape[-1]) | (jnp.sum(probs_BxN, -1) >= top_p_B)
        return kept_Bx1, complete_B
    kept_Bx1, complete_B = threshold(lax.top_k(logits_BxV, K)[0])
    return lax.cond(jnp.all(complete_B | (top_p_B >= 1.0)), lambda: kept_Bx1,
                    lambda: threshold(-jnp.sort(-logits_BxV, axis=-1))[0])


def sample_logits(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row: argmax when greedy, else a draw from `warp_logits` with row b's key.
    (The processors, which need the history, are applied by the caller first.)"""
    if sampling.is_greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = warp_logits(logits_BxV, sampling)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def process_rows(scores_BxV: jax.Array, seen_BxV: jax.Array, penalty_B: jax.Array,
                 end_ids_BxE: jax.Array, min_new_tokens_B: jax.Array, steps_B: jax.Array
                 ) -> jax.Array:
    """`process_logits`' repetition_penalty and min_new_tokens with each row's own settings
    (the server's decode slots): row b's tokens seen so far (prompt and generated, `seen`)
    get penalty[b] as transformers' RepetitionPenaltyLogitsProcessor applies it, and its end
    tokens (`end_ids`, -1 where none) get -inf while steps[b] < min_new_tokens[b]. Rows with
    penalty 1.0 and min_new_tokens 0 are unchanged; with none such, nothing is computed."""
    V = scores_BxV.shape[-1]

    def process(scores_BxV):
        p_Bx1 = penalty_B[:, None]
        penalized_BxV = jnp.where(scores_BxV < 0, scores_BxV * p_Bx1, scores_BxV / p_Bx1)
        scores_BxV = jnp.where(seen_BxV & (p_Bx1 != 1.0), penalized_BxV, scores_BxV)
        is_end_BxV = jnp.any(jnp.arange(V)[None, :, None] == end_ids_BxE[:, None, :], axis=-1)
        banned_BxV = is_end_BxV & (steps_B < min_new_tokens_B)[:, None]
        return jnp.where(banned_BxV, -jnp.inf, scores_BxV)
    on = jnp.any(penalty_B != 1.0) | jnp.any(steps_B < min_new_tokens_B)
    return lax.cond(on, process, lambda x: x, scores_BxV)


def warp_rows(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
              top_p_B: jax.Array) -> jax.Array:
    """`warp_logits` with each row's own settings (arrays [B]; the server's decode slots): the
    same operations in the same order, so a row's warped logits equal warp_logits' for its
    settings. top_k 0 (or >= V) and top_p 1.0 are off; temperature must be > 0 (a greedy row's
    result is not used)."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature_B[:, None]
    V = logits_BxV.shape[-1]
    k_on_B = (top_k_B > 0) & (top_k_B < V)
    # Without top-k or top-p in any row, skip the thresholds (lax.cond runs one branch).
    return lax.cond(jnp.any(k_on_B | (top_p_B < 1.0)), _top_k_top_p_rows, lambda x, *_: x,
                    logits_BxV, k_on_B, top_k_B, top_p_B)


def _top_k_top_p_rows(logits_BxV, k_on_B, top_k_B, top_p_B):
    # top-k: the k-th largest is the threshold (ties kept); then top-p over what top-k kept.
    kth_Bx1 = jnp.where(k_on_B[:, None], kth_largest(logits_BxV, jnp.where(k_on_B, top_k_B, 1)),
                        -jnp.inf)
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    threshold_Bx1 = jnp.where((top_p_B < 1.0)[:, None], top_p_threshold(logits_BxV, top_p_B),
                              -jnp.inf)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """`sample_logits` with each row's own settings: argmax where temperature is 0, else a draw
    from `warp_rows` with the row's key."""
    greedy_B = temperature_B == 0
    argmax_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw():
        warped_BxV = warp_rows(logits_BxV, jnp.where(greedy_B, 1.0, temperature_B), top_k_B,
                               top_p_B)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, warped_BxV).astype(jnp.int32)
        return jnp.where(greedy_B, argmax_B, drawn_B)
    return lax.cond(jnp.all(greedy_B), lambda: argmax_B, draw)


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """Row b's key: fold_in(rng, b)."""
    return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))


def step_keys(keys_B: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda key: jax.random.fold_in(key, step))(keys_B)


def token_logprob(logits_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """log_softmax(logits)[token]: what the unmodified model thinks of each picked token."""
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------- stopping


def is_end(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def ends(token_X: jax.Array, generated_XxS: jax.Array, step, sampling: SamplingConfig
         ) -> jax.Array:
    """bool[X]: whether sequences end with `token` (their token `step`; `generated` holds their
    tokens 0..step): on an end token, or on one of the stop sequences (matched on the generated
    tokens only, not the prompt)."""
    hit_X = is_end(token_X, sampling.eos_ids)
    S = generated_XxS.shape[-1]
    for seq in sampling.stop_sequences:
        m = len(seq)
        if m > S:
            continue
        window = lax.dynamic_slice_in_dim(generated_XxS, jnp.maximum(step - m + 1, 0), m, axis=-1)
        hit_X = hit_X | (jnp.all(window == jnp.asarray(seq, jnp.int32), axis=-1) & (step >= m - 1))
    return hit_X
