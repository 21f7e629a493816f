"""The serving engine's device side (serve.py schedules requests over it): the decode rows'
state (KV cache, seen tokens, last tokens) in a row bucket, the jitted programs over it
(prefill, insert, decode step, resize, shift), and each row's host-side position and sampling
settings.

Shape letters as in decode.py: B rows (KV-cache rows; the row bucket), L padded prompt length
(a bucket), T cache slots, V vocab, K the top logprobs kept per token (TOP_LOGPROBS).

**The cache.** One KV cache of B rows and T slots (`cache_len`, default model.max_len). Every
row writes its next token at the same slot `index` (attention.py: one in-place write per step); a
token at slot s with position p attends to its row's slots s - p .. s, so rows of any age sit
side by side, right-aligned at `index`.
**Insert.** A request is prefilled alone (decode.prefill, prompt left-padded to its bucket L),
its L cache slots placed at slots index - L .. index - 1 of a one-sequence row, and that row
copied into a free row while the other rows keep their place; its first token comes from the
prefill logits.
**Step.** One jitted program feeds every row's last token at slot `index` (decode.forward_one)
and picks each row's next token with its own repetition penalty / min_tokens
(logits_process.process_rows) and temperature / top-k / top-p (sample_rows); free rows compute
a harmless greedy token at position 0. The last tokens stay on the device: the engine launches
step k + 1 before it reads step k's tokens (`DecodeBatch.step`).
**Row buckets.** The device state holds only a row bucket B (a power of two, or `slots`) of
rows, the active ones among the lowest: the step's cost follows the rows it decodes (on a CPU
it is compute-bound per row, see `DecodeBatch._run_step`). A request that finds every row taken
grows the bucket (one copy); when the active rows fit in half of it, they are compacted into
the lower half and the bucket shrinks. Every bucket's programs are compiled at start-up.
**Shift.** When `index` reaches T, the cache rolls left so that the oldest active row starts at
slot 0 (at least T / 2 slots are freed when the rows allow it): one cache copy per T / 2 steps.
**Randomness.** Sequence i of a request with seed s draws token t with
fold_in(fold_in(key(s), i), t), as `generate` draws row i's token t: a seeded request gives the
same tokens alone or among others.
"""
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import config as config_lib, decode, model as model_lib, sharding
from lmjax import logits_process as lp_lib
from lmjax.config import ModelConfig
from lmjax.decode import CacheLayout

TOP_LOGPROBS = 5  # top log-probabilities kept per token (OpenAI's completions allow up to 5)
MAX_END_IDS = 8  # end tokens per sequence (the tokenizer's and its own)


# ------------------------------------------------------------------------------ jitted programs


class RowSettings(NamedTuple):
    """Each decode row's sampling settings (arrays [B]; `end_ids` [B, MAX_END_IDS], -1 where
    none): a pytree argument of the jitted programs, so new values never compile anew."""

    keys_Bx2: Any  # uint32 key data of fold_in(key(seed), choice)
    steps_B: Any  # tokens generated so far (the next token's draw is fold_in(key, steps))
    temperature_B: Any
    top_k_B: Any
    top_p_B: Any
    penalty_B: Any  # repetition_penalty (1.0: off)
    min_tokens_B: Any  # end tokens are banned before this many tokens
    end_ids_BxE: Any  # the row's end tokens (for min_tokens)


def key_data(seed: int, choice: int) -> np.ndarray:
    """uint32 key data of fold_in(key(seed), choice): what `generate` gives row `choice`."""
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), choice)))


def _sample(scores_BxV, keys_B, rows: RowSettings):
    """sample_rows, vectorized where the rows agree, else each row on its own (lax.map), so
    that a greedy row costs an argmax and only the top-k / top-p rows sort their logits.
    Measured (GPT-2 124M widths, 16 rows, 2 loaded cores): batched sample_rows costs 27 ms
    when every row samples (40 ms row by row), 170 ms once any row had top-p while thresholds
    came from a sort over V (row by row, one top-p row among 15 greedy ones cost 14 ms; since
    logits_process takes them from lax.top_k, a batched top-p costs ~13 ms quiet), and free
    rows that sampled made a greedy batch pay 28 ms instead of a 2 ms argmax."""
    V = scores_BxV.shape[-1]
    greedy_B = rows.temperature_B == 0
    sorts_B = ~greedy_B & (((rows.top_k_B > 0) & (rows.top_k_B < V)) | (rows.top_p_B < 1.0))
    settings = (rows.temperature_B, rows.top_k_B, rows.top_p_B)

    def one(args):
        scores_V, key, *setting = args
        return lp_lib.sample_rows(scores_V[None], key[None], *(x[None] for x in setting))[0]
    uniform = jnp.all(~greedy_B) & (jnp.all(sorts_B) | ~jnp.any(sorts_B))
    return jax.lax.switch(
        jnp.where(jnp.all(greedy_B), 0, jnp.where(uniform, 1, 2)),
        [lambda: jnp.argmax(scores_BxV, axis=-1).astype(jnp.int32),
         lambda: lp_lib.sample_rows(scores_BxV, keys_B, *settings),
         lambda: jax.lax.map(one, (scores_BxV, keys_B) + settings)])


