"""What keeps a training run's state safe while it runs (README: "What is safe").

The host stays at most `MAX_CALLS_AHEAD` jitted calls ahead of the device (`wait_for_device`),
each finished call's loss and gradient norm are checked (`nonfinite_check`), and SIGTERM is
turned into "save after the step in flight" (`PreemptionWatcher`). `train.train_loop` uses all
three.
"""
from __future__ import annotations

import collections
import math
import os
import signal

import jax
from absl import logging

from lmjax import checkpoint as checkpoint_lib


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite (and optim.skip_nonfinite is off)."""


# Calls dispatched ahead of the device at most: before call k is dispatched, call k-2 has
# finished. The device always has the next call queued (no bubble), and a SIGTERM or a
# non-finite loss is acted on within about two steps, however long a step takes (unbounded, the
# host ran ~35 steps of 20 s ahead and a preemption save waited 12 minutes for them).
MAX_CALLS_AHEAD = 2


def wait_for_device(in_flight: collections.deque, ahead: int, check=None) -> None:
    """Blocks until at most `ahead` of the dispatched calls in `in_flight` (deque of
    [(micro_step, metrics)] lists, oldest first) are unfinished; `check(micro_step, metrics)`
    runs on each finished one."""
    while len(in_flight) > ahead:
        for k, metrics in in_flight.popleft():
            jax.block_until_ready(metrics["loss"])
            if check is not None:
                check(k, metrics)


def nonfinite_check(config, ckpt: checkpoint_lib.Checkpointer):
    """`check(micro_step, metrics)`: NonFiniteLossError naming the step, the values and the last
    good checkpoint for a NaN/inf loss or gradient norm (unless optim.skip_nonfinite)."""
    accum = config.optim.grad_accum

    def check(k, metrics):
        if config.optim.skip_nonfinite:
            return
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        try:
            ckpt.wait()
        except checkpoint_lib.CheckpointError as e:
            logging.error("%s", e)
        where = f"micro-step {k} of " if accum > 1 else ""
        raise NonFiniteLossError(
            f"{where}step {k // accum + 1}: loss={loss} grad_norm={grad_norm} is not finite; the "
            f"run stopped. Last good checkpoint: {ckpt.last_saved()} (a re-run resumes there). "
            "Lower optim.learning_rate or raise optim.warmup_steps, check the data, or set "
            "optim.skip_nonfinite=True to pass over such steps")
    return check


class PreemptionWatcher:
    """SIGTERM -> stop after the step in flight (single process); multi-process runs use JAX's
    preemption sync point so that every process stops (and saves) at the same step."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread: no handler, no preemption saves
                logging.warning("not in the main thread: SIGTERM will not trigger a checkpoint")

    def _handler(self, signum, frame):
        del frame
        self.signalled = True
        logging.warning("signal %d received: saving a checkpoint after the current step", signum)

    def requested(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception as e:  # noqa: BLE001 - no preemption service (no distributed init)
                logging.log_first_n(logging.WARNING, "no preemption sync point: %s", 1, e)
                return False
        return self.signalled

    def pause_for_test(self, step: int) -> None:
        """Tests that kill a run at a known step: with LMJAX_TEST_PAUSE_AT_STEP=k set, the loop
        stops after optimizer step k (its losses logged; its eval, save and SIGTERM check not yet
        done), prints
        `LMJAX_TEST_PAUSED step=k` and waits for a signal: SIGKILL ends it there, SIGTERM makes it
        save at step k and return, as a preemption would."""
        if os.environ.get("LMJAX_TEST_PAUSE_AT_STEP") != str(step):
            return
        print(f"LMJAX_TEST_PAUSED step={step}", flush=True)
        while not self.signalled:
            signal.pause()  # returns after a signal's handler ran

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

