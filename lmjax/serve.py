"""The serving engine: continuous batching over a fixed number of decode slots (KV-cache rows),
as JetStream's prefill / insert / generate engine. serve_http.py puts the OpenAI-compatible HTTP
API in front of it.

    engine = Engine(params, model_config, tokenizer, slots=16)
    engine.start()                        # compiles (warm-up), then decodes in its own thread
    seq = engine.submit(Sequence(prompt_ids, max_tokens=64, temperature=0.8, seed=1,
                                 emit=print))  # emit(Chunk) from the engine thread
    engine.stop()

Shape letters as in decode.py: B slots (cache rows), L padded prompt length (a bucket),
T cache slots, V vocab, K the top logprobs kept per token (TOP_LOGPROBS).

**The cache.** One KV cache of B rows and T slots (`cache_len`, default model.max_len). Every
row writes its next token at the same slot `index` (model.py: one in-place write per step); a
token at slot s with position p attends to its row's slots s - p .. s, so rows of any age sit
side by side, right-aligned at `index`.
**Insert.** A request is prefilled alone (decode.prefill, prompt left-padded to its bucket L),
its L cache slots placed at slots index - L .. index - 1 of a one-sequence row, and that row
copied into the lowest free row while the other rows keep their place; its first token comes
from the prefill logits.
**Step.** One jitted program feeds every row's last token at slot `index` (decode.forward_one)
and picks each row's next token with its own repetition penalty / min_tokens
(logits_process.process_rows) and temperature / top-k / top-p (sample_rows); free rows compute
a harmless token at position 0.
**Row buckets.** The device state holds only a row bucket B (a power of two, or `slots`) of
rows, the active ones among the lowest: the step's cost follows the rows it decodes (on a CPU
it is compute-bound per row, see `_run_step`). A request that finds every row taken grows the
bucket (one copy); when the active rows fit in half of it, they are compacted into the lower
half and the bucket shrinks. Every bucket's programs are compiled at start-up.
**Shift.** When `index` reaches T, the cache rolls left so that the oldest active row starts at
slot 0 (at least T / 2 slots are freed when the rows allow it): one cache copy per T / 2 steps.
**Randomness.** Sequence i of a request with seed s draws token t with
fold_in(fold_in(key(s), i), t), as `generate` draws row i's token t: a seeded request gives the
same tokens alone or among others.

Stop strings and end tokens are checked on the host after each step, on the decoded text: text
that could still become a stop string is held back, so that it never leaks into a chunk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lmjax import config as config_lib, decode, model as model_lib, sharding
from lmjax import logits_process as lp_lib
from lmjax.config import ModelConfig
from lmjax.decode import CacheLayout

TOP_LOGPROBS = 5  # top log-probabilities kept per token (OpenAI's completions allow up to 5)
MAX_END_IDS = 8  # end tokens per sequence (the tokenizer's and its own)


class Overloaded(Exception):
    """The queue is full (by requests or by tokens): the caller answers 503 with Retry-After."""


class ServeError(ValueError):
    """A request the engine cannot serve (e.g. longer than the context); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class Chunk:
    """What the engine emits for a sequence: new text and tokens since the last chunk; the last
    chunk has `finish_reason` ('stop', 'length', 'cancelled', 'error')."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # unmodified model's log p(token | prefix)
    top_logprobs: list[dict[int, float]]  # TOP_LOGPROBS best tokens at each step
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None  # first chunk, when asked (echo)
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated sequence (one of a request's `n` choices) and its progress."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Chunk], None]  # called from the engine thread
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: a random one
    choice: int = 0  # index of this sequence in its request (its key: fold_in(key(seed), choice))
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = ()  # end tokens besides the tokenizer's (vLLM's stop_token_ids)
    ignore_eos: bool = False  # the tokenizer's end token does not end the sequence
    repetition_penalty: float = 1.0  # transformers' (on prompt and generated tokens)
    min_tokens: int = 0  # the end tokens are banned before this many tokens
    prompt_logprobs: bool = False
    # Progress (the engine's).
    ids: list[int] = dataclasses.field(default_factory=list)
    text_sent: int = 0  # characters of the decoded text already emitted
    tokens_sent: int = 0
    slot: int | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    _logprobs: list[float] = dataclasses.field(default_factory=list)
    _top: list[dict[int, float]] = dataclasses.field(default_factory=list)

    @property
    def tokens_needed(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


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


def _key_data(seed: int, choice: int) -> np.ndarray:
    """uint32 key data of fold_in(key(seed), choice): what `generate` gives row `choice`."""
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), choice)))


def _pick(logits_BxV, seen_BxV, rows: RowSettings):
    """Each row's token `steps` from its logits (processed, then sampled, with its settings),
    the unmodified model's logprob of it and the top ones."""
    keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.keys_Bx2), rows.steps_B)
    scores_BxV = lp_lib.process_rows(logits_BxV, seen_BxV, rows.penalty_B, rows.end_ids_BxE,
                                     rows.min_tokens_B, rows.steps_B)
    tokens_B = lp_lib.sample_rows(scores_BxV, keys_B, rows.temperature_B, rows.top_k_B,
                                  rows.top_p_B)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    token_lp_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
    top_lp_BxK, top_ids_BxK = jax.lax.top_k(logprobs_BxV, TOP_LOGPROBS)
    return tokens_B, token_lp_B, top_lp_BxK, top_ids_BxK


