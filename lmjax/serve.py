"""The serving engine: continuous batching over a fixed number of decode slots (KV-cache rows),
as JetStream's prefill / insert / generate engine. serve_http.py puts the OpenAI-compatible HTTP
API in front of it.

    engine = Engine(params, model_config, tokenizer, slots=16)
    engine.start()                        # compiles (warm-up), then decodes in its own thread
    seq = engine.submit(Sequence(prompt_ids, max_tokens=64, temperature=0.8, seed=1,
                                 emit=print))  # emit(Chunk) from the engine thread
    engine.stop()

The device side (the KV-cache rows in a row bucket, the jitted prefill / insert / step
programs, the cache shift, the per-row randomness) is serve_batch.py's DecodeBatch; this module
schedules sequences over its rows: a bounded queue, admission into free rows (growing the row
bucket), compaction when the active rows fit in half of it, and the output of every step.

Stop strings and end tokens are checked on the host after each step, on the decoded text: text
that could still become a stop string is held back, so that it never leaks into a chunk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from lmjax.config import ModelConfig
from lmjax.serve_batch import MAX_END_IDS, DecodeBatch, key_data


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
    _launched: int = 0  # tokens generated or in a launched step

    @property
    def tokens_needed(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


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
        self.batch = DecodeBatch(params, model_config, slots, self.cache_len)
        self.context = self.batch.context  # prompt + max_tokens
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
        # Where the decode thread's time went (benchmarks/serve_throughput.py prints it): idle
        # (no work), admit (prefill and insert), step (the decode step, dispatch to tokens on
        # the host), output (detokenizing, stop strings, emitting chunks), other.
        self.seconds = dict.fromkeys(("idle", "admit", "step", "output", "other"), 0.0)
        self.row_steps = 0  # active rows summed over decode steps
        self._pending = None  # (picked arrays, [(row, sequence)]) of the step in flight
        self._last_fetch = 0.0
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
            self.batch.reset()
            self.batch.warm_up()
        self.compile_seconds = time.perf_counter() - t0
        logging.info("serve: compiled the decode step for %d row buckets and %d prefill "
                     "buckets in %.1f s", len(self.batch.row_buckets()),
                     len(self.batch.prompt_buckets()),
                     self.compile_seconds)
        self._running, self._last_fetch = True, time.perf_counter()
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

    # ------------------------------------------------------------------------------- loop

    def _loop(self):
        with self.context_manager():
            clock = time.perf_counter()
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: self._stopping or (
                        not self._paused and (self._queue or self.active())))
                    if self._stopping and not self.active() and not self._queue:
                        return
                clock = self._clock("idle", clock)
                self._free_cancelled()
                self._admit()
                self._fit()
                clock = self._clock("admit", clock)
                if self.active():
                    try:
                        self._decode()
                    except Exception as e:  # one failure never takes the server down
                        logging.exception("serve: a decode step failed")
                        self._pending = None
                        for row in self._rows:
                            if row is not None:
                                self._finish(row, "error", note=str(e))
                        self.batch.reset()
                else:
                    self._pending = None  # the rows of the step in flight have all gone
                clock = time.perf_counter()  # _decode counted its own phases
                with self._lock:
                    self._lock.notify_all()
                for hook in self.on_step:
                    hook(self)
                clock = self._clock("other", clock)

    def _clock(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now

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
                while free[0] >= self.batch.bucket:
                    buckets = self.batch.row_buckets()
                    self._resize(buckets[buckets.index(self.batch.bucket) + 1])
                self._insert(seq, free[0])
            except Exception as e:
                logging.exception("serve: a prefill failed")
                self._rows[free[0]] = None
                self._finish(seq, "error", note=str(e))

    def _resize(self, nb: int):
        """The row bucket grown or shrunk to nb rows; sequences moved by the compaction follow."""
        for mover, hole in self.batch.resize(nb, [r is not None for r in self._rows]):
            seq, self._rows[mover] = self._rows[mover], None
            seq.slot, self._rows[hole] = hole, seq

    def _fit(self):
        """Shrinks the row bucket while the active rows fit in half of it (a step's cost
        follows the rows it decodes, see serve_batch.DecodeBatch)."""
        buckets = self.batch.row_buckets()
        while self.batch.bucket > 1:
            smaller = buckets[buckets.index(self.batch.bucket) - 1]
            if self.active() > smaller:
                return
            self._resize(smaller)

    def _insert(self, seq: Sequence, b: int):
        n, ends = len(seq.prompt_ids), self.end_ids(seq)
        settings = (key_data(seq.seed, seq.choice), 0, seq.temperature, seq.top_k, seq.top_p,
                    seq.repetition_penalty, seq.min_tokens,
                    list(ends) + [-1] * (MAX_END_IDS - len(ends)))
        picked, prompt_lp, L = self.batch.insert(b, seq.prompt_ids, settings,
                                                 seq.prompt_logprobs)
        seq.slot, self._rows[b] = b, seq
        seq._launched = 1
        first = None
        if prompt_lp is not None:
            lp_L, (top_lp_LxK, top_ids_LxK) = prompt_lp
            first = ([None] + lp_L[L - n + 1:].tolist(),
                     [None] + [dict(zip(i.tolist(), v.tolist())) for i, v in
                               zip(top_ids_LxK[L - n:L - 1], top_lp_LxK[L - n:L - 1])])
        self._record(seq, *picked, prompt=first)

    def _decode(self):
        """Launches a step of the rows that still need tokens (`DecodeBatch.step`: step k + 1
        reads step k's tokens on the device), then reads and records the step launched
        before it: a sequence's end shows one step late, and the row's extra token is
        dropped. A row that will have max_tokens once the launched steps land is left out."""
        t0 = time.perf_counter()
        launch = [(b, row) for b, row in enumerate(self._rows)
                  if row is not None and row._launched < row.max_tokens]
        pending = self._pending
        self._pending = None
        if launch:
            for _, row in launch:
                row._launched += 1
            self._pending = self.batch.step([b for b, _ in launch]), launch
            self.steps += 1
            self.row_steps += len(launch)
        if pending is None:
            return
        picked, rows = pending
        tokens_B, lp_B, top_lp_BxK, top_ids_BxK = self.batch.fetch(picked)
        t1 = self._clock("step", t0)
        count = 0
        for b, seq in rows:
            if seq.finish_reason is None:  # else it ended (or went) a step before
                self._record(seq, tokens_B[b], lp_B[b], top_lp_BxK[b], top_ids_BxK[b])
                count += 1
        self._clock("output", t1)
        now = time.perf_counter()
        rate = count / max(now - self._last_fetch, 1e-9)
        self._last_fetch = now
        self.tokens_per_second = rate if self.steps <= 1 else (
            0.9 * self.tokens_per_second + 0.1 * rate)

    # ------------------------------------------------------------------------------ output

    def _record(self, seq: Sequence, token, logprob, top_lp_K, top_ids_K, prompt=None):
        """Appends the sequence's new token; emits the text that is safe to emit; finishes it
        on an end token, a stop string or max_tokens."""
        token = int(token)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        seq.ids.append(token)
        self.generated_tokens += 1
        seq._logprobs.append(float(logprob))
        seq._top.append(dict(zip(np.asarray(top_ids_K).tolist(),
                                 np.asarray(top_lp_K).tolist())))
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
            self.batch.free(seq.slot)
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
