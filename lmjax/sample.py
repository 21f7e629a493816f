"""Sampling from a Transformer: greedy, temperature, top-k, top-p and beam search, with a KV cache.

Shape letters used in names (as in model.py):
  B batch (prompts), N beams per prompt, L padded prompt length (a bucket), T KV cache length,
  S max_new_tokens, V vocab_size, G kv heads, K head size, C = B * G cache rows, J KV-head groups
  of the rows, E = G / J heads per group, M cached sequences per prompt (beam search).

How a batch is generated (`generate`):

1. **Bucketing.** Prompts are left-padded to a bucket length L: the next power of two
   >= the longest prompt, at least 16 and at most `model.max_len`. One `jax.jit` compile serves
   every batch with the same (L, B, SamplingConfig, ModelConfig), so a new prompt length rarely
   means a new compile.
2. **Prefill.** One forward pass over the padded [B, L] prompts fills cache slots 0..L-1; row b's
   tokens sit at slots L - len_b .. L - 1 with positions 0 .. len_b - 1, and every row's first
   next-token logits are those at slot L - 1. Left padding puts every row's next token in the
   same slot, so each step writes the cache with one in-place `dynamic_update_slice`; the
   attention mask (a token at slot s with position p sees slots s - p .. s) hides the padding.
3. **Decode.** A `lax.while_loop` inside the same jit emits one token per step for all rows,
   feeding token s at slot L + s and position len_b + s, and stops when every row has emitted an
   end token or `max_new_tokens` tokens.
4. **A growing cache.** Attention reads the whole cache every step, so a cache sized for the
   longest possible sequence would make early steps pay for the last ones. The cache therefore
   starts at `2 L` slots (at least 64) and doubles between phases of the decode loop (one
   `while_loop` per phase; a phase ends when the next token's position would not fit), up to
   T = min(L + S, max_len). Each step reads at most about twice the cache it needs; the price is
   one copy of the cache per phase and a longer compile (one loop body per phase).

Sampling a token (`sample_logits`) applies temperature, then top-k, then top-p to the logits, as
Hugging Face's logits warpers do. Randomness is per row: row b at step s uses
`fold_in(fold_in(rng, b), s)`, so a batch is reproducible given a seed and a row's tokens do not
depend on the other rows' prompts (for the same batch size and bucket).

Log-probabilities returned next to the tokens are always those of the **unmodified model**
(temperature 1, no top-k/top-p): `log_softmax(logits)[token]`. They score what the model thinks
of the text, whatever the sampling knobs; their sum is the sequence log-likelihood.

Beam search (`beam_search`, used by `generate` when num_beams > 1) is deterministic; the KV cache
holds B * N sequences and follows the beams (each prompt's sequences gathered by parent beam each
step).

`max_new_tokens` is capped to what fits the model: model.max_len minus the longest prompt (with a
warning); a prompt with no room for a new token is an error.

**On a mesh** (inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, with parameters
sharded by the same rules), the KV cache gets the shardings of the rules' `cache_*` axes: its rows
(see model.py: [B * G, T, K], in KV-head groups, then sequences) are split over the mesh axes of
`cache_heads` (tensor), then those of `cache_batch` (data, fsdp), so each device holds the KV heads
that its share of the K/V projections computes, of its share of the sequences: decoding moves no
cache between devices. Every cache passes through `shard_cache` (made by `new_cache`, grown by
`grow_cache`, reordered by `take_beams`, returned by each forward pass). Without a mesh nothing
changes: one KV-head group, no constraints.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec

from lmjax.config import ModelConfig
from lmjax.model import KVCache, Transformer, init_kv_cache

# Logical axes of the KV cache [C, T, K] (rules in config.DEFAULT_RULES): its rows are split over
# the mesh axes of the first two, KV-head groups then sequences (see model.py's row order).
CACHE_AXES = ("cache_heads", "cache_batch", "cache_len", "head_dim")
MIN_BUCKET = 16  # shortest padded prompt length
MIN_CACHE = 64  # shortest cache of the first decode phase


# ---------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. Frozen and hashable: it is a static argument of the jitted decoder.

    Greedy decoding is `greedy=True` or `temperature=0`; otherwise tokens are sampled from
    softmax(logits / temperature) restricted by `top_k` (0 = off) and `top_p` (1.0 = off).
    `num_beams > 1` is (deterministic) beam search; sampling knobs must then be left off.
    A row ends after emitting any of `eos_ids` (the end token is kept in its tokens and counted in
    its length); positions after the end hold `pad_id`.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0  # > 0 to sample; 0 means greedy
    greedy: bool = False
    top_k: int = 0  # keep the k most likely tokens (ties kept); 0 = off; >= vocab = off
    top_p: float = 1.0  # nucleus: smallest set with probability >= top_p; 1.0 = off
    num_beams: int = 1  # 1 = no beam search
    length_penalty: float = 1.0  # beam score = sum logprob / generated_length ** length_penalty
    early_stopping: bool = False  # beam: stop a prompt as soon as num_beams hypotheses ended
    eos_ids: tuple[int, ...] = ()  # end tokens (may be empty)
    pad_id: int = 0  # written after the end of each row (never fed to the model)

    def __post_init__(self):
        eos = (self.eos_ids,) if isinstance(self.eos_ids, (int, np.integer)) else self.eos_ids
        try:
            eos = tuple(int(i) for i in eos)
        except (TypeError, ValueError):
            raise ValueError(
                f"sampling.eos_ids={self.eos_ids!r} must be a tuple of token ids") from None
        object.__setattr__(self, "eos_ids", eos)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Checks every field on its own; raises ValueError naming the field and allowed range."""
        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < minimum:
                raise ValueError(f"sampling.{name}={value!r} must be an integer >= {minimum}")

        integer("max_new_tokens", 1)
        integer("top_k", 0)
        integer("num_beams", 1)
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
        if any(i < 0 for i in self.eos_ids):
            raise ValueError(f"sampling.eos_ids={self.eos_ids} must be token ids >= 0")
        if self.num_beams > 1 and (self.top_k or self.top_p < 1.0 or
                                   not (self.is_greedy or self.temperature == 1.0)):
            raise ValueError(
                f"sampling.num_beams={self.num_beams} is deterministic beam search: leave "
                "temperature (1.0), top_k (0) and top_p (1.0) off")

    def check_model(self, model_config: ModelConfig) -> None:
        """Checks the fields that depend on the model (vocabulary size)."""
        V = model_config.vocab_size
        if self.num_beams > V:
            raise ValueError(
                f"sampling.num_beams={self.num_beams} must be in [1, vocab_size={V}]")
        bad = [i for i in self.eos_ids if i >= V]
        if bad:
            raise ValueError(f"sampling.eos_ids {bad} are not below vocab_size={V}")


