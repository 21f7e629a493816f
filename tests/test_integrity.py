"""Checkpoint integrity: bytes changed inside real saved files (params, optimizer state, JSON
metadata, Orbax's metadata), an empty step folder and a silently swapped array are all found at
restore, set aside (never deleted) and the newest verified step is used; a non-finite state is
never written; the digest matches a NumPy reference."""
import functools
import hashlib
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import integrity
from lmjax import run_config
from lmjax import steps as steps_lib
from lmjax.config import default_config
from lmjax.tokenizers import ByteTokenizer

STEPS = (1, 2, 3)


def _state(seed=0):
    config = default_config()
    config.model.update(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=32)
    mcfg = run_config.model_config(config, vocab_size=20)
    tx, _ = steps_lib.make_optimizer(config.optim, 10)
    create = jax.jit(functools.partial(steps_lib.create_train_state, mcfg, tx))
    return config, mcfg, tx, create(jax.random.key(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with steps 1, 2, 3 (different params each), saved once for every test."""
    workdir = str(tmp_path_factory.mktemp("saved") / "w")
    config, mcfg, tx, state = _state()
    ckpt = ckpt_lib.Checkpointer(workdir, keep=3)
    states = {}
    for step in STEPS:
        moved = lambda x, s=step: x + s * jnp.cos(jnp.arange(x.size).reshape(x.shape)) if (
            jnp.issubdtype(x.dtype, jnp.floating)) else x  # data in every array, per step
        state = state.replace(params=jax.tree.map(moved, state.params),
                              opt_state=jax.tree.map(moved, state.opt_state),
                              step=jnp.asarray(step, jnp.int32))
        ckpt.save(state, step=step, micro_step=step, config=config, model_config=mcfg,
                  tokenizer=ByteTokenizer())
        states[step] = state
    ckpt.close()
    return {"workdir": workdir, "mcfg": mcfg, "tx": tx, "states": states}


@pytest.fixture
def workdir(saved, tmp_path):
    copy = str(tmp_path / "w")
    shutil.copytree(saved["workdir"], copy)
    return copy


def _files(step_dir, item, data=True):
    """Files of an item of a step folder: the array chunks (OCDBT 'd/' files) or the rest."""
    found = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, item)) for f in fs]
    return sorted(f for f in found if (f"{os.sep}d{os.sep}" in f) == data)


def _flip_bytes(path, n=256, seed=0):
    """XORs n random bytes in the middle half of the file with a random non-zero value."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for offset in sorted(rng.sample(range(size // 4, max(3 * size // 4, size // 4 + n)), n)):
            if offset >= size:
                continue
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ rng.randrange(1, 256)]))


def _restore_latest(saved, workdir):
    ckpt = ckpt_lib.Checkpointer(workdir)
    try:
        return ckpt.restore_latest(steps_lib.abstract_train_state(saved["mcfg"], saved["tx"]))
    finally:
        ckpt.close()


def _assert_fell_back(saved, workdir, restored, out, bad_step=3, good_step=2, names=()):
    state, meta = restored
    assert meta["step"] == good_step
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((saved["states"][good_step].params,
                                     saved["states"][good_step].opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert f"checkpoint step {bad_step} is corrupt or incomplete" in out
    for name in names:
        assert name in out, out
    aside = os.listdir(os.path.join(workdir, ckpt_lib.CORRUPT_DIR))
    assert len(aside) == 1 and aside[0].startswith(f"{bad_step}-")  # kept, not deleted
    assert ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir)) == [
        s for s in STEPS if s != bad_step]


@pytest.mark.parametrize("item, data", [("params", True), ("train_state", True),
                                        ("params", False), ("meta", False)],
                         ids=["params-array", "opt-state-array", "params-orbax-metadata",
                              "meta-json"])
def test_flipped_bytes_are_found_and_set_aside(saved, workdir, capsys, item, data):
    step_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), "3")
    target = max(_files(step_dir, item, data), key=os.path.getsize)
    print(f"flipping 256 bytes of {os.path.relpath(target, step_dir)}")
    _flip_bytes(target)
    restored = _restore_latest(saved, workdir)
    _assert_fell_back(saved, workdir, restored, capsys.readouterr().out)