def pick(logits_BxV, seen_BxV, rows: RowSettings):
    """Each row's token `steps` from its logits (processed, then sampled, with its settings),
    the unmodified model's logprob of it and the top ones."""
    keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.keys_Bx2), rows.steps_B)
    scores_BxV = lp_lib.process_rows(logits_BxV, seen_BxV, rows.penalty_B, rows.end_ids_BxE,
                                     rows.min_tokens_B, rows.steps_B)
    tokens_B = _sample(scores_BxV, keys_B, rows)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    token_lp_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
    top_lp_BxK, top_ids_BxK = jax.lax.top_k(logprobs_BxV, TOP_LOGPROBS)
    return tokens_B, token_lp_B, top_lp_BxK, top_ids_BxK


@functools.partial(jax.jit, static_argnames=("model_config", "layout"), donate_argnames="state")
def decode_step(params, state, index, positions_B, rows: RowSettings, *,
                 model_config: ModelConfig, layout: CacheLayout):
    """Every row's last token (state["tokens"]) in at slot `index`; out: each row's next
    token (see `pick`), and the state {cache, seen, tokens} with the new tokens in. Compiled
    once per row bucket B."""
    logits_BxV, cache = decode.forward_one(params, model_config, state["tokens"], positions_B,
                                           state["cache"], index, layout)
    picked = pick(logits_BxV, state["seen"], rows)
    B = positions_B.shape[0]
    seen_BxV = state["seen"].at[jnp.arange(B), picked[0]].set(True)
    return picked, {"cache": cache, "seen": seen_BxV, "tokens": picked[0]}


@functools.partial(jax.jit, static_argnames=("model_config", "layout", "cache_len",
                                             "prompt_logprobs"))
def prefill(params, prompt_1xL, length_1, index, rows_1: RowSettings, *,
             model_config: ModelConfig, layout: CacheLayout, cache_len: int,
             prompt_logprobs: bool):
    """Prefills one prompt and picks its first token: (picked, prompt logprobs or None, its
    cache row of `cache_len` slots with the prompt at slots index - L .. index - 1, its seen
    tokens [1, V]). With `prompt_logprobs`, the prompt's logprobs [1, L] (of the token at each
    slot given the slots before) and top logprobs [1, L, K] (of the slot after each slot).
    Compiled once per prompt bucket L (the row is placed here, so that `insert` is not)."""
    L = prompt_1xL.shape[1]
    V = model_config.vocab_size
    # The logits of every slot only for prompt logprobs: the vocabulary projection of L slots
    # would cost as much as the rest of GPT-2 124M's prefill.
    logits, row_cache = decode.prefill(params, model_config, prompt_1xL, length_1, L, layout,
                                       every_slot=prompt_logprobs)
    logits_1xLxV = logits if prompt_logprobs else logits[:, None]
    row_cache = jax.tree.map(
        lambda x_ExLxK: jax.lax.dynamic_update_slice(
            jnp.zeros((x_ExLxK.shape[0], cache_len, x_ExLxK.shape[2]), x_ExLxK.dtype),
            x_ExLxK, (0, index - L, 0)), row_cache)
    real_1xL = jnp.where(jnp.arange(L) >= L - length_1[:, None], prompt_1xL, -1)
    seen_1xV = lp_lib.token_mask(real_1xL, V)
    picked = pick(logits_1xLxV[:, -1], seen_1xV, rows_1)
    seen_1xV = seen_1xV.at[0, picked[0][0]].set(True)
    if not prompt_logprobs:
        return picked, None, row_cache, seen_1xV
    logprobs_1xLxV = jax.nn.log_softmax(logits_1xLxV.astype(jnp.float32), axis=-1)
    next_lp_1xL = jnp.take_along_axis(logprobs_1xLxV[:, :-1], prompt_1xL[:, 1:, None],
                                      axis=-1)[..., 0]
    top = jax.lax.top_k(logprobs_1xLxV, TOP_LOGPROBS)
    return picked, (jnp.pad(next_lp_1xL, ((0, 0), (1, 0))), top), row_cache, seen_1xV


