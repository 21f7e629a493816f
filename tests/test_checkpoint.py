"""Checkpoints: exact resume after SIGKILL/SIGTERM (real processes), corrupt-latest fallback,
config checks, params-only loading, init_from fine-tuning, unwritable workdirs, failed saves."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import data as data_lib
from lmjax import model as model_lib
from lmjax import train as train_lib
from lmjax.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 200  # long enough that a poller can stop the run mid-way (a step takes ~5 ms)
CHECKPOINT_EVERY = 10


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
        "train.eval_every": 0, "train.eval_batches": 2, "optim.warmup_steps": 10}


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


def last_logged_step(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            steps = [json.loads(l)["micro_step"] for l in f if l.endswith("\n") and "micro" in l]
        return max(steps, default=-1)
    except FileNotFoundError:
        return -1


def start_and_signal(cmd, workdir, log_path, sig, target_step):
    """Starts the launcher; sends `sig` once step `target_step` is logged and a checkpoint
    exists. Returns (return code, micro-step logged last when the signal was sent)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_ENV)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (last_logged_step(workdir) >= target_step
                    and ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir))):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + open(
            log_path).read()[-3000:]
        sent_at = last_logged_step(workdir)
        proc.send_signal(sig)
        return proc.wait(timeout=120), sent_at


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
    workdir = str(tmp_path / "workdir")
    target = random.Random().randint(CHECKPOINT_EVERY + 5, NUM_STEPS // 2)
    cmd = launcher_cmd(text_file, workdir)
    rc, killed_at = start_and_signal(cmd, workdir, str(tmp_path / "1.log"), signal.SIGKILL,
                                     target)
    assert rc == -signal.SIGKILL
    steps = ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir))
    assert steps and max(steps) < NUM_STEPS, (steps, killed_at)

    output = run_launcher(cmd, str(tmp_path / "2.log"))
    resumed = int(re.search(r"resuming from checkpoint step (\d+)", output).group(1))
    assert resumed in steps and resumed <= killed_at + 1 + CHECKPOINT_EVERY
    assert read_losses(workdir) == reference_run["losses"]  # every step, bit for bit
    params, _, _ = ckpt_lib.load_params(workdir)
    assert_params_equal(params, reference_run["params"])


def test_sigterm_saves_at_current_step_and_resumes(text_file, reference_run, tmp_path):
    workdir = str(tmp_path / "workdir")
    target = random.Random().randint(CHECKPOINT_EVERY + 5, NUM_STEPS // 2)
    cmd = launcher_cmd(text_file, workdir)
    rc, sent_at = start_and_signal(cmd, workdir, str(tmp_path / "1.log"), signal.SIGTERM, target)
    output = open(tmp_path / "1.log").read()
    assert rc == 0, output[-3000:]
    match = re.search(r"Preempted \(SIGTERM\): checkpoint saved at step (\d+)", output)
    assert match, output[-3000:]
    saved = int(match.group(1))
    # The step in flight when the signal came (+ the few the host had already dispatched).
    assert sent_at + 1 <= saved <= sent_at + 10, (sent_at, saved)  # slack: a loaded machine
    assert saved in ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir))
    assert max(read_losses(workdir)) == saved - 1  # stopped right after that step

    output = run_launcher(cmd, str(tmp_path / "2.log"))
    assert f"resuming from checkpoint step {saved} " in output
    assert read_losses(workdir) == reference_run["losses"]
    params, _, _ = ckpt_lib.load_params(workdir)
    assert_params_equal(params, reference_run["params"])


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
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
        train_lib.train_and_evaluate(config, workdir)
    assert "model.num_layers: checkpoint 2, config 1" in str(e.value)
    assert "model.mlp_dim: checkpoint 128, config 64" in str(e.value)
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="optim.grad_accum: checkpoint 1"):
        train_lib.train_and_evaluate(tiny_config(text_file, optim__grad_accum=2), workdir)


def test_resume_allows_safe_changes(text_file, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=5), workdir)
    changes = ckpt_lib.check_resume_config(
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


def test_load_params_for_sampling_matches_trained(text_file, tmp_path):
    workdir = str(tmp_path / "w")
    result = train_lib.train_and_evaluate(tiny_config(text_file, train__num_steps=6,
                                                      train__keep_best=True), workdir)
    for path in (workdir, os.path.join(workdir, "checkpoints"),
                 os.path.join(workdir, "checkpoints", "6")):
        params, mcfg, tokenizer = ckpt_lib.load_params(path)
        assert mcfg == result["model_config"]
        assert tokenizer.encode("to be or not") == result["tokenizer"].encode("to be or not")
        tokens = np.asarray([tokenizer.encode("whether tis nobler in the mind")], np.int32)
        model = model_lib.Transformer(mcfg)
        np.testing.assert_array_equal(
            model.apply({"params": params}, tokens),
            model.apply({"params": result["state"].params}, tokens))
    # A params-only export (no optimizer state) loads the same way, from anywhere.
    exported = ckpt_lib.export_params(str(tmp_path / "export"), params, mcfg, tokenizer)
    assert not os.path.exists(os.path.join(exported, "train_state"))
    assert_params_equal(ckpt_lib.load_params(exported)[0], result["state"].params)
    try:
        from lmjax import sample as sample_lib
    except ImportError:
        return
    sampling = sample_lib.SamplingConfig(max_new_tokens=8, temperature=0.8)
    assert (sample_lib.sample_text(params, mcfg, tokenizer, ["to be"], sampling, 0)
            == sample_lib.sample_text(result["state"].params, mcfg, result["tokenizer"],
                                      ["to be"], sampling, 0))


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
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
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
    mcfg = train_lib.model_config(config, vocab_size=20)
    tx, _ = train_lib.make_optimizer(config.optim, 10)
    return config, mcfg, tx, train_lib.create_train_state(mcfg, tx, jax.random.key(0))


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

    from orbax.checkpoint._src.serialization import jax_array_handlers

    async def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jax_array_handlers.ArrayHandler, "serialize", disk_full)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt.save(state, step=2, micro_step=0, **kw)  # keep=1: step 1 is due for deletion
        ckpt.wait()
    assert "step 2" in str(e.value) and "No space left" in str(e.value)
    assert "intact: steps [1]" in str(e.value)
    monkeypatch.undo()
    assert ckpt_lib._steps_in(ckpt.directory) == [1]
    restored, meta = ckpt_lib.Checkpointer(str(tmp_path)).restore(
        1, train_lib.abstract_train_state(mcfg, tx))
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
    abstract = train_lib.abstract_train_state(mcfg, tx)
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