class Generation(NamedTuple):
    """What `generate` returns (a tuple: `tokens, logprobs, lengths = generate(...)`)."""

    tokens: jax.Array  # int32[B, S]: generated ids, pad_id after each row's end
    logprobs: jax.Array  # float32[B, S]: log p(token | prefix) under the unmodified model; 0 on pad
    lengths: jax.Array  # int32[B]: generated tokens per row, end token included


class BeamResult(NamedTuple):
    """All beams of `beam_search(..., return_all_beams=True)`, best first."""

    tokens: jax.Array  # int32[B, N, S]
    logprobs: jax.Array  # float32[B, N, S]
    lengths: jax.Array  # int32[B, N]
    scores: jax.Array  # float32[B, N]: sum logprob / length ** length_penalty


# ----------------------------------------------------------------------------------- the cache


class CacheLayout(NamedTuple):
    """How the KV cache is split over the active mesh (`cache_layout`); a static argument of the
    jitted decoders, so that another mesh or rule table compiles anew. The default: no mesh."""

    groups: int = 1  # KV-head groups J of the rows (model.py): the ways the mesh splits them
    kv_heads: int = 0  # G, to count a cache's sequences; 0: no mesh, nothing is constrained
    heads: tuple[str, ...] = ()  # mesh axes of the groups (cache_heads)
    batch: tuple[str, ...] = ()  # mesh axes of the sequences (cache_batch)
    batch_ways: int = 1  # devices along `batch`
    length: tuple[str, ...] = ()  # mesh axes of the slots (cache_len)
    head_dim: tuple[str, ...] = ()