@functools.partial(jax.jit, static_argnames=("model_config", "layout"), donate_argnames="state")
def _decode_step(params, state, index, tokens_B, positions_B, rows: RowSettings, *,
                 model_config: ModelConfig, layout: CacheLayout):
    """Every row's token in at slot `index`; out: each row's next token (see `_pick`), and the
    state {cache, seen} with the new tokens in. Compiled once per row bucket B."""
    logits_BxV, cache = decode.forward_one(params, model_config, tokens_B, positions_B,
                                           state["cache"], index, layout)
    picked = _pick(logits_BxV, state["seen"], rows)
    B = tokens_B.shape[0]
    seen_BxV = state["seen"].at[jnp.arange(B), picked[0]].set(True)
    return picked, {"cache": cache, "seen": seen_BxV}


@functools.partial(jax.jit, static_argnames=("model_config", "layout", "cache_len",
                                             "prompt_logprobs"))
def _prefill(params, prompt_1xL, length_1, index, rows_1: RowSettings, *,
             model_config: ModelConfig, layout: CacheLayout, cache_len: int,
             prompt_logprobs: bool):
    """Prefills one prompt and picks its first token: (picked, prompt logprobs or None, its
    cache row of `cache_len` slots with the prompt at slots index - L .. index - 1, its seen
    tokens [1, V]). With `prompt_logprobs`, the prompt's logprobs [1, L] (of the token at each
    slot given the slots before) and top logprobs [1, L, K] (of the slot after each slot).
    Compiled once per prompt bucket L (the row is placed here, so that `_insert` is not)."""
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
    picked = _pick(logits_1xLxV[:, -1], seen_1xV, rows_1)
    seen_1xV = seen_1xV.at[0, picked[0][0]].set(True)
    if not prompt_logprobs:
        return picked, None, row_cache, seen_1xV
    logprobs_1xLxV = jax.nn.log_softmax(logits_1xLxV.astype(jnp.float32), axis=-1)
    next_lp_1xL = jnp.take_along_axis(logprobs_1xLxV[:, :-1], prompt_1xL[:, 1:, None],
                                      axis=-1)[..., 0]
    top = jax.lax.top_k(logprobs_1xLxV, TOP_LOGPROBS)
    return picked, (jnp.pad(next_lp_1xL, ((0, 0), (1, 0))), top), row_cache, seen_1xV


