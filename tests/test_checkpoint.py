"""Checkpoints: exact resume after SIGKILL/SIGTERM (real processes), corrupt-latest fallback,
config checks, params-only loading, init_from fine-tuning, unwritable workdirs, failed saves."""
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import config_diff
from lmjax import data as data_lib
from lmjax import lock as lock_lib
from lmjax import model as model_lib
from lmjax import sample as sample_lib
from lmjax import run_config
from lmjax import train as train_lib
from lmjax import steps as steps_lib
from lmjax.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40
CHECKPOINT_EVERY = 10
# The step at which the kill tests stop a run is drawn from random.Random(SEED) and printed;
# LMJAX_TEST_SEED=n reruns them with another draw.
SEED = int(os.environ.get("LMJAX_TEST_SEED", "0"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    rng = random.Random(0)
    words = ("to be or not that is the question whether tis nobler in mind suffer slings "
             "arrows of outrageous fortune").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(1500)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- helpers

TINY = {"model.embed_dim": 32, "model.mlp_dim": 128, "model.num_layers": 2, "model.num_heads": 2,
        "data.seq_len": 32, "data.batch_size": 4, "train.num_steps": NUM_STEPS,
        "train.checkpoint_every": CHECKPOINT_EVERY, "train.keep_checkpoints": 3,
        "train.num_samples": 0, "train.progress_bar": False, "train.log_every": 1,
        "train.eval_every": 0, "train.eval_batches": 2, "train.final_eval_batches": 0,
        "train.steps_per_call": 1, "optim.warmup_steps": 10}


def launcher_cmd(text_file, workdir, **overrides):
    fields = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ([sys.executable, os.path.join(REPO, "experiments", "train.py"),
             "--config=tiny_shakespeare_char"
             f":{text_file}", f"--workdir={workdir}"]
            + [f"--config.{k}={v}" for k, v in fields.items()])


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Launched runs share one persistent XLA cache: only the first compiles (same binaries)."""
    global _ENV
    _ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    yield


_ENV = None


def run_launcher(cmd, log_path):
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=300,
                              env=_ENV)
    output = open(log_path).read()
    assert proc.returncode == 0, output[-3000:]
    return output


def read_losses(workdir) -> dict[int, float]:
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            if "micro_step" in entry:
                assert entry["micro_step"] not in losses, "a step logged twice"
                losses[entry["micro_step"]] = entry["loss"]
    return losses


PAUSE_MARKER = "LMJAX_TEST_PAUSED step={}"


def pause_and_signal(cmd, log_path, step, sig, while_paused=None):
    """Runs the launcher with LMJAX_TEST_PAUSE_AT_STEP=step: it stops after optimizer step
    `step` (losses logged; eval, save and SIGTERM check not yet done) and prints PAUSE_MARKER.
    Once that line is read from its stdout, calls `while_paused(pid)` if given, then sends
    `sig`. Returns (return code, output)."""
    env = {**_ENV, "LMJAX_TEST_PAUSE_AT_STEP": str(step), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)
    lines = queue.Queue()  # filled by a thread that drains the pipe; None at its end

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output, marker = [], PAUSE_MARKER.format(step)
    deadline = time.monotonic() + 300  # a safety net for a hung run, not a timing window
    try:
        while not output or output[-1].rstrip("\n") != marker:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail(f"no {marker!r} within 300 s:\n" + "".join(output)[-3000:])
            if line is None:
                pytest.fail(f"the run ended (rc {proc.wait()}) without printing {marker!r}:\n"
                            + "".join(output)[-3000:])
            output.append(line)
        if while_paused is not None:
            while_paused(proc.pid)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        output.extend(iter(lambda: lines.get(timeout=60), None))  # the rest, up to EOF
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(output)
    with open(log_path, "w") as log:
        log.write(output)
    return rc, output


def draw_step(choices) -> int:
    step = random.Random(SEED).choice(list(choices))
    print(f"signal at step {step}, drawn with random.Random({SEED}) (LMJAX_TEST_SEED={SEED})")
    return step


def assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(text_file, tmp_path_factory):
    """An uninterrupted run: its per-step losses and final params."""
    workdir = str(tmp_path_factory.mktemp("ref") / "workdir")
    run_launcher(launcher_cmd(text_file, workdir), workdir + ".log")
    params, _, _ = ckpt_lib.load_params(workdir)
    losses = read_losses(workdir)
    assert sorted(losses) == list(range(NUM_STEPS))
    return {"workdir": workdir, "losses": losses, "params": params}


# ----------------------------------------------------------------------------- real processes


def test_sigkill_then_rerun_resumes_exactly(text_file, reference_run, tmp_path):
    """SIGKILL right after step k (before its save, if k is a save step): the rerun resumes from
    the newest checkpoint before k and recomputes every later step bit for bit."""
    workdir = str(tmp_path / "workdir")
    killed_at = draw_step(range(CHECKPOINT_EVERY + 1, NUM_STEPS))
    # Synchronous saves: every checkpoint before step k is on disk when the run pauses at k
    # (an asynchronous one may still be in flight: which one the rerun finds would be a race).
    cmd = launcher_cmd(text_file, workdir, train__async_checkpoints=False)
    rc, output = pause_and_signal(cmd, str(tmp_path / "1.log"), killed_at, signal.SIGKILL)
    assert rc == -signal.SIGKILL, output[-3000:]
    newest = (killed_at - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY  # the save at k comes after
    saved = list(range(CHECKPOINT_EVERY, newest + 1, CHECKPOINT_EVERY))[-3:]  # keep_checkpoints=3
    assert ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir)) == saved, output[-3000:]
    assert sorted(read_losses(workdir)) == list(range(killed_at))  # logged through step k

    assert os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))  # left by the killed run

    output = run_launcher(cmd, str(tmp_path / "2.log"))
    assert "was left by a run that is gone" in output and "taking it over" in output
    assert f"resuming from checkpoint step {newest} " in output, output[-3000:]
    assert read_losses(workdir) == reference_run["losses"]  # every step, bit for bit
    params, _, _ = ckpt_lib.load_params(workdir)
    assert_params_equal(params, reference_run["params"])


def test_sigterm_saves_at_current_step_and_resumes(text_file, reference_run, tmp_path):
    """SIGTERM after step k (not a periodic save step): a checkpoint at exactly step k, exit 0,
    and the rerun continues from it as if never stopped."""
    workdir = str(tmp_path / "workdir")
    sent_at = draw_step(k for k in range(1, NUM_STEPS) if k % CHECKPOINT_EVERY)
    cmd = launcher_cmd(text_file, workdir)
    rc, output = pause_and_signal(cmd, str(tmp_path / "1.log"), sent_at, signal.SIGTERM)
    assert rc == 0, output[-3000:]
    assert f"Preempted (SIGTERM): checkpoint saved at step {sent_at} " in output, output[-3000:]
    periodic = list(range(CHECKPOINT_EVERY, sent_at, CHECKPOINT_EVERY))
    assert ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir)) == (periodic + [sent_at])[-3:]
    assert sorted(read_losses(workdir)) == list(range(sent_at))  # stopped right after step k

    output = run_launcher(cmd, str(tmp_path / "2.log"))
    assert f"resuming from checkpoint step {sent_at} " in output, output[-3000:]
    assert read_losses(workdir) == reference_run["losses"]
    params, _, _ = ckpt_lib.load_params(workdir)
    assert_params_equal(params, reference_run["params"])


def test_second_writer_fails_fast_naming_the_holder(text_file, tmp_path):
    """Two real runs on one workdir: while the first is paused after a step, the second exits
    at once (code 1, one line naming the first's pid and host) and touches nothing; the first
    then saves on SIGTERM as if alone and releases the lock."""
    workdir = str(tmp_path / "workdir")
    cmd = launcher_cmd(text_file, workdir)
    paused_at = draw_step(range(1, CHECKPOINT_EVERY))
    second = {}

    def run_second(pid):
        before = sorted(os.listdir(workdir))
        started = time.monotonic()
        second["done"] = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                        timeout=300, env=_ENV)
        second["seconds"] = time.monotonic() - started
        second["pid"] = pid
        assert sorted(os.listdir(workdir)) == before  # nothing created or removed

    rc, output = pause_and_signal(cmd, str(tmp_path / "1.log"), paused_at, signal.SIGTERM,
                                  while_paused=run_second)
    done = second["done"]
    print(f"second run ended after {second['seconds']:.1f} s (rc {done.returncode})")
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lmjax train: error: workdir ") and "is in use by" in last
    assert f"pid {second['pid']} on host {socket.gethostname()!r}" in last
    assert "Traceback" not in done.stderr
    assert rc == 0 and f"checkpoint saved at step {paused_at} " in output, output[-3000:]
    assert sorted(read_losses(workdir)) == list(range(paused_at))  # no line lost or doubled
    assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))  # released


def test_sigterm_with_a_slow_device_saves_within_two_steps(text_file, tmp_path, monkeypatch):
    """Each step takes 50 ms on the device (a callback in the loss sleeps); the device itself
    sends SIGTERM while it runs micro-step s. The host never runs more than two steps ahead,
    so the preemption checkpoint is at step s+1 or s+2 (unbounded, the host had dispatched all
    steps and would save only at the end); the resumed run matches an uninterrupted one."""
    executed, signal_at = [], draw_step(range(2, 12))
    loss_fn = steps_lib.loss_fn

    def on_device():
        executed.append(time.monotonic())
        time.sleep(0.05)
        if len(executed) == signal_at + 1:
            executed.append(("signal", time.monotonic()))
            os.kill(os.getpid(), signal.SIGTERM)

    def slow_loss(*args, **kwargs):
        jax.debug.callback(on_device)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(steps_lib, "loss_fn", slow_loss)
    fields = dict(train__num_steps=16, train__log_every=16, train__checkpoint_every=0)
    result = train_lib.train_and_evaluate(tiny_config(text_file, **fields), str(tmp_path / "a"))
    sent = next(t for t in executed if isinstance(t, tuple))[1]
    print(f"SIGTERM during micro-step {signal_at}; checkpoint at step {result.get('step')} "
          f"{time.monotonic() - sent:.2f} s later")
    assert result["preempted"] and signal_at + 1 <= result["step"] <= signal_at + 2

    executed.clear()
    signal_at = -1  # no signal from here on
    resumed = train_lib.train_and_evaluate(tiny_config(text_file, **fields), str(tmp_path / "a"))
    whole = train_lib.train_and_evaluate(tiny_config(text_file, **fields), str(tmp_path / "b"))
    assert read_losses(str(tmp_path / "a")) == read_losses(str(tmp_path / "b"))
    assert_params_equal(resumed["state"].params, whole["state"].params)


# ----------------------------------------------------------------------------- in process


def tiny_config(text_file, **overrides):
    config = default_config()
    config.data.source, config.data.train_files = "files", text_file
    config.model.update(dropout=0.0, bias=False)
    overrides = {"optim.warmup_steps": 2,
                 **{k.replace("__", "."): v for k, v in overrides.items()}}
    for key, value in {**TINY, **overrides}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_corrupt_latest_falls_back_to_newest_good(text_file, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=15,
                                             train__checkpoint_every=5), workdir)
    ref = read_losses(workdir)
    cdir = ckpt_lib.checkpoint_dir(workdir)
    assert ckpt_lib._steps_in(cdir) == [5, 10, 15]
    # 15: a truncated array file; 10: an item missing; plus a half-written tmp folder of step 20.
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(cdir, "15", "params"))
             for f in fs if "/d/" in os.path.join(r, f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    shutil.rmtree(os.path.join(cdir, "10", "train_state"))
    os.makedirs(os.path.join(cdir, "20.orbax-checkpoint-tmp-123", "params"))

    capsys.readouterr()
    result = train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=15,
                                                      train__checkpoint_every=5), workdir)
    out = capsys.readouterr().out
    assert "checkpoint step 15 is corrupt or incomplete" in out
    assert "checkpoint step 10 is corrupt or incomplete" in out
    assert "resuming from checkpoint step 5 " in out
    assert sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints")))[0].startswith("10-")
    assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == 2  # kept, not deleted
    assert ckpt_lib._steps_in(cdir) == [5, 10, 15]
    assert not [n for n in os.listdir(cdir) if "tmp" in n]
    assert read_losses(workdir) == ref  # steps 5..14 recomputed identically
    assert len(result["train_loss"]) == 15


def test_resume_rejects_model_shape_change_before_compute(text_file, tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=5), workdir)

    def no_data(*args, **kwargs):
        raise AssertionError("build_data ran before the config check")

    monkeypatch.setattr(data_lib, "build_data", no_data)
    config = tiny_config(text_file, train__num_steps=10, model__num_layers=1,
                         model__mlp_dim=64)
    with pytest.raises(config_diff.IncompatibleCheckpointError) as e:
        train_lib.train_and_evaluate(config, workdir)
    assert "model.num_layers: checkpoint 2, config 1" in str(e.value)
    assert "model.mlp_dim: checkpoint 128, config 64" in str(e.value)
    with pytest.raises(config_diff.IncompatibleCheckpointError, match="optim.grad_accum: checkpoint 1"):
        train_lib.train_and_evaluate(tiny_config(text_file, optim__grad_accum=2), workdir)


def test_resume_allows_safe_changes(text_file, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=5), workdir)
    changes = config_diff.check_resume_config(
        ckpt_lib.read_checkpoint_info(workdir)["config"],
        ckpt_lib.read_checkpoint_info(workdir)["model_config"],
        tiny_config(text_file, train__num_steps=8, optim__learning_rate=3e-4,
                    train__eval_every=2, model__dropout=0.1))
    assert "train.num_steps: 5 -> 8" in changes and "optim.learning_rate: 0.001 -> 0.0003" in changes
    capsys.readouterr()
    result = train_lib.train_and_evaluate(
        tiny_config(text_file, train__num_steps=8, optim__learning_rate=3e-4), workdir)
    assert "resuming from checkpoint step 5 " in capsys.readouterr().out
    assert int(result["state"].step) == 8 and len(result["train_loss"]) == 8


def _greedy_by_recomputation(params, mcfg, prompt, steps):
    """Greedy continuation by a full forward pass per token (no KV cache): the reference for
    sampling. A fixed-length buffer (one compile); the model is causal, so the slots after the
    last token do not change the logits at it."""
    next_token = jax.jit(lambda buffer, last: jax.numpy.argmax(
        model_lib.Transformer(mcfg).apply({"params": params}, buffer[None])[0, last]))
    buffer = np.zeros(len(prompt) + steps, np.int32)
    buffer[:len(prompt)] = prompt
    for n in range(len(prompt), len(buffer)):
        buffer[n] = next_token(buffer, n - 1)
    return buffer[len(prompt):].tolist()


def test_load_params_for_sampling_matches_trained(text_file, tmp_path):
    workdir = str(tmp_path / "w")
    result = train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=6,
                                                      train__keep_best=True), workdir)
    chars = "".join(sorted(set(open(text_file).read())))  # the char tokenizer's vocabulary
    for path in (workdir, os.path.join(workdir, "checkpoints"),
                 os.path.join(workdir, "checkpoints", "6")):
        params, mcfg, tokenizer = ckpt_lib.load_params(path)
        assert mcfg == result["model_config"] and mcfg.vocab_size == len(chars)
        assert tokenizer.encode("to be or not") == [chars.index(c) for c in "to be or not"]
        assert_params_equal(params, result["state"].params)
    # A params-only export (no optimizer state) loads the same way, from anywhere.
    exported = ckpt_lib.export_params(str(tmp_path / "export"), params, mcfg, tokenizer)
    assert not os.path.exists(os.path.join(exported, "train_state"))
    params, mcfg, tokenizer = ckpt_lib.load_params(exported)
    assert mcfg == result["model_config"]
    assert_params_equal(params, result["state"].params)
    # What sampling needs comes back: greedy decoding (KV cache) from the export's params,
    # config and tokenizer continues as a full recomputation with the trained params does.
    sampling = sample_lib.SamplingConfig(max_new_tokens=8, greedy=True)
    [text] = sample_lib.sample_text(params, mcfg, tokenizer, ["to be"], sampling, 0)
    expected = _greedy_by_recomputation(result["state"].params, result["model_config"],
                                        [chars.index(c) for c in "to be"], 8)
    assert text == "".join(chars[i] for i in expected)


def _adam_count(opt_state) -> int:
    counts = [int(s.count) for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "count") and hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(counts) == 1
    return counts[0]


def test_init_from_starts_from_params_with_fresh_optimizer(text_file, tmp_path):
    source = str(tmp_path / "source")
    trained = train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=6), source)
    assert _adam_count(trained["state"].opt_state) == 6
    for i, init_from in enumerate((source, os.path.join(source, "checkpoints", "6"))):
        # Learning rate 0: one step leaves the params as they were loaded.
        config = tiny_config(text_file, train__num_steps=1, optim__learning_rate=0.0,
                             optim__min_learning_rate=0.0, optim__warmup_steps=0)
        config.init_from = init_from
        result = train_lib.train_and_evaluate(config, str(tmp_path / f"finetune{i}"))
        assert_params_equal(result["state"].params, trained["state"].params)
        assert _adam_count(result["state"].opt_state) == 1  # fresh optimizer, one step
        assert int(result["state"].step) == 1
    config = tiny_config(text_file, model__embed_dim=16)
    config.init_from = source
    with pytest.raises(config_diff.IncompatibleCheckpointError,
                       match="model.embed_dim: checkpoint 32, config 16"):
        train_lib.train_and_evaluate(config, str(tmp_path / "bad"))


def _read_only_dir(tmp_path):
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return str(path), lambda: path.chmod(0o755)
    # root ignores permission bits: a read-only tmpfs instead (needs mount rights).
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("running as root without mount rights: cannot make a read-only directory")
    return str(path), lambda: subprocess.run(["umount", str(path)], check=True)


def test_unwritable_workdir_is_a_clear_error_at_start(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "build_data", lambda *a, **k: pytest.fail("data built"))
    path, cleanup = _read_only_dir(tmp_path)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match="is not writable"):
            train_lib.train_and_evaluate(tiny_config(text_file), os.path.join(path, "run"))
    finally:
        cleanup()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ckpt_lib.CheckpointError, match="is not writable"):
        train_lib.train_and_evaluate(tiny_config(text_file), str(tmp_path / "a_file" / "run"))


def _tiny_state():
    config = tiny_config("unused")
    mcfg = run_config.model_config(config, vocab_size=20)
    tx, _ = steps_lib.make_optimizer(config.optim, 10)
    return config, mcfg, tx, steps_lib.create_train_state(mcfg, tx, jax.random.key(0))


class _Tok:
    kind = "byte"

    def save(self, directory):
        from lmjax.tokenizers import ByteTokenizer
        ByteTokenizer().save(directory)


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_is_a_clear_error_and_keeps_previous(tmp_path, monkeypatch, async_save):
    config, mcfg, tx, state = _tiny_state()
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=async_save)
    kw = dict(config=config, model_config=mcfg, tokenizer=_Tok())
    ckpt.save(state, step=1, micro_step=0, **kw)
    ckpt.wait()

    import orbax.checkpoint as ocp  # public alias of the same class

    async def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "serialize", disk_full)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt.save(state, step=2, micro_step=0, **kw)  # keep=1: step 1 is due for deletion
        ckpt.wait()
    assert "step 2" in str(e.value) and "No space left" in str(e.value)
    assert "intact: steps [1]" in str(e.value)
    monkeypatch.undo()
    assert ckpt_lib._steps_in(ckpt.directory) == [1]
    restored, meta = ckpt_lib.Checkpointer(str(tmp_path)).restore(
        1, steps_lib.abstract_train_state(mcfg, tx))
    assert meta["step"] == 1
    assert_params_equal(restored.params, state.params)


def test_keep_last_and_best(tmp_path):
    config, mcfg, tx, state = _tiny_state()
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=True)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.7)]:
        ckpt.save(state, step=step, micro_step=step, config=config, model_config=mcfg,
                  tokenizer=_Tok(), metrics={"val_loss": loss})
    ckpt.close()
    assert ckpt_lib._steps_in(ckpt.directory) == [2, 4, 5]  # best (2) + newest two
    # Restarting the manager (metrics re-read from disk) keeps the same policy.
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=True)
    ckpt.save(state, step=6, micro_step=6, config=config, model_config=mcfg, tokenizer=_Tok(),
              metrics={"val_loss": 2.9})
    ckpt.close()
    assert ckpt_lib._steps_in(ckpt.directory) == [2, 5, 6]


def test_restore_targets_carry_shardings(tmp_path):
    config, mcfg, tx, state = _tiny_state()
    abstract = steps_lib.abstract_train_state(mcfg, tx)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    ckpt.save(state, step=3, micro_step=0, config=config, model_config=mcfg, tokenizer=_Tok())
    ckpt.wait()
    restored, _ = ckpt.restore(3, abstract)
    assert_params_equal(restored.params, state.params)
    assert_params_equal(restored.opt_state, state.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    for x, a in zip(jax.tree.leaves(restored.params), jax.tree.leaves(abstract.params)):
        assert x.sharding == a.sharding