def _mesh_axes(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def cache_layout(model_config: ModelConfig) -> CacheLayout:
    """The cache layout for the active mesh (`jax.set_mesh`) and logical-axis rules
    (`nn.logical_axis_rules`); without both, the default (one group, nothing constrained).

    The KV heads form as many groups as the mesh splits `cache_heads` into (when that divides
    num_kv_heads; otherwise one group, replicated over those axes).
    """
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return CacheLayout()
    heads, batch, length, head_dim = map(_mesh_axes, nn.logical_to_mesh_axes(CACHE_AXES, rules))

    def ways(axes):
        return math.prod(mesh.shape[axis] for axis in axes)

    if model_config.kv_heads % ways(heads):
        heads = ()
    return CacheLayout(ways(heads), model_config.kv_heads, heads, batch, ways(batch), length,
                       head_dim)


def shard_cache(cache: KVCache, layout: CacheLayout) -> KVCache:
    """The cache constrained to the layout's shardings: rows over the mesh axes of the KV-head
    groups, then of the sequences (those only when they divide the number of sequences).
    Without a mesh, the cache itself."""
    if not layout.kv_heads:
        return cache

    def constrain(x_CxTxK):
        sequences = x_CxTxK.shape[0] // layout.kv_heads
        rows = layout.heads + (layout.batch if sequences % layout.batch_ways == 0 else ())
        spec = PartitionSpec(rows or None, layout.length or None, layout.head_dim or None)
        return lax.with_sharding_constraint(x_CxTxK, spec)
    return jax.tree.map(constrain, cache)


def new_cache(model_config: ModelConfig, batch: int, cache_len: int,
              layout: CacheLayout = CacheLayout()) -> KVCache:
    """An empty KV cache of `cache_len` slots: the only place sampling creates one."""
    return shard_cache(init_kv_cache(model_config, batch, cache_len), layout)


def grow_cache(cache: KVCache, cache_len: int, layout: CacheLayout = CacheLayout()) -> KVCache:
    """The same cache with zero slots appended up to `cache_len` (every slot keeps its contents)."""
    def grow(x_CxTxK):
        return jnp.pad(x_CxTxK, ((0, 0), (0, cache_len - x_CxTxK.shape[1]), (0, 0)))
    return shard_cache(jax.tree.map(grow, cache), layout)


def take_beams(cache: KVCache, parent_BxN: jax.Array, model_config: ModelConfig,
               layout: CacheLayout = CacheLayout()) -> KVCache:
    """The cache of B * N sequences whose sequence b * N + n is the cache's sequence
    b * M + parent[b, n], M its sequences per prompt (1: each prompt copied to N beams; N: the
    beams follow their parents). Gathering within each prompt keeps it on its own devices."""
    B, N = parent_BxN.shape
    J = layout.groups
    E = model_config.kv_heads // J

    def take(x_CxTxK):
        _, T, K = x_CxTxK.shape
        x_JxBxMxExTxK = x_CxTxK.reshape(J, B, -1, E, T, K)
        index_1xBxNx1x1x1 = parent_BxN[None, :, :, None, None, None]
        return jnp.take_along_axis(x_JxBxMxExTxK, index_1xBxNx1x1x1, axis=2).reshape(-1, T, K)
    return shard_cache(jax.tree.map(take, cache), layout)


def bucket_length(prompt_len: int, max_len: int) -> int:
    """Padded prompt length: next power of two >= prompt_len, at least MIN_BUCKET, <= max_len."""
    return min(max(MIN_BUCKET, 1 << max(prompt_len - 1, 0).bit_length()), max_len)


def cache_phases(bucket: int, max_new_tokens: int, max_len: int) -> tuple[int, ...]:
    """Cache lengths of the decode phases: doubling from max(2 L, 64) to T = min(L + S, max_len).

    Phase i decodes the steps whose fed token fits in its cache: token s (fed at slot L + s)
    needs s <= cache_len - L - 1.
    """
    total = min(bucket + max_new_tokens, max_len)
    phases = [min(max(2 * bucket, MIN_CACHE), total)]
    while phases[-1] < total:
        phases.append(min(2 * phases[-1], total))
    return tuple(phases)


def _last_step_of_phase(cache_len: int, bucket: int, max_new_tokens: int) -> int:
    """Exclusive bound on the decode steps of a phase: step s feeds token s - 1 at slot
    bucket + s - 1, which must be < cache_len."""
    return min(cache_len - bucket + 1, max_new_tokens)


# ------------------------------------------------------------------------------ picking tokens


def process_logits(logits_BxV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The logits actually sampled from: / temperature, then top-k, then top-p (HF order).

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
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # exclusive; first is 0
        keep_Bx1 = jnp.sum(mass_before_BxV < sampling.top_p, axis=-1, keepdims=True)
        threshold_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.maximum(keep_Bx1, 1) - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def sample_logits(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row: argmax when greedy, else a draw from `process_logits` with row b's key."""
    if sampling.is_greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = process_logits(logits_BxV, sampling)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """Row b's key: fold_in(rng, b)."""
    return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))


def _step_keys(keys_B: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda key: jax.random.fold_in(key, step))(keys_B)


def _is_end(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def _token_logprob(logits_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------ prefill


def _forward(params, model_config: ModelConfig, tokens_BxL: jax.Array, positions_BxL: jax.Array,
             cache: KVCache, cache_index, layout: CacheLayout) -> tuple[jax.Array, KVCache]:
    """The model on tokens that go into the cache at slots cache_index ..: (logits [B, L, V],
    cache)."""
    logits_BxLxV, cache = Transformer(model_config, cache_groups=layout.groups).apply(
        {"params": params}, tokens_BxL, positions_BxL, kv_cache=cache, cache_index=cache_index)
    return logits_BxLxV, shard_cache(cache, layout)


def _prefill(params, model_config: ModelConfig, prompt_BxL: jax.Array, lengths_B: jax.Array,
             cache_len: int, layout: CacheLayout = CacheLayout()) -> tuple[jax.Array, KVCache]:
    """One forward pass over the left-padded prompts: (logits at slot L - 1 [B, V], cache)."""
    B, L = prompt_BxL.shape
    # Padding gets position 0 (its keys are masked; a negative position has no embedding).
    positions_BxL = jnp.maximum(jnp.arange(L, dtype=jnp.int32) - (L - lengths_B)[:, None], 0)
    logits_BxLxV, cache = _forward(params, model_config, prompt_BxL, positions_BxL,
                                   new_cache(model_config, B, cache_len, layout), 0, layout)
    return logits_BxLxV[:, -1], cache


def _forward_one(params, model_config: ModelConfig, tokens_B: jax.Array, positions_B: jax.Array,
                 cache: KVCache, cache_index: jax.Array,
                 layout: CacheLayout = CacheLayout()) -> tuple[jax.Array, KVCache]:
    """One decode step: every row's token goes in at slot `cache_index` and its own position;
    next-token logits [B, V]."""
    logits_Bx1xV, cache = _forward(params, model_config, tokens_B[:, None], positions_B[:, None],
                                   cache, cache_index, layout)
    return logits_Bx1xV[:, 0], cache


def _phased_loop(state: dict, body, cond, phases: tuple[int, ...], bucket: int, steps: int,
                 layout: CacheLayout):
    """Runs `body` while `cond` holds, in phases of growing cache (see the module docstring)."""
    for i, cache_len in enumerate(phases):
        if i:
            state = dict(state, cache=grow_cache(state["cache"], cache_len, layout))
        stop = _last_step_of_phase(cache_len, bucket, steps) if i < len(phases) - 1 else steps
        state = lax.while_loop(lambda s, stop=stop: (s["step"] < stop) & cond(s), body, state)
    return state


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

    def emit(state, logits_BxV):
        """Picks token `step` for every unfinished row and records it."""
        step = state["step"]
        tokens_B = sample_logits(logits_BxV, _step_keys(keys_B, step), sampling)
        active_B = ~state["done"]
        logprob_B = jnp.where(active_B, _token_logprob(logits_BxV, tokens_B), 0.0)
        return dict(
            state, step=step + 1,
            feed=jnp.where(active_B, tokens_B, 0),  # finished rows feed a harmless token 0
            tokens=state["tokens"].at[:, step].set(jnp.where(active_B, tokens_B, pad)),
            logprobs=state["logprobs"].at[:, step].set(logprob_B),
            lengths=jnp.where(active_B, step + 1, state["lengths"]),
            done=state["done"] | (active_B & _is_end(tokens_B, sampling.eos_ids)))

    def body(state):
        # Token step - 1 goes in at slot L + step - 1, position len_b + step - 1; out come the
        # logits of token step.
        logits_BxV, cache = _forward_one(params, model_config, state["feed"],
                                         lengths_B + state["step"] - 1, state["cache"],
                                         L + state["step"] - 1, layout)
        return emit(dict(state, cache=cache), logits_BxV)

    first_BxV, cache = _prefill(params, model_config, prompt_BxL, lengths_B, phases[0], layout)
    state = dict(step=jnp.int32(0), feed=jnp.zeros(B, jnp.int32), cache=cache,
                 tokens=jnp.full((B, S), pad, jnp.int32), logprobs=jnp.zeros((B, S), jnp.float32),
                 lengths=jnp.zeros(B, jnp.int32), done=jnp.zeros(B, bool))
    state = emit(state, first_BxV)
    state = _phased_loop(state, body, lambda s: ~jnp.all(s["done"]), phases, L, S, layout)
    return state["tokens"], state["logprobs"], state["lengths"], state["step"]


# -------------------------------------------------------------------------------- beam search


@functools.partial(jax.jit, static_argnames=("model_config", "sampling", "phases", "layout"))
def _beam_jit(params, prompt_BxL: jax.Array, lengths_B: jax.Array, *,
              model_config: ModelConfig, sampling: SamplingConfig, phases: tuple[int, ...],
              layout: CacheLayout = CacheLayout()):
    """Beam search over a padded batch; returns the finished beams (best first) and steps.

    Each step takes the top 2N (beam, token) continuations by summed log-probability: those that
    end (an end token, or the length limit) become finished hypotheses scored
    sum / length ** length_penalty; the best N that do not end stay alive (2N candidates always
    leave N alive ones). A prompt is done when N hypotheses have finished and, unless
    early_stopping, the best alive beam's score at the current length cannot beat the worst of
    them (Hugging Face's heuristic).
    """
    B, L = prompt_BxL.shape
    N, S, V = sampling.num_beams, sampling.max_new_tokens, model_config.vocab_size
    C = min(2 * N, N * V)  # candidates per prompt per step
    pad = jnp.int32(sampling.pad_id)
    neg_inf = jnp.float32(-jnp.inf)

    def take(x_BxM, index_BxN):
        """Gathers along axis 1 (works for [B, M] and [B, M, S])."""
        index = index_BxN.reshape(index_BxN.shape + (1,) * (x_BxM.ndim - 2))
        return jnp.take_along_axis(x_BxM, index, axis=1)

    def select(state, logprobs_BxNxV):
        """Chooses the next token of every beam (step `step`) and updates finished hypotheses."""
        step = state["step"]
        length = (step + 1).astype(jnp.float32)
        total_BxNxV = state["alive_sum"][:, :, None] + logprobs_BxNxV
        total_BxC, index_BxC = lax.top_k(total_BxNxV.reshape(B, N * V), C)
        parent_BxC, token_BxC = index_BxC // V, (index_BxC % V).astype(jnp.int32)
        token_lp_BxC = take(logprobs_BxNxV.reshape(B, N * V), index_BxC)
        seq_BxCxS = take(state["alive_seq"], parent_BxC).at[:, :, step].set(token_BxC)
        lp_BxCxS = take(state["alive_lp"], parent_BxC).at[:, :, step].set(token_lp_BxC)
        ends_BxC = _is_end(token_BxC, sampling.eos_ids) | (step == S - 1)

        # Finished hypotheses: merge the ending candidates into the best N so far.
        score_BxC = total_BxC / length ** sampling.length_penalty
        new_score_BxC = jnp.where(ends_BxC & ~state["done"][:, None], score_BxC, neg_inf)
        all_score = jnp.concatenate([state["fin_score"], new_score_BxC], axis=1)
        fin_score_BxN, keep_BxN = lax.top_k(all_score, N)
        fin_seq = take(jnp.concatenate([state["fin_seq"], seq_BxCxS], axis=1), keep_BxN)
        fin_lp = take(jnp.concatenate([state["fin_lp"], lp_BxCxS], axis=1), keep_BxN)
        fin_len = take(jnp.concatenate(
            [state["fin_len"], jnp.full((B, C), step + 1, jnp.int32)], axis=1), keep_BxN)

        # Alive beams: the best N candidates that did not end.
        alive_sum_BxN, pick_BxN = lax.top_k(jnp.where(ends_BxC, neg_inf, total_BxC), N)
        full_B = fin_score_BxN[:, -1] > neg_inf
        if sampling.early_stopping:
            done_B = full_B
        else:
            best_alive_B = alive_sum_BxN[:, 0] / length ** sampling.length_penalty
            done_B = full_B & (fin_score_BxN[:, -1] >= best_alive_B)
        return dict(
            state, step=step + 1, done=state["done"] | done_B,
            alive_seq=take(seq_BxCxS, pick_BxN), alive_lp=take(lp_BxCxS, pick_BxN),
            alive_sum=alive_sum_BxN, parent=take(parent_BxC, pick_BxN),
            feed=take(token_BxC, pick_BxN),
            fin_score=fin_score_BxN, fin_seq=fin_seq, fin_lp=fin_lp, fin_len=fin_len)

    def body(state):
        cache = take_beams(state["cache"], state["parent"], model_config, layout)
        positions = jnp.repeat(lengths_B, N) + state["step"] - 1
        logits, cache = _forward_one(params, model_config, state["feed"].reshape(B * N),
                                     positions, cache, L + state["step"] - 1, layout)
        logprobs_BxNxV = jax.nn.log_softmax(logits, axis=-1).reshape(B, N, V)
        return select(dict(state, cache=cache), logprobs_BxNxV)

    first_BxV, cache = _prefill(params, model_config, prompt_BxL, lengths_B, phases[0], layout)
    cache = take_beams(cache, jnp.zeros((B, N), jnp.int32), model_config, layout)
    # Only beam 0 is alive at first (the others would be copies of it).
    alive_sum = jnp.where(jnp.arange(N) == 0, 0.0, neg_inf)
    state = dict(
        step=jnp.int32(0), done=jnp.zeros(B, bool), cache=cache,
        alive_seq=jnp.full((B, N, S), pad, jnp.int32), alive_lp=jnp.zeros((B, N, S), jnp.float32),
        alive_sum=jnp.broadcast_to(alive_sum, (B, N)).astype(jnp.float32),
        parent=jnp.zeros((B, N), jnp.int32), feed=jnp.zeros((B, N), jnp.int32),
        fin_score=jnp.full((B, N), neg_inf), fin_seq=jnp.full((B, N, S), pad, jnp.int32),
        fin_lp=jnp.zeros((B, N, S), jnp.float32), fin_len=jnp.zeros((B, N), jnp.int32))
    first_BxNxV = jnp.broadcast_to(jax.nn.log_softmax(first_BxV, axis=-1)[:, None], (B, N, V))
    state = select(state, first_BxNxV)
    state = _phased_loop(state, body, lambda s: ~jnp.all(s["done"]), phases, L, S, layout)
    return (BeamResult(state["fin_seq"], state["fin_lp"], state["fin_len"], state["fin_score"]),
            state["step"])


# ------------------------------------------------------------------------------ entry points


def prepare_prompts(prompt_ids, model_config: ModelConfig, sampling: SamplingConfig,
                    prompt_lengths=None) -> tuple[np.ndarray, np.ndarray, SamplingConfig]:
    """Validates prompts, left-pads them to their bucket and fits the sampling config to them:
    (int32[B, L], int32[B] lengths, sampling).

    `prompt_ids` is a list of token-id lists, or an int array [B, W] with `prompt_lengths` [B]
    (default: every row is W long). `sampling.max_new_tokens` is capped to model.max_len minus
    the longest prompt, with a warning. Raises ValueError, naming the problem, before any compile.
    """
    sampling.check_model(model_config)
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_ids)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"prompt_ids must be a [batch, length] array, got shape {array.shape}")
        lengths = (np.full(array.shape[0], array.shape[1]) if prompt_lengths is None
                   else np.asarray(prompt_lengths).reshape(-1))
        if lengths.shape != (array.shape[0],) or (lengths > array.shape[1]).any():
            raise ValueError(f"prompt_lengths={lengths.tolist()} must give one length <= "
                             f"{array.shape[1]} per prompt row")
        rows = [array[b, :n].tolist() for b, n in enumerate(lengths.tolist())]
    else:
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is only for a padded prompt array")
        rows = [list(row) for row in prompt_ids]
        if not rows:
            raise ValueError("prompt_ids is empty: give at least one prompt")
    V, max_len = model_config.vocab_size, model_config.max_len
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token "
                             "(e.g. a bos token)")
        if len(row) >= max_len:
            raise ValueError(f"prompt {b} has {len(row)} tokens: model.max_len={max_len} leaves "
                             "no room for a new token")
        if min(row) < 0 or max(row) >= V:
            raise ValueError(f"prompt {b} has token ids outside [0, vocab_size={V})")
    lengths = np.array([len(row) for row in rows], np.int32)
    room = max_len - int(lengths.max())
    if sampling.max_new_tokens > room:
        logging.warning("sampling.max_new_tokens=%d does not fit model.max_len=%d after a "
                        "%d-token prompt: generating at most %d tokens",
                        sampling.max_new_tokens, max_len, int(lengths.max()), room)
        sampling = dataclasses.replace(sampling, max_new_tokens=room)
    padded = np.zeros((len(rows), bucket_length(int(lengths.max()), max_len)), np.int32)
    for b, row in enumerate(rows):
        padded[b, padded.shape[1] - len(row):] = row
    return padded, lengths, sampling