def test_changed_json_value_is_found_by_its_checksum(saved, workdir, capsys):
    """A JSON item edited into other valid JSON (Orbax reads it happily)."""
    path, = [f for f in _files(os.path.join(ckpt_lib.checkpoint_dir(workdir), "3"), "meta", False)
             if "_METADATA" not in f and os.path.basename(f) == "metadata"] or [None]
    if path is None:  # the JSON handler's file name differs between Orbax versions
        path = max(_files(os.path.join(ckpt_lib.checkpoint_dir(workdir), "3"), "meta", False),
                   key=os.path.getsize)
    text = open(path).read()
    assert '"periodic"' in text
    open(path, "w").write(text.replace('"periodic"', '"periodix"'))
    restored = _restore_latest(saved, workdir)
    _assert_fell_back(saved, workdir, restored, capsys.readouterr().out,
                      names=["JSON item 'meta' does not match its checksum"])


def test_swapped_array_is_named(saved, workdir, capsys):
    """Step 3's params replaced by step 1's: valid files that Orbax reads without complaint, so
    only the checksums see it; the warning names the first array that differs."""
    cdir = ckpt_lib.checkpoint_dir(workdir)
    shutil.rmtree(os.path.join(cdir, "3", "params"))
    shutil.copytree(os.path.join(cdir, "1", "params"), os.path.join(cdir, "3", "params"))
    restored = _restore_latest(saved, workdir)
    first = sorted(integrity._by_name({"params": saved["states"][3].params}))[0]
    _assert_fell_back(saved, workdir, restored, capsys.readouterr().out,
                      names=[f"array {first} does not match its checksum"])


def test_empty_step_folder_is_set_aside(saved, workdir, capsys):
    step_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), "3")
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    restored = _restore_latest(saved, workdir)
    _assert_fell_back(saved, workdir, restored, capsys.readouterr().out)


def test_load_params_falls_back_without_moving(saved, workdir, capsys):
    """What the sample launcher reads: the newest verified step; the bad one stays in place."""
    step_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), "3")
    _flip_bytes(max(_files(step_dir, "params"), key=os.path.getsize))
    params, _, _ = ckpt_lib.load_params(workdir)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved["states"][2].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "checkpoint step 3 is corrupt or incomplete" in capsys.readouterr().err
    assert os.path.isdir(step_dir)
    with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint"):
        ckpt_lib.load_params(workdir, step=3)  # asked for by number: an error, no fallback


def test_nonfinite_state_is_never_written(saved, workdir):
    config, mcfg, _, state = _state()
    bad = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan),
                                            state.params))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=1)
    with pytest.raises(ckpt_lib.NonFiniteError, match="not saving step 4"):
        ckpt.save(bad, step=4, micro_step=4, config=config, model_config=mcfg,
                  tokenizer=ByteTokenizer())
    ckpt.close()
    assert ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(workdir)) == list(STEPS)  # none deleted


def _numpy_digest(x: np.ndarray) -> str:
    """The checkpoint digest recomputed in NumPy (uint32 arithmetic wraps the same way)."""
    def fmix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))
    bits = np.ascontiguousarray(x).view(np.uint32).reshape(-1)
    index = np.arange(bits.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = fmix(bits ^ (index * np.uint32(0x9E3779B1)))
        sums = [np.sum(h, dtype=np.uint32),
                np.sum(h * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32)]
    return "".join(f"{int(s):08x}" for s in sums)


def test_digest_matches_numpy_and_sees_one_bit():
    x = np.random.default_rng(0).normal(size=(37, 11)).astype(np.float32)
    checksums, nonfinite = integrity.array_checksums({"a": {"x": jnp.asarray(x)}})
    assert checksums == {"a/x": _numpy_digest(x)} and not nonfinite
    y = x.copy()
    y.view(np.uint32)[5, 3] ^= 1  # one bit
    assert integrity.array_checksums({"a": {"x": jnp.asarray(y)}})[0]["a/x"] != checksums["a/x"]
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    assert integrity.array_checksums({"a": {"x": jnp.asarray(swapped)}})[0]["a/x"] != (
        checksums["a/x"])
    assert integrity.json_checksum({"b": 1, "a": [2]}) == hashlib.sha256(
        b'{"a": [2], "b": 1}').hexdigest()
