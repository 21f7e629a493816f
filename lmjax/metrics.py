"""What a training run reports: every micro-step's loss in `metrics.jsonl`, TensorBoard scalars,
and a progress bar that ticks every step with tokens/s and an ETA.

The loop never waits for the device between log points: a background thread waits on each
step's loss in turn and advances the bar when it is computed, and the losses themselves are
fetched every `train.log_every` steps. (Checking `jax.Array.is_ready` in the loop did not tick:
the host dispatches every step up to the next log point before the first has finished.)
Process 0 writes the files; the other processes keep the history only.

`metrics.jsonl` has one JSON line per micro-step {"micro_step", "step", "loss"} (plus
"skipped": true where `optim.skip_nonfinite` passed over a non-finite step) and one per
evaluation {"step", "eval_loss", "eval_perplexity", "eval_tokens"}.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Any, Callable

from absl import logging
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """The reporting side of the training loop, from micro-step `start_micro` of a run.

    `record(k, metrics)` takes micro-step k's metrics as device arrays (`loss`, `grad_norm`);
    `log_eval(step, result)` an evaluation; `write_losses()` puts every recorded loss on disk
    (the loop calls it before each checkpoint, so a checkpoint never covers an unlogged step).
    `history` is {'train_loss': [every micro-step's loss], 'eval': [{'step', 'loss', ...}],
    'skipped_steps': [micro-steps passed over as non-finite]}, including what an interrupted run
    had logged before the step it resumes from.
    """

    def __init__(self, workdir: str, *, start_micro: int, num_micro_steps: int, accum: int,
                 log_every: int, tokens_per_micro_step: int, schedule: Callable[[int], Any],
                 progress_bar: bool, is_main: bool):
        path = os.path.join(workdir, METRICS_FILE)
        self.history = rewind_metrics(path, start_micro, accum, write=is_main)
        self._file = open(path if is_main else os.devnull, "a")
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
        self._bar = tqdm.tqdm(total=num_micro_steps, initial=start_micro, unit="step",
                              dynamic_ncols=True, disable=not progress_bar)
        self._show_bar = progress_bar
        self._ticks = queue.Queue()  # losses of dispatched steps; None ends the ticker
        self._ticker = threading.Thread(target=self._tick, daemon=True) if progress_bar else None
        if self._ticker is not None:
            self._ticker.start()
        self._accum, self._log_every, self._schedule = accum, log_every, schedule
        self._num_micro_steps, self._tokens = num_micro_steps, tokens_per_micro_step
        self._unlogged = []  # (micro_step, metrics) since the last log point
        self._unwritten = []  # (micro_step, loss array) not yet in metrics.jsonl
        self._clock, self._clock_step = time.perf_counter(), start_micro

    def record(self, micro_step: int, metrics: dict) -> None:
        """Micro-step `micro_step` was dispatched with these (possibly unfinished) metrics."""
        if self._ticker is not None:
            self._ticks.put(metrics["loss"])
        self._unlogged.append((micro_step, metrics))
        self._unwritten.append((micro_step, metrics["loss"], metrics.get("skipped")))
        step, boundary = divmod(micro_step + 1, self._accum)
        is_last = micro_step + 1 == self._num_micro_steps
        if not boundary and (step % self._log_every == 0 or is_last):
            self._log_train(step, micro_step)

    def _log_train(self, step: int, micro_step: int) -> None:
        losses = [float(m["loss"]) for _, m in self._unlogged]  # waits for these steps
        grad_norm = float(self._unlogged[-1][1]["grad_norm"])
        tokens_per_s = ((micro_step + 1 - self._clock_step) * self._tokens
                        / (time.perf_counter() - self._clock))
        train_loss = float(np.mean(losses))
        self.history["train_loss"].extend(losses)
        self.write_losses()
        self._scalars(step, {"train/loss": train_loss, "train/grad_norm": grad_norm,
                             "train/learning_rate": float(self._schedule(step)),
                             "train/tokens_per_s": tokens_per_s,
                             "train/skipped_steps": len(self.history["skipped_steps"])})
        self._bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if not self._show_bar:
            logging.info("step %d: train loss %.4f, %.0f tokens/s", step, train_loss,
                         tokens_per_s)
        self._unlogged = []
        self.restart_clock(micro_step + 1)

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """An evaluation at optimizer step `step`: {'loss', 'perplexity', 'tokens'}."""
        self.history["eval"].append({"step": step, **result})
        self._file.write(json.dumps({"step": step, **{
            f"eval_{name}": value for name, value in result.items()}}) + "\n")
        self._scalars(step, {f"eval/{name}": value for name, value in result.items()
                             if name != "tokens" and isinstance(value, float)})
        extra = "".join(f", {name} {value:.4f}" for name, value in result.items()
                        if name not in ("loss", "perplexity", "tokens")
                        and isinstance(value, float))  # an encoder's accuracy, macro-F1
        self._bar.write(f"step {step}: eval loss {result['loss']:.4f}, "
                        f"perplexity {result['perplexity']:.2f}{extra}")

    def write_losses(self) -> None:
        """Every recorded micro-step's loss into metrics.jsonl (fetching what is unfinished)."""
        for k, loss, skipped in self._unwritten:
            entry = {"micro_step": k, "step": (k + 1) // self._accum, "loss": float(loss)}
            if skipped is not None and int(skipped):
                entry["skipped"] = True
                self.history["skipped_steps"].append(k)
            self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self._unwritten = []

    def restart_clock(self, micro_step: int | None = None) -> None:
        """Tokens/s counts training time only: restart the clock after an eval or a save."""
        self._clock = time.perf_counter()
        if micro_step is not None:
            self._clock_step = micro_step

    def _tick(self) -> None:
        """The bar's thread: one tick per step, when its loss is computed."""
        while (loss := self._ticks.get()) is not None:
            loss.block_until_ready()
            self._bar.update(1)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticks.put(None)
            self._ticker.join()
        self._bar.close()
        if self._writer is not None:
            self._writer.flush()
        self._file.close()


def rewind_metrics(path: str, start_micro: int, accum: int, write: bool = True) -> dict[str, list]:
    """Drops lines of `metrics.jsonl` past the resumed step (a killed run wrote them after its
    last checkpoint); returns the kept losses and evals as the start of the run's history."""
    kept, history = [], {"train_loss": [], "eval": [], "skipped_steps": []}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if "micro_step" in entry and entry["micro_step"] < start_micro:
                    history["train_loss"].append(entry["loss"])
                    if entry.get("skipped"):
                        history["skipped_steps"].append(entry["micro_step"])
                elif "eval_loss" in entry and entry["step"] <= start_micro // accum:
                    history["eval"].append({"step": entry["step"], **{
                        name[len("eval_"):]: value for name, value in entry.items()
                        if name.startswith("eval_")}})
                else:
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
    if write:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return history