def _as_key(rng) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def generate(params: Any, model_config: ModelConfig, prompt_ids, sampling: SamplingConfig,
             rng: jax.Array | int = 0, prompt_lengths=None) -> Generation:
    """Continues each prompt by up to `sampling.max_new_tokens` tokens (capped to what fits
    model.max_len after the longest prompt, with a warning).

    On a mesh (`jax.set_mesh` and `nn.logical_axis_rules`), the KV cache is sharded by the
    rules' `cache_*` axes (see the module docstring).

    Args:
      params: model parameters (as from `init_params` or a checkpoint).
      prompt_ids: list of token-id lists (any lengths >= 1), or an int array [B, W] of
        right-padded prompts with `prompt_lengths` [B].
      sampling: how to pick tokens; `num_beams > 1` runs `beam_search` (rng unused).
      rng: a jax key or an int seed.
    Returns:
      `Generation(tokens int32[B, S], logprobs float32[B, S], lengths int32[B])`: see the
      module docstring for what the log-probabilities are.
    """
    if sampling.num_beams > 1:
        best = beam_search(params, model_config, prompt_ids, sampling, prompt_lengths)
        return Generation(best.tokens[:, 0], best.logprobs[:, 0], best.lengths[:, 0])
    prompt_BxL, lengths_B, sampling = prepare_prompts(prompt_ids, model_config, sampling,
                                                      prompt_lengths)
    tokens, logprobs, lengths, _ = _sample_jit(
        params, jnp.asarray(prompt_BxL), jnp.asarray(lengths_B), _as_key(rng),
        model_config=model_config, sampling=sampling,
        phases=cache_phases(prompt_BxL.shape[1], sampling.max_new_tokens, model_config.max_len),
        layout=cache_layout(model_config))
    return Generation(tokens, logprobs, lengths)