def _sequences_view(x_CxTxK, groups: int, sequences: int):
    """[C, T, K] cache rows -> [J, B, E, T, K] (KV-head groups, sequences, heads; attention.py)."""
    C, T, K = x_CxTxK.shape
    return x_CxTxK.reshape(groups, sequences, C // (groups * sequences), T, K)


@functools.partial(jax.jit, static_argnames="layout", donate_argnames="state")
def insert(state, row_cache, seen_1xV, token_1, slot, *, layout: CacheLayout):
    """The state with sequence `slot`'s cache row, seen tokens and last token replaced by a
    prefilled one-sequence row's (`prefill`). Compiled once per row bucket."""
    J, B = layout.groups, state["seen"].shape[0]

    def insert(x_CxTxK, row_ExTxK):
        x_JxBxExTxK = _sequences_view(x_CxTxK, J, B)
        row_Jx1xExTxK = _sequences_view(row_ExTxK.astype(x_CxTxK.dtype), J, 1)
        out = jax.lax.dynamic_update_slice(x_JxBxExTxK, row_Jx1xExTxK, (0, slot, 0, 0, 0))
        return out.reshape(x_CxTxK.shape)
    cache = decode.shard_cache(jax.tree.map(insert, state["cache"], row_cache), layout)
    return {"cache": cache, "seen": state["seen"].at[slot].set(seen_1xV[0]),
            "tokens": state["tokens"].at[slot].set(token_1[0])}


@functools.partial(jax.jit, static_argnames="layout")  # a new shape: nothing to donate
def take_rows(state, rows_N, *, layout: CacheLayout):
    """The state of N sequences whose sequence n is the state's sequence rows[n]: how the
    engine grows (rows repeated: the new ones are free) and shrinks (active rows first) its
    row bucket. Compiled once per (old, new) bucket pair."""
    J, B = layout.groups, state["seen"].shape[0]

    def take(x_CxTxK):
        x_JxNxExTxK = jnp.take(_sequences_view(x_CxTxK, J, B), rows_N, axis=1)
        return x_JxNxExTxK.reshape(-1, *x_CxTxK.shape[1:])
    cache = decode.shard_cache(jax.tree.map(take, state["cache"]), layout)
    return {"cache": cache, "seen": state["seen"][rows_N], "tokens": state["tokens"][rows_N]}


@functools.partial(jax.jit, donate_argnames="cache")
def shift(cache, shift):
    """Every row's slots moved `shift` to the left (negative: right), wrapping around."""
    return jax.tree.map(lambda x_CxTxK: jnp.roll(x_CxTxK, -shift, axis=1), cache)


# ------------------------------------------------------------------------------- the batch


class DecodeBatch:
    """The decode rows of an engine: the device state of the current row bucket (`bucket` rows,
    the lowest `slots`) and every row's host-side `positions` and `settings` (arrays of
    `slots` rows, the first `bucket` in use).

    Args:
      params, model_config: the model (params placed as they should run).
      slots: decode rows B at most.
      cache_len: cache slots T.
    `reset` places the state (the engine's start).
    """

    def __init__(self, params: Any, model_config: ModelConfig, slots: int, cache_len: int):
        self.params, self.model_config = params, model_config
        self.slots, self.cache_len = slots, cache_len
        self.context = min(cache_len, model_config.max_len)  # prompt + new tokens at most
        # A step's time: launching it (arguments to the device), waiting for its tokens.
        self.dispatch_seconds = self.device_seconds = 0.0

    def reset(self) -> None:
        """One free row (the smallest bucket), every row's settings cleared, the write slot 0.
        Call it in the mesh and rules contexts the programs run in (the cache's layout and
        sharding follow them)."""
        B, V = self.slots, self.model_config.vocab_size
        self.layout = decode.cache_layout(self.model_config)
        self.bucket = 1  # rows of the device state now (a row bucket); rows >= it are free
        self.state = {"cache": decode.new_cache(self.model_config, 1, self.cache_len,
                                                self.layout),
                      "seen": jnp.zeros((1, V), bool), "tokens": jnp.zeros(1, jnp.int32)}
        self.index = 0
        self.positions = np.zeros(B, np.int32)
        self.settings = RowSettings(
            np.zeros((B,) + key_data(0, 0).shape, np.uint32), np.zeros(B, np.int32),
            np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32),
            np.ones(B, np.float32), np.zeros(B, np.int32),
            np.full((B, MAX_END_IDS), -1, np.int32))

    def row_buckets(self) -> list[int]:
        """Decode-row counts compiled at start-up: powers of two below `slots`, and `slots`."""
        return [b for b in (1 << i for i in range(self.slots.bit_length())) if b < self.slots
                ] + [self.slots]

    def prompt_buckets(self) -> list[int]:
        """Prefill lengths compiled at start-up: decode.bucket_length of every prompt length."""
        return sorted({decode.bucket_length(n, self.context) for n in range(1, self.context)})

    def _settings_of(self, rows) -> RowSettings:
        # Copies: on a CPU a launched program may read a NumPy argument's memory after the
        # call returns (no copy is made), and the host arrays change before it runs.
        return RowSettings(*(x[rows].copy() for x in self.settings))

    def warm_up(self) -> None:
        """Runs each program once on free rows: every compile happens here (prefill once per
        prompt bucket; step, insert and shift once per row bucket; growing and shrinking
        between neighbouring row buckets)."""
        self.set_index(self.cache_len)
        for L in self.prompt_buckets():
            self._prefill(np.zeros((1, L), np.int32), 1, prompt_logprobs=False)
        buckets = self.row_buckets()
        for i, nb in enumerate(buckets):
            if i:
                self.resize(nb, [False] * self.slots)
            picked, _, row_cache, seen_1xV = self._prefill(
                np.zeros((1, self.prompt_buckets()[0]), np.int32), 1, False)
            self.state = insert(self.state, row_cache, seen_1xV, picked[0], np.int32(0),
                                layout=self.layout)
            self._run_step()
            self.set_index(self.cache_len - 1)
            self.set_index(self.cache_len)
        while self.bucket > 1:
            self.resize(buckets[buckets.index(self.bucket) - 1], [False] * self.slots)
        self.set_index(0)
        jax.block_until_ready(self.state)

    def set_index(self, index: int) -> None:
        """Moves every row so that the next token goes in at slot `index`."""
        if index != self.index:
            self.state["cache"] = shift(self.state["cache"], np.int32(self.index - index))
            self.index = index

    def resize(self, nb: int, active: list[bool]) -> list[tuple[int, int]]:
        """Grows or shrinks the device state to `nb` rows (a row bucket); `active[b]`: row b
        decodes a sequence. Shrinking first moves the active rows at or beyond `nb` into free
        rows below it (the compaction): returns those moves, (from, to) rows."""
        moves = []
        if nb > self.bucket:
            rows = np.arange(nb) % self.bucket  # the new rows are free: copies will do
        else:
            rows = np.arange(nb)
            holes = [b for b in range(nb) if not active[b]]
            movers = [b for b in range(nb, self.bucket) if active[b]]
            assert len(movers) <= len(holes), (movers, holes)
            for hole, mover in zip(holes, movers):
                rows[hole] = mover
                moves.append((mover, hole))
            for x in (self.positions,) + tuple(self.settings):
                x[:nb] = x[rows]
        self.state = take_rows(self.state, rows.astype(np.int32), layout=self.layout)
        self.bucket = nb
        return moves

    def _prefill(self, prompt_1xL, n: int, prompt_logprobs: bool, b: int = 0):
        return prefill(self.params, prompt_1xL, np.array([n], np.int32), np.int32(self.index),
                       self._settings_of(slice(b, b + 1)), model_config=self.model_config,
                       layout=self.layout, cache_len=self.cache_len,
                       prompt_logprobs=prompt_logprobs)

    def insert(self, b: int, prompt_ids: list[int], settings: tuple, prompt_logprobs: bool):
        """Prefills a prompt into row b (< bucket) with its RowSettings values (`settings`, one
        row's): (its first token's picked values, on the host; the prompt's logprobs [L] and
        top logprobs (values [L, K], ids [L, K]) on the host, or None; the bucket L)."""
        n = len(prompt_ids)
        L = decode.bucket_length(n, self.context)
        if self.index < L:
            self.set_index(L)
        prompt = np.zeros((1, L), np.int32)
        prompt[0, L - n:] = prompt_ids
        for x, value in zip(self.settings, settings):
            x[b] = value
        picked, prompt_lp, row_cache, seen_1xV = self._prefill(prompt, n, prompt_logprobs, b)
        self.state = insert(self.state, row_cache, seen_1xV, picked[0], np.int32(b),
                            layout=self.layout)
        self.positions[b], self.settings.steps_B[b] = n, 1
        if prompt_lp is not None:
            lp_1xL, (top_lp_1xLxK, top_ids_1xLxK) = jax.device_get(prompt_lp)
            prompt_lp = lp_1xL[0], (top_lp_1xLxK[0], top_ids_1xLxK[0])
        return tuple(np.asarray(x)[0] for x in picked), prompt_lp, L

    def free(self, b: int) -> None:
        """Row b decodes nothing from now on (a harmless greedy token at position 0: free
        rows sampling would cost a batch of greedy rows its vectorized argmax, `_sample`)."""
        self.positions[b] = self.settings.steps_B[b] = 0
        self.settings.temperature_B[b] = 0.0
        self.settings.top_k_B[b], self.settings.top_p_B[b] = 0, 1.0
        self.settings.penalty_B[b], self.settings.min_tokens_B[b] = 1.0, 0

    def _run_step(self):
        """One decode step of the rows of the current bucket only.

        Why buckets: on a CPU the step is compute-bound from one row on (GPT-2 124M, f32,
        T = 512, 2 loaded cores: 130 ms for 1 row, 906 ms for 16, 1592 ms for 32; a cache of
        64 instead of 512 slots saves only 20% at 16 rows: the cost is the dense layers'
        per-row FLOPs, not the cache), so a step over every slot made one request on a 32-slot
        server pay for 32 rows. The rows are kept in the lowest rows of the smallest bucket
        that holds them (the engine grows it and compacts and shrinks it; each resize is one
        copy of the rows, about a step's cache traffic, and happens only when the number of
        active rows crosses a power of two). Slicing rows out of one full-size cache instead
        costs a copy of those rows every step (measured: 37% slower than a 16-row cache)."""
        nb = self.bucket
        picked, self.state = decode_step(
            self.params, self.state, np.int32(self.index), self.positions[:nb].copy(),
            self._settings_of(slice(0, nb)),
            model_config=self.model_config, layout=self.layout)
        return picked

    def step(self, active_rows: list[int]):
        """Launches one decode step of every row (shifting the cache first when it is full) and
        returns without waiting: each row's (token, its logprob, top logprobs [K], their ids
        [K]) as device arrays [bucket] (jax.device_get them). `active_rows` (non-empty)
        advance one position and one token.

        Not waiting is what makes this cheaper than a step that hands its tokens over: the
        engine launches step k + 1 (whose input tokens are step k's, on the device) before it
        reads step k's tokens, so the device never waits for the host's bookkeeping, and the
        host's launch (the arguments' transfer included) overlaps a step's compute (measured
        on 2 loaded cores, GPT-2 124M widths, 2 layers: the launch is 2 ms of a 1-row 18 ms
        step, 2.5 of a 14-row 43 ms one; on an accelerator, where a step takes a few ms, a
        synchronous loop would idle it for the host's share)."""
        if self.index >= self.cache_len:
            oldest = max(int(self.positions[b]) for b in active_rows)
            self.set_index(max(oldest, self.cache_len // 2))
        t0 = time.perf_counter()
        picked = self._run_step()
        self.dispatch_seconds += time.perf_counter() - t0
        self.index += 1
        self.positions[active_rows] += 1
        self.settings.steps_B[active_rows] += 1
        return picked

    def fetch(self, picked):
        """A step's picked arrays on the host (waits for the step)."""
        t0 = time.perf_counter()
        out = jax.device_get(picked)
        self.device_seconds += time.perf_counter() - t0
        return out


def place_on_mesh(params: Any, model_config: ModelConfig, tensor: int = 1, fsdp: int = 1):
    """(params sharded by the default rules, mesh, rules) on a (data, fsdp, tensor) mesh of
    every device (data = the rest): what `Engine(mesh=..., rules=...)` runs on."""
    mesh_config = config_lib.default_config().mesh
    mesh_config.update(data=-1, fsdp=fsdp, tensor=tensor)
    mesh = sharding.make_mesh(mesh_config)
    rules = sharding.rules(mesh_config, model_config, mesh.shape)
    shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_config), mesh, rules)
    return jax.device_put(params, shardings), mesh, rules