def _sequences_view(x_CxTxK, groups: int, sequences: int):
    """[C, T, K] cache rows -> [J, B, E, T, K] (KV-head groups, sequences, heads; model.py)."""
    C, T, K = x_CxTxK.shape
    return x_CxTxK.reshape(groups, sequences, C // (groups * sequences), T, K)


@functools.partial(jax.jit, static_argnames="layout", donate_argnames="state")
def _insert(state, row_cache, seen_1xV, slot, *, layout: CacheLayout):
    """The state with sequence `slot`'s cache row and seen tokens replaced by a prefilled
    one-sequence row (`_prefill`). Compiled once per row bucket."""
    J, B = layout.groups, state["seen"].shape[0]

    def insert(x_CxTxK, row_ExTxK):
        x_JxBxExTxK = _sequences_view(x_CxTxK, J, B)
        row_Jx1xExTxK = _sequences_view(row_ExTxK.astype(x_CxTxK.dtype), J, 1)
        out = jax.lax.dynamic_update_slice(x_JxBxExTxK, row_Jx1xExTxK, (0, slot, 0, 0, 0))
        return out.reshape(x_CxTxK.shape)
    cache = decode.shard_cache(jax.tree.map(insert, state["cache"], row_cache), layout)
    return {"cache": cache, "seen": state["seen"].at[slot].set(seen_1xV[0])}


@functools.partial(jax.jit, static_argnames="layout")  # a new shape: nothing to donate
def _take_rows(state, rows_N, *, layout: CacheLayout):
    """The state of N sequences whose sequence n is the state's sequence rows[n]: how the
    engine grows (rows repeated: the new ones are free) and shrinks (active rows first) its
    row bucket. Compiled once per (old, new) bucket pair."""
    J, B = layout.groups, state["seen"].shape[0]

    def take(x_CxTxK):
        x_JxNxExTxK = jnp.take(_sequences_view(x_CxTxK, J, B), rows_N, axis=1)
        return x_JxNxExTxK.reshape(-1, *x_CxTxK.shape[1:])
    cache = decode.shard_cache(jax.tree.map(take, state["cache"]), layout)
    return {"cache": cache, "seen": state["seen"][rows_N]}


@functools.partial(jax.jit, donate_argnames="cache")
def _shift(cache, shift):
    """Every row's slots moved `shift` to the left (negative: right), wrapping around."""
    return jax.tree.map(lambda x_CxTxK: jnp.roll(x_CxTxK, -shift, axis=1), cache)


# ----------------------------------------------------------------------------- stop strings


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to emit yet: the longest suffix that begins a stop
    string, and an incomplete UTF-8 character (decoded as U+FFFD)."""
    hold = max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-k:])), default=0)
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


def find_stop(text: str, stop: tuple[str, ...], start: int) -> int:
    """Index of the first stop string in text[start:] (-1: none)."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found) if found else -1


# ----------------------------------------------------------------------------------- engine


class Engine:
    """Continuous batching over `slots` decode slots (see the module docstring).

    Args:
      params, model_config, tokenizer: the model (params placed as they should run: on a mesh,
        sharded by `rules`) and its tokenizer (encode/decode, eos_id).
      slots: decode slots B (sequences decoded at once).
      cache_len: cache slots T (default model.max_len); a request needs prompt + max_tokens <=
        min(T, model.max_len).
      max_queue, max_queued_tokens: the queue's bounds (sequences; prompt + max_tokens summed);
        `submit` raises Overloaded beyond them.
      mesh, rules: the mesh and logical-axis rules to run in (None: one device).
      prefills_per_step: prompts inserted between two decode steps at most.
    """

    def __init__(self, params: Any, model_config: ModelConfig, tokenizer, slots: int = 8,
                 cache_len: int | None = None, max_queue: int = 256,
                 max_queued_tokens: int = 1 << 20, mesh=None, rules=None,
                 prefills_per_step: int = 4):
        if slots < 1:
            raise ValueError(f"slots={slots} must be an integer >= 1")
        self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
        self.slots = slots
        self.cache_len = cache_len or model_config.max_len
        if not 2 <= self.cache_len:
            raise ValueError(f"cache_len={self.cache_len} must be >= 2")
        self.context = min(self.cache_len, model_config.max_len)  # prompt + max_tokens
        self.max_queue, self.max_queued_tokens = max_queue, max_queued_tokens
        self.mesh, self.rules = mesh, rules
        self.prefills_per_step = prefills_per_step
        self._queue: deque[Sequence] = deque()
        self._queued_tokens = 0
        self._lock = threading.Condition()
        self._rows: list[Sequence | None] = [None] * slots
        self._running = self._stopping = self._paused = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.generated_tokens = 0
        self.tokens_per_second = 0.0
        self.compile_seconds = 0.0
        self.on_finish: list[Callable[[Sequence], None]] = []  # called from the engine thread
        self.on_step: list[Callable[["Engine"], None]] = []
        self._eos = tuple(i for i in (getattr(tokenizer, "eos_id", None),) if i is not None)

    # -------------------------------------------------------------------------- public API

    def context_manager(self):
        """The mesh and rules contexts the engine's programs run in (nothing without a mesh)."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def check(self, seq: Sequence) -> None:
        """Raises ServeError (naming the field) for a sequence the engine cannot serve."""
        V = self.model_config.vocab_size
        if not seq.prompt_ids:
            raise ServeError("the prompt is empty: give at least one token", "prompt")
        if min(seq.prompt_ids) < 0 or max(seq.prompt_ids) >= V:
            raise ServeError(f"prompt token ids must be in [0, {V})", "prompt")
        if seq.max_tokens < 1:
            raise ServeError(f"max_tokens={seq.max_tokens} must be an integer >= 1",
                             "max_tokens")
        if len(self.end_ids(seq)) > MAX_END_IDS or any(not 0 <= i < V for i in seq.eos_ids):
            raise ServeError(f"stop_token_ids must be at most {MAX_END_IDS} token ids in "
                             f"[0, {V})", "stop_token_ids")
        if seq.tokens_needed > self.context:
            raise ServeError(
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {seq.tokens_needed} tokens ({len(seq.prompt_ids)} in the prompt, "
                f"{seq.max_tokens} in the completion). Please reduce the prompt or max_tokens.",
                "max_tokens")

    def end_ids(self, seq: Sequence) -> tuple[int, ...]:
        """The tokens that end `seq`: its own, and the tokenizer's unless it ignores them."""
        return tuple(dict.fromkeys(seq.eos_ids + (() if seq.ignore_eos else self._eos)))

    def submit(self, seq: Sequence | list[Sequence]) -> None:
        """Queues sequences (all or none): ServeError if one cannot be served, Overloaded if the
        queue has no room (or the engine is stopping)."""
        seqs = seq if isinstance(seq, list) else [seq]
        for s in seqs:
            self.check(s)
        with self._lock:
            tokens = sum(s.tokens_needed for s in seqs)
            if (not self._running or len(self._queue) + len(seqs) > self.max_queue
                    or self._queued_tokens + tokens > self.max_queued_tokens):
                raise Overloaded(f"queue full ({len(self._queue)} sequences, "
                                 f"{self._queued_tokens} tokens) or server stopping")
            now = time.monotonic()
            for s in seqs:
                s.submitted = now
                if s.seed is None:
                    s.seed = secrets.randbits(31)
                self._queue.append(s)
            self._queued_tokens += tokens
            self._lock.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Stops a sequence (a client went away): its slot is freed before the next step."""
        with self._lock:
            seq.cancelled = True
            self._lock.notify_all()

    @property
    def running(self) -> bool:
        """Whether the engine takes new sequences."""
        return self._running

    def pause(self) -> None:
        """Holds the decode loop before its next step (queued sequences wait): a test hook."""
        with self._lock:
            self._paused = True
            self._lock.notify_all()  # wait_until predicates may look at `paused`

    @property
    def paused(self) -> bool:
        return self._paused

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def queue_depth(self) -> int:
        return len(self._queue)

    def active(self) -> int:
        """Slots decoding a sequence now."""
        return sum(row is not None for row in self._rows)

    def wait_until(self, predicate: Callable[["Engine"], bool], timeout: float = 60.0) -> bool:
        """Blocks until predicate(engine) holds (checked after each change); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout)

    def start(self) -> float:
        """Compiles every program (returns the seconds it took) and starts the decode thread."""
        t0 = time.perf_counter()
        with self.context_manager():
            self._init_state()
            self._warm_up()
        self.compile_seconds = time.perf_counter() - t0
        logging.info("serve: compiled the decode step for %d row buckets and %d prefill "
                     "buckets in %.1f s", len(self.row_buckets()), len(self.buckets()),
                     self.compile_seconds)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lmjax-engine", daemon=True)
        self._thread.start()
        return self.compile_seconds

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stops taking sequences; lets queued and active ones finish for up to `drain_seconds`,
        cancels the rest, and ends the decode thread."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self.resume()
        self.wait_until(lambda e: not e._queue and not e.active(), drain_seconds)
        with self._lock:
            for s in list(self._queue) + [r for r in self._rows if r is not None]:
                s.cancelled = True
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def row_buckets(self) -> list[int]:
        """Decode-row counts compiled at start-up: powers of two below `slots`, and `slots`."""
        return [b for b in (1 << i for i in range(self.slots.bit_length())) if b < self.slots
                ] + [self.slots]

    def buckets(self) -> list[int]:
        """Prefill lengths compiled at start-up: decode.bucket_length of every prompt length."""
        top = min(self.cache_len, self.model_config.max_len)
        return sorted({decode.bucket_length(n, top) for n in range(1, self.context)})

    # ------------------------------------------------------------------------------ state

    def _init_state(self):
        B, V = self.slots, self.model_config.vocab_size
        self._layout = decode.cache_layout(self.model_config)
        self._bucket = 1  # rows of the device state now (a row bucket); rows >= it are free
        self._state = {"cache": decode.new_cache(self.model_config, 1, self.cache_len,
                                                 self._layout),
                       "seen": jnp.zeros((1, V), bool)}
        self._index = 0
        self._feed = np.zeros(B, np.int32)
        self._positions = np.zeros(B, np.int32)
        self._settings = RowSettings(
            np.zeros((B,) + _key_data(0, 0).shape, np.uint32), np.zeros(B, np.int32),
            np.ones(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32),
            np.ones(B, np.float32), np.zeros(B, np.int32),
            np.full((B, MAX_END_IDS), -1, np.int32))

    def _rows_settings(self, rows) -> RowSettings:
        return RowSettings(*(x[rows] for x in self._settings))

    def _warm_up(self):
        """Runs each program once on free rows: every compile happens here (prefill once per
        prompt bucket; step, insert and shift once per row bucket; growing and shrinking
        between neighbouring row buckets)."""
        self._set_index(self.cache_len)
        for L in self.buckets():
            self._prefill_row(np.zeros((1, L), np.int32), 1, prompt_logprobs=False)
        for i, nb in enumerate(self.row_buckets()):
            if i:
                self._resize(nb)
            self._state = _insert(self._state, *self._prefill_row(np.zeros((1, self.buckets()[0]), np.int32), 1,
                                                                  False)[2:], np.int32(0),
                                  layout=self._layout)
            self._run_step()
            self._set_index(self.cache_len - 1)
            self._set_index(self.cache_len)
        while self._bucket > 1:
            self._resize(self.row_buckets()[self.row_buckets().index(self._bucket) - 1])
        self._set_index(0)
        jax.block_until_ready(self._state)

    def _set_index(self, index: int):
        """Moves every row so that the next token goes in at slot `index`."""
        if index != self._index:
            self._state["cache"] = _shift(self._state["cache"], np.int32(self._index - index))
            self._index = index

    def _resize(self, nb: int):
        """Grows or shrinks the device state to `nb` rows (a row bucket). Shrinking first moves
        the active rows at or beyond `nb` into free rows below it (the compaction)."""
        if nb > self._bucket:
            rows = np.arange(nb) % self._bucket  # the new rows are free: copies will do
        else:
            rows = np.arange(nb)
            holes = [b for b in range(nb) if self._rows[b] is None]
            movers = [b for b in range(nb, self._bucket) if self._rows[b] is not None]
            assert len(movers) <= len(holes), (movers, holes)
            for hole, mover in zip(holes, movers):
                rows[hole] = mover
                seq, self._rows[mover] = self._rows[mover], None
                seq.slot, self._rows[hole] = hole, seq
            for x in (self._feed, self._positions) + tuple(self._settings):
                x[:nb] = x[rows]
        self._state = _take_rows(self._state, rows.astype(np.int32), layout=self._layout)
        self._bucket = nb

    def _fit(self):
        """Shrinks the row bucket while the active rows fit in half of it (the step's cost
        follows the rows it decodes, see `_run_step`)."""
        buckets = self.row_buckets()
        while self._bucket > 1:
            smaller = buckets[buckets.index(self._bucket) - 1]
            if self.active() > smaller:
                return
            self._resize(smaller)

    # ------------------------------------------------------------------------------- loop

    def _loop(self):
        with self.context_manager():
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: self._stopping or (
                        not self._paused and (self._queue or self.active())))
                    if self._stopping and not self.active() and not self._queue:
                        return
                self._free_cancelled()
                self._admit()
                self._fit()
                if self.active():
                    try:
                        self._decode()
                    except Exception as e:  # one failure never takes the server down
                        logging.exception("serve: a decode step failed")
                        for row in self._rows:
                            if row is not None:
                                self._finish(row, "error", note=str(e))
                        self._init_state()
                with self._lock:
                    self._lock.notify_all()
                for hook in self.on_step:
                    hook(self)

    def _free_cancelled(self):
        with self._lock:
            for s in [s for s in self._queue if s.cancelled]:
                self._queue.remove(s)
                self._queued_tokens -= s.tokens_needed
                self._finish(s, "cancelled")
        for row in self._rows:
            if row is not None and row.cancelled:
                self._finish(row, "cancelled")

    def _admit(self):
        """Prefills queued sequences into free slots (at most prefills_per_step), the lowest
        free row first, growing the row bucket when every row of it is taken."""
        for _ in range(self.prefills_per_step):
            with self._lock:
                free = [b for b, row in enumerate(self._rows) if row is None]
                if not free or not self._queue or self._stopping:
                    return
                seq = self._queue.popleft()
                self._queued_tokens -= seq.tokens_needed
            try:
                while free[0] >= self._bucket:
                    buckets = self.row_buckets()
                    self._resize(buckets[buckets.index(self._bucket) + 1])
                self._insert(seq, free[0])
            except Exception as e:
                logging.exception("serve: a prefill failed")
                self._rows[free[0]] = None
                self._finish(seq, "error", note=str(e))

    def _prefill_row(self, prompt_1xL, n: int, prompt_logprobs: bool, b: int = 0):
        return _prefill(self.params, prompt_1xL, np.array([n], np.int32), np.int32(self._index),
                        self._rows_settings(slice(b, b + 1)), model_config=self.model_config,
                        layout=self._layout, cache_len=self.cache_len,
                        prompt_logprobs=prompt_logprobs)

    def _insert(self, seq: Sequence, b: int):
        n = len(seq.prompt_ids)
        L = decode.bucket_length(n, min(self.cache_len, self.model_config.max_len))
        if self._index < L:
            self._set_index(L)
        prompt = np.zeros((1, L), np.int32)
        prompt[0, L - n:] = seq.prompt_ids
        ends = self.end_ids(seq)
        settings = (_key_data(seq.seed, seq.choice), 0, seq.temperature, seq.top_k, seq.top_p,
                    seq.repetition_penalty, seq.min_tokens,
                    list(ends) + [-1] * (MAX_END_IDS - len(ends)))
        for x, value in zip(self._settings, settings):
            x[b] = value
        picked, prompt_lp, row_cache, seen_1xV = self._prefill_row(prompt, n,
                                                                   seq.prompt_logprobs, b)
        self._state = _insert(self._state, row_cache, seen_1xV, np.int32(b),
                              layout=self._layout)
        seq.slot, self._rows[b] = b, seq
        self._positions[b] = n
        first = None
        if prompt_lp is not None:
            lp_1xL, (top_lp_1xLxK, top_ids_1xLxK) = jax.device_get(prompt_lp)
            first = ([None] + lp_1xL[0, L - n + 1:].tolist(),
                     [None] + [dict(zip(i.tolist(), v.tolist())) for i, v in
                               zip(top_ids_1xLxK[0, L - n:L - 1], top_lp_1xLxK[0, L - n:L - 1])])
        self._record(b, *(np.asarray(x)[0] for x in picked), prompt=first)

    def _run_step(self):
        """One decode step of the rows of the current bucket only.

        Why buckets: on a CPU the step is compute-bound from one row on (GPT-2 124M, f32,
        T = 512, 2 loaded cores: 130 ms for 1 row, 906 ms for 16, 1592 ms for 32; a cache of
        64 instead of 512 slots saves only 20% at 16 rows: the cost is the dense layers'
        per-row FLOPs, not the cache), so a step over every slot made one request on a 32-slot
        server pay for 32 rows. The rows are kept in the lowest rows of the smallest bucket
        that holds them (`_admit` grows it, `_fit` compacts and shrinks it; each resize is one
        copy of the rows, about a step's cache traffic, and happens only when the number of
        active rows crosses a power of two). Slicing rows out of one full-size cache instead
        costs a copy of those rows every step (measured: 37% slower than a 16-row cache)."""
        nb = self._bucket
        picked, self._state = _decode_step(
            self.params, self._state, np.int32(self._index), self._feed[:nb],
            self._positions[:nb], self._rows_settings(slice(0, nb)),
            model_config=self.model_config, layout=self._layout)
        return picked

    def _decode(self):
        if self._index >= self.cache_len:
            oldest = max(int(self._positions[b]) for b, r in enumerate(self._rows) if r)
            self._set_index(max(oldest, self.cache_len // 2))
        t0 = time.perf_counter()
        tokens_B, lp_B, top_lp_BxK, top_ids_BxK = jax.device_get(self._run_step())
        self._index += 1
        self.steps += 1
        count = 0
        for b, row in enumerate(self._rows[:self._bucket]):
            if row is not None:
                self._positions[b] += 1
                self._record(b, tokens_B[b], lp_B[b], top_lp_BxK[b], top_ids_BxK[b])
                count += 1
        rate = count / max(time.perf_counter() - t0, 1e-9)
        self.tokens_per_second = rate if self.steps == 1 else (
            0.9 * self.tokens_per_second + 0.1 * rate)

    # ------------------------------------------------------------------------------ output

    def _record(self, b: int, token, logprob, top_lp_K, top_ids_K, prompt=None):
        """Appends row b's new token; emits the text that is safe to emit; finishes the row on
        an end token, a stop string or max_tokens."""
        seq = self._rows[b]
        token = int(token)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        seq.ids.append(token)
        self.generated_tokens += 1
        seq._logprobs.append(float(logprob))
        seq._top.append(dict(zip(np.asarray(top_ids_K).tolist(),
                                 np.asarray(top_lp_K).tolist())))
        self._feed[b], self._settings.steps_B[b] = token, len(seq.ids)
        ended = token in self.end_ids(seq)
        text = self.tokenizer.decode(seq.ids)
        cut = find_stop(text, seq.stop, max(0, seq.text_sent - max(map(len, seq.stop),
                                                                   default=0)))
        if cut >= 0:
            self._emit(seq, text[:cut], "stop", prompt)
        elif ended:
            self._emit(seq, text, "stop", prompt)
        elif len(seq.ids) >= seq.max_tokens:
            self._emit(seq, text, "length", prompt)
        else:
            self._emit(seq, text[:len(text) - held_back(text, seq.stop)], None, prompt)

    def _emit(self, seq: Sequence, text: str, finish: str | None, prompt=None):
        """Sends what is new since the last chunk (nothing if nothing is new and not done)."""
        delta = text[seq.text_sent:] if len(text) > seq.text_sent else ""
        new = slice(seq.tokens_sent, len(seq.ids))
        if delta or finish or prompt is not None:
            chunk = Chunk(delta, seq.ids[new], seq._logprobs[new], seq._top[new], finish)
            if prompt is not None:
                chunk.prompt_logprobs, chunk.prompt_top_logprobs = prompt
            seq.text_sent = max(seq.text_sent, len(text))
            seq.tokens_sent = len(seq.ids)
            if finish:
                self._finish(seq, finish, chunk=chunk)
            else:
                _send(seq, chunk)

    def _finish(self, seq: Sequence, reason: str, chunk: Chunk | None = None, note: str = ""):
        """Frees the sequence's slot and sends its last chunk."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason, seq.finished = reason, time.monotonic()
        if seq.slot is not None and self._rows[seq.slot] is seq:
            self._rows[seq.slot] = None
            self._positions[seq.slot] = self._feed[seq.slot] = 0
            self._settings.steps_B[seq.slot] = 0
        _send(seq, chunk or Chunk(note if reason == "error" else "", [], [], [], reason))
        for hook in self.on_finish:
            hook(seq)


def _send(seq: Sequence, chunk: Chunk) -> None:
    """seq.emit(chunk); a failing callback is logged and cancels its sequence, nothing else."""
    try:
        seq.emit(chunk)
    except Exception:  # one failed request never takes the server down
        logging.exception("serve: a sequence's emit callback failed")
        seq.cancelled = True


def place_on_mesh(params: Any, model_config: ModelConfig, tensor: int = 1, fsdp: int = 1):
    """(params sharded by the default rules, mesh, rules) on a (data, fsdp, tensor) mesh of
    every device (data = the rest): what `Engine(mesh=..., rules=...)` runs on."""
    mesh_config = config_lib.default_config().mesh
    mesh_config.update(data=-1, fsdp=fsdp, tensor=tensor)
    mesh = sharding.make_mesh(mesh_config)
    rules = sharding.rules(mesh_config, model_config, mesh.shape)
    shardings = sharding.logical_to_sharding(model_lib.logical_axes(model_config), mesh, rules)
    return jax.device_put(params, shardings), mesh, rules