def beam_search(params: Any, model_config: ModelConfig, prompt_ids, sampling: SamplingConfig,
                prompt_lengths=None) -> BeamResult:
    """Beam search with `sampling.num_beams` beams; returns all N finished beams, best first.

    `generate` returns beam 0 of this. Scores are sum logprob / length ** length_penalty, length
    counting the generated tokens (end token included).
    """
    prompt_BxL, lengths_B, sampling = prepare_prompts(prompt_ids, model_config, sampling,
                                                      prompt_lengths)
    result, _ = _beam_jit(
        params, jnp.asarray(prompt_BxL), jnp.asarray(lengths_B),
        model_config=model_config, sampling=sampling,
        phases=cache_phases(prompt_BxL.shape[1], sampling.max_new_tokens, model_config.max_len),
        layout=cache_layout(model_config))
    return result


def sample_text(params: Any, model_config: ModelConfig, tokenizer, prompts: Sequence[str],
                sampling: SamplingConfig, seed: int = 0) -> list[str]:
    """Generates a completion (the new text only) for each prompt string.

    Prompts are encoded as they are (training data has no bos); an empty prompt is [bos] when the
    tokenizer has one, and an error otherwise. The tokenizer's eos_id (if any) is added to the end
    tokens; end and pad tokens are not decoded.
    """
    bos = getattr(tokenizer, "bos_id", None)
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
    tokens, _, lengths = generate(params, model_config, prompt_ids, sampling, seed)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    ends = set(sampling.eos_ids)
    return [tokenizer.decode([t for t in row[:n].tolist() if t not in ends])
            for row, n in zip(tokens, lengths)]
