"""Training: loss against NumPy, the optimizer's schedule and mask, learning, determinism, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import run_config
from lmjax import safety
from lmjax import train
from lmjax import steps as steps_lib
from lmjax.config import default_config


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    loss_sum, count = steps_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(loss_sum, (nll * mask).sum(), rtol=1e-5)
    assert count == mask.sum()


def test_loss_fn_ignores_masked_positions(tiny_config):
    config = tiny_config()
    mcfg = run_config.model_config(config, vocab_size=40)
    params = train.model_lib.init_params(mcfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 40, (2, 8)), "targets": rng.integers(0, 40, (2, 8)),
             "mask": np.ones((2, 8), np.float32)}
    masked = dict(batch, mask=batch["mask"].copy(), targets=batch["targets"].copy())
    masked["mask"][:, 5:] = 0
    masked["targets"][:, 5:] = 0  # garbage under the mask must not matter
    logits = np.asarray(train.model_lib.Transformer(mcfg).apply({"params": params},
                                                               batch["inputs"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # NumPy log-softmax
    expected = -np.mean(np.take_along_axis(log_probs, batch["targets"][..., None], -1)[:, :5])
    np.testing.assert_allclose(steps_lib.loss_fn(params, masked, mcfg), expected, rtol=1e-5)


def test_schedule_and_weight_decay_mask():
    optim = default_config().optim
    optim.update(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, weight_decay=0.5)
    tx, schedule = steps_lib.make_optimizer(optim, num_steps=100)
    assert schedule(0) == 0.0
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(55), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # cosine mid
    np.testing.assert_allclose(schedule(100), 1e-4, rtol=1e-6)
    # With zero gradients only decayed parameters move: matrices yes, biases and norms no.
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4), "scale": jnp.ones(4)}
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(11):
        updates, state = tx.update(zeros, state, params)
    assert np.all(np.asarray(updates["kernel"]) < 0)
    assert np.all(np.asarray(updates["bias"]) == 0) and np.all(np.asarray(updates["scale"]) == 0)


def test_gradient_accumulation_averages_micro_batches():
    optim = default_config().optim
    # eps=1: Adam's step then depends on the gradient's scale (a sum would not pass for a mean).
    optim.update(grad_accum=2, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, eps=1.0)
    tx, schedule = steps_lib.make_optimizer(optim, num_steps=10)
    params = {"w": jnp.arange(4.0)}
    g1, g2 = {"w": jnp.array([1.0, -2.0, 3.0, 0.5])}, {"w": jnp.array([3.0, 0.0, -1.0, 0.5])}
    state = tx.init(params)
    updates, state = tx.update(g1, state, params)
    assert np.all(np.asarray(updates["w"]) == 0)  # first micro-step: no update yet
    updates, state = tx.update(g2, state, params)
    # NumPy: Adam's first step on the mean gradient g (bias-corrected moments g and g**2), at
    # the schedule's first learning rate.
    g = (np.asarray(g1["w"], np.float64) + np.asarray(g2["w"], np.float64)) / 2
    assert schedule(0) == np.float32(optim.learning_rate)  # no warmup
    expected = -optim.learning_rate * g / (np.abs(g) + optim.eps)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clips", "passes"])
def test_clip_by_global_norm_matches_optax(max_norm):
    import optax
    grads = {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]]), "b": jnp.array([0.5, -1.5])}
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    ours, reference = steps_lib.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    clipped, state = ours.update(grads, ours.init(grads))
    expected, _ = reference.update(grads, reference.init(grads))
    assert jax.tree.structure(state) == jax.tree.structure(reference.init(grads))
    for name in grads:
        np.testing.assert_allclose(clipped[name], expected[name], rtol=1e-6)
        np.testing.assert_allclose(clipped[name], np.asarray(grads[name]) * min(1, max_norm / norm),
                                   rtol=1e-6)


def test_training_lowers_loss(tmp_path, tiny_config):
    result = train.train_and_evaluate(tiny_config(), str(tmp_path / "a"))
    losses = result["train_loss"]
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0  # a repetitive corpus is learnable
    assert [e["step"] for e in result["eval"]] == [20, 40]
    assert result["eval"][-1]["loss"] < result["eval"][0]["loss"]
    np.testing.assert_allclose(result["eval"][-1]["perplexity"], np.exp(result["eval"][-1]["loss"]))
    assert (tmp_path / "a" / "tensorboard").is_dir() and any((tmp_path / "a" / "tensorboard").iterdir())


@pytest.mark.slow  # two more runs; test_checkpoint's resume tests compare separate runs bit for bit
def test_training_is_a_function_of_the_seeds(tmp_path, tiny_config):
    config = tiny_config(num_steps=10, eval_every=0)
    first = train.train_and_evaluate(config, str(tmp_path / "a"))["train_loss"]
    again = train.train_and_evaluate(config, str(tmp_path / "b"))["train_loss"]
    np.testing.assert_array_equal(again, first)  # same seeds, same curve
    config.data.seed = 1
    other = train.train_and_evaluate(config, str(tmp_path / "c"))["train_loss"]
    assert other[0] != first[0]  # other batches from the first step on


def test_train_steps_scan_matches_train_step(tiny_config):
    """`train_steps` (n micro-steps under lax.scan, steps_per_call > 1) gives the losses and
    parameters of n `train_step` calls: dropout keyed by the step, accumulation across calls."""
    config = tiny_config()
    config.model.dropout = 0.1
    config.optim.update(grad_accum=2, warmup_steps=0)  # the first update at the peak rate
    mcfg = run_config.model_config(config, vocab_size=40)
    tx, _ = steps_lib.make_optimizer(config.optim, num_steps=10)
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.integers(0, 40, (4, 16)).astype(np.int32),
                "targets": rng.integers(0, 40, (4, 16)).astype(np.int32),
                "mask": np.ones((4, 16), np.float32)} for _ in range(3)]
    one = jax.jit(functools.partial(steps_lib.train_step, config=mcfg, tx=tx))
    scan = jax.jit(functools.partial(steps_lib.train_steps, config=mcfg, tx=tx))
    state = jax.jit(functools.partial(steps_lib.create_train_state, mcfg, tx))(jax.random.key(0))
    stepped, losses = state, []
    for batch in batches:
        stepped, metrics = one(stepped, batch)
        losses.append(float(metrics["loss"]))
    scanned, metrics = scan(state, {k: np.stack([b[k] for b in batches]) for k in batches[0]})
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-6)
    assert len(set(losses)) == 3 and int(scanned.step) == int(stepped.step) == 3
    for a, b in zip(jax.tree.leaves((scanned.params, scanned.opt_state)),
                    jax.tree.leaves((stepped.params, stepped.opt_state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(scanned.params), jax.tree.leaves(state.params))]
    assert max(moved) > 1e-4  # the second micro-step applied an update (the third is pending)


@pytest.mark.slow  # test_train_steps_scan_matches_train_step is the fast version
def test_steps_per_call_matches_one_step_per_call(tmp_path, tiny_config):
    """Several micro-steps per jitted call (lax.scan) give the same run as one per call: the
    same losses and parameters, with calls cut where an evaluation is due (20 is not a multiple
    of 3) and dropout keyed by the step."""
    config = tiny_config(num_steps=26, eval_every=20)
    config.model.dropout = 0.1
    config.optim.grad_accum = 2
    one = train.train_and_evaluate(config, str(tmp_path / "one"))
    config.train.steps_per_call = 3
    three = train.train_and_evaluate(config, str(tmp_path / "three"))
    assert len(three["train_loss"]) == 52
    np.testing.assert_allclose(three["train_loss"], one["train_loss"], rtol=1e-6, atol=0)
    assert [e["step"] for e in three["eval"]] == [e["step"] for e in one["eval"]]
    for a, b in zip(jax.tree.leaves(three["state"].params), jax.tree.leaves(one["state"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resumed_history_keeps_eval_perplexity(tmp_path, tiny_config):
    """A run extended in the same workdir returns the evaluations read back from metrics.jsonl
    with the same fields (loss, perplexity, tokens) as the new ones."""
    config = tiny_config(num_steps=20, eval_every=10)
    first = train.train_and_evaluate(config, str(tmp_path / "w"))
    config.train.num_steps = 30
    extended = train.train_and_evaluate(config, str(tmp_path / "w"))
    assert [e["step"] for e in extended["eval"]] == [10, 20, 30]
    assert extended["eval"][:2] == first["eval"]
    for entry in extended["eval"]:
        assert set(entry) == {"step", "loss", "perplexity", "tokens"}
        np.testing.assert_allclose(entry["perplexity"], np.exp(entry["loss"]), rtol=1e-6)


@pytest.mark.slow  # a smoke test: bf16 is tested in test_model, accumulation above
def test_dropout_bf16_and_accumulation_train(tmp_path, tiny_config):
    config = tiny_config(num_steps=6, eval_every=0)
    config.model.update(dropout=0.1, dtype="bfloat16")
    config.optim.grad_accum = 2
    result = train.train_and_evaluate(config, str(tmp_path / "w"))
    assert len(result["train_loss"]) == 12 and np.all(np.isfinite(result["train_loss"]))
    assert int(result["state"].step) == 12


@pytest.mark.parametrize("change, message", [
    (lambda c: c.data.__setitem__("seq_len", 64), r"data.seq_len=64 .* model.max_len=32"),
    (lambda c: c.model.__setitem__("num_heads", 3), "model.num_heads=3 must divide"),
    (lambda c: c.model.update(num_kv_heads=3, num_heads=4), "model.num_kv_heads=3 must divide"),
    (lambda c: c.data.__setitem__("train_files", "/nonexistent/*.txt"), "data.train_files"),
    (lambda c: c.train.__setitem__("num_step", 3), r"unknown config keys \['train.num_step'\]"),
    (lambda c: c.optim.__setitem__("warmup_steps", 500), "optim.warmup_steps=500"),
])
def test_bad_config_fails_before_compute(tmp_path, monkeypatch, change, message, tiny_config):
    config = tiny_config()
    change(config)
    monkeypatch.setattr(steps_lib, "create_train_state", lambda *a: pytest.fail("computed anyway"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.train_and_evaluate(config, str(tmp_path / "w"))


def test_empty_corpus_is_an_error(tmp_path, tiny_config):
    config = tiny_config()
    (tmp_path / "corpus.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        train.train_and_evaluate(config, str(tmp_path / "w"))


# ----------------------------------------------------------------------------- non-finite guard


def _nan_batch_at(monkeypatch, bad_step):
    """Training batch `bad_step` gets a NaN in its mask (so a NaN loss and gradients)."""
    from lmjax import data as data_lib
    batch = data_lib.Batches.batch

    def poisoned(self, step):
        out = batch(self, step)
        if self.shuffle and step == bad_step:
            out = dict(out, mask=out["mask"].copy())
            out["mask"][0, 0] = np.nan
        return out
    monkeypatch.setattr(data_lib.Batches, "batch", poisoned)


def _saved_steps(workdir):
    from lmjax import checkpoint as ckpt_lib
    return ckpt_lib._steps_in(ckpt_lib.checkpoint_dir(str(workdir)))


def test_exploding_learning_rate_stops_the_run(tmp_path, tiny_config):
    """lr 1e38: step 1's update makes the params ~1e38 (finite), step 2's logits overflow. The
    run stops with the step, the values and the last good checkpoint; nothing NaN is saved."""
    config = tiny_config(num_steps=6, checkpoint_every=1, eval_every=0, log_every=1)
    config.optim.update(learning_rate=1e38, min_learning_rate=0.0, warmup_steps=0,
                        weight_decay=0.0, grad_clip=0.0)
    with pytest.raises(safety.NonFiniteLossError) as e:
        train.train_and_evaluate(config, str(tmp_path / "w"))
    message = str(e.value)
    assert message.startswith("step 2: loss=") and "is not finite" in message
    assert f"Last good checkpoint: step 1 in {tmp_path / 'w' / 'checkpoints' / '1'}" in message
    assert _saved_steps(tmp_path / "w") == [1]
    assert not (tmp_path / "w" / "lmjax.lock").exists()  # released on the error


def test_nan_batch_stops_or_is_skipped(tmp_path, tiny_config, monkeypatch):
    _nan_batch_at(monkeypatch, 7)
    config = tiny_config(num_steps=12, checkpoint_every=4, eval_every=0, log_every=12)
    with pytest.raises(safety.NonFiniteLossError, match=r"^step 8: loss=nan .* Last good "
                                                       r"checkpoint: step 4 in "):
        train.train_and_evaluate(config, str(tmp_path / "stop"))
    assert _saved_steps(tmp_path / "stop") == [4]  # step 8's save never happened

    config.optim.skip_nonfinite = True
    result = train.train_and_evaluate(config, str(tmp_path / "skip"))
    assert result["skipped_steps"] == [7] and np.isnan(result["train_loss"][7])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result["state"].params))
    assert _saved_steps(tmp_path / "skip") == [4, 8, 12]
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        assert ['"skipped": true' in line for line in f if "micro_step" in line] == [
            k == 7 for k in range(12)]


def test_skip_nonfinite_step_leaves_state_unchanged(tiny_config):
    config = tiny_config()
    mcfg = run_config.model_config(config, vocab_size=40)
    tx, _ = steps_lib.make_optimizer(config.optim, num_steps=10)
    step = jax.jit(functools.partial(steps_lib.train_step, config=mcfg, tx=tx, skip_nonfinite=True))
    state = jax.jit(functools.partial(steps_lib.create_train_state, mcfg, tx))(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 40, (4, 16)).astype(np.int32),
             "targets": rng.integers(0, 40, (4, 16)).astype(np.int32),
             "mask": np.ones((4, 16), np.float32)}
    good, metrics = step(state, batch)
    assert int(metrics["skipped"]) == 0
    bad_batch = dict(batch, mask=batch["mask"].copy())
    bad_batch["mask"][1, 2] = np.inf
    after, metrics = step(good, bad_batch)
    assert int(metrics["skipped"]) == 1 and int(after.step) == 2
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                    jax.tree.leaves((good.params, good.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
