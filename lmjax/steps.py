"""The jitted pieces of maximum-likelihood training: `TrainState`, Optax AdamW, the loss,
`train_step` (and `n` of them under one `lax.scan`), their jit with shardings, `evaluate`.

Shape letters: B batch, L sequence length, V vocab size.

They are pure functions of explicit state (`TrainState`: step, params, opt_state, rng), so a
notebook can call them one by one; train.py's `train_and_evaluate` strings them together.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Any, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmjax import checkpoint as checkpoint_lib
from lmjax import encoder as encoder_lib
from lmjax import lora as lora_lib
from lmjax import model as model_lib
from lmjax import sharding as sharding_lib
from lmjax.config import ModelConfig
# inputs int32[B, L], targets int32[B, L], mask float32[B, L]; packed documents (data.packing)
# also segment_ids, positions int32[B, L]
Batch = dict[str, np.ndarray]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training. A pytree: it is what a checkpoint holds."""

    step: jax.Array  # micro-steps taken (= optimizer steps when optim.grad_accum == 1)
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so resume needs no RNG replay
    # LoRA (lmjax/lora.py): the frozen base, with `params` the adapters alone (so gradients,
    # optimizer state and checkpoints cover only them); None when every weight trains.
    frozen: Any = None


# ----------------------------------------------------------------------------- optimizer


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` as one scalar factor: g * min(1, max_norm / ||g||).

    The same clipping (to rounding) and the same empty state. optax picks between g and
    g / ||g|| * max_norm element by element, and XLA's CPU compiler then wrote a clipped copy of
    every gradient to memory before Adam read both again; a scalar factor fuses into Adam's
    moment updates instead.
    """
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   weight_decay: float | None = None):
    """AdamW with linear warmup + cosine decay to a floor, global-norm clipping, decay on matrices.

    weight_decay: in place of `optim.weight_decay` (`run_optimizer`: a LoRA run's
    `lora.weight_decay`). Returns (optax transformation, learning-rate schedule over optimizer
    steps).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
        decay_steps=max(optim.decay_steps or num_steps, optim.warmup_steps + 1),
        end_value=optim.min_learning_rate)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay if weight_decay is None else weight_decay,
                    mask=decay_mask))
    if optim.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum)
    return tx, schedule


def run_optimizer(config: ml_collections.ConfigDict):
    """`make_optimizer` as an experiment config asks: `optim`, over `train.num_steps`, with a
    LoRA run's adapters decayed by `lora.weight_decay` (0 by default, as PEFT's users get from
    Hugging Face's Trainer) instead of `optim.weight_decay`."""
    weight_decay = config.lora.weight_decay if config.lora.rank else None
    return make_optimizer(config.optim, config.train.num_steps, weight_decay)


def _boxed_train_state(config: ModelConfig, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    params = encoder_lib.init_boxed_params(config, init_rng)  # leaves carry logical axis names
    frozen = None
    if config.lora_rank:  # LoRA: the optimizer sees the adapters only
        frozen, params = model_lib.split_adapters(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=train_rng, frozen=frozen)


def create_train_state(config: ModelConfig, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    """Fresh parameters and optimizer state. Under `jax.jit(..., out_shardings=
    state_shardings(...))` every array is created directly in its sharded layout."""
    return nn.unbox(_boxed_train_state(config, tx, rng))


def abstract_train_state(config: ModelConfig, tx: optax.GradientTransformation, sharding=None):
    """What `Checkpointer.restore` needs: the TrainState's shapes, placed by `sharding` (one
    Sharding, a TrainState of them as `state_shardings` returns, or None: the default device)."""
    shapes = jax.eval_shape(lambda: create_train_state(config, tx, jax.random.key(0)))
    return checkpoint_lib.restore_target(shapes, sharding)


def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh,
                    axis_rules) -> TrainState:
    """A TrainState of NamedShardings: optimizer moments follow their parameters' logical axes."""
    abstract = jax.eval_shape(functools.partial(_boxed_train_state, config, tx), jax.random.key(0))
    return sharding_lib.logical_to_sharding(nn.get_partition_spec(abstract), mesh, axis_rules)


# ----------------------------------------------------------------------------- loss and steps


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token-level cross-entropy over unmasked targets, and the number of such targets."""
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL)
    mask_BxL = mask_BxL.astype(jnp.float32)
    return jnp.sum(losses_BxL * mask_BxL), jnp.sum(mask_BxL)


def packed_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The model's keyword arguments for a batch's packed documents (none for plain rows)."""
    if "segment_ids" not in batch:
        return {}
    return {"positions_BxL": batch["positions"], "segment_ids_BxL": batch["segment_ids"]}


def loss_fn(params, batch: Batch, config: ModelConfig, dropout_rng: jax.Array | None = None):
    """Mean cross-entropy of a batch (dropout on when `dropout_rng` is given)."""
    logits_BxLxV = model_lib.Transformer(config).apply(
        {"params": params}, batch["inputs"], deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng}, **packed_inputs(batch))
    loss_sum, count = cross_entropy(logits_BxLxV, batch["targets"], batch["mask"])
    return loss_sum / jnp.maximum(count, 1.0)


def train_step(state: TrainState, batch: Batch, *, config: ModelConfig,
               tx: optax.GradientTransformation, skip_nonfinite: bool = False,
               objective=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One (micro-)step: gradients of the mean loss, then the optimizer update.

    objective: None is the causal LM (`loss_fn`); an encoder's (`objectives.for_run`) gives
    the loss and more metrics (its random masks from fold_in(state.rng, state.step)).

    skip_nonfinite (`optim.skip_nonfinite`): where the loss or the gradient norm is NaN or
    infinite, params and optimizer state stay as they were (the batch is passed over) and
    `metrics['skipped']` is 1. (optax.apply_if_finite checks the gradients only and changes the
    optimizer-state tree, so checkpoints of the two settings could not resume each other.)
    """
    use_dropout = config.dropout > 0 or (config.lora_rank and config.lora_dropout > 0)
    dropout_rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    # A LoRA run differentiates its adapters only (state.params), the base frozen beside them.
    full = lambda trainable: lora_lib.combine(state.frozen, trainable)
    extra = {}
    if objective is None:
        loss, grads = jax.value_and_grad(lambda p: loss_fn(full(p), batch, config, dropout_rng))(
            state.params)
    else:
        objective_rng = jax.random.fold_in(state.rng, state.step)
        (loss, extra), grads = jax.value_and_grad(
            lambda p: objective.loss(full(p), batch, config, objective_rng, dropout_rng),
            has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **extra}
    if skip_nonfinite:
        ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics["skipped"] = jnp.logical_not(ok).astype(jnp.int32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_steps(state: TrainState, batches: Batch, *, config: ModelConfig,
                tx: optax.GradientTransformation, skip_nonfinite: bool = False,
                objective=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """`n` micro-steps in one call: `train_step` under `lax.scan` over batches stacked `[n, B, L]`
    (`train.steps_per_call`: fewer dispatches for small models). Metrics come back stacked `[n]`."""
    return jax.lax.scan(functools.partial(train_step, config=config, tx=tx,
                                          skip_nonfinite=skip_nonfinite, objective=objective),
                        state, batches)


def jit_train_step(config: ModelConfig, tx: optax.GradientTransformation, state_sh: TrainState,
                   batch_sh, steps_per_call: int = 1, skip_nonfinite: bool = False,
                   objective=None):
    """The training call as `train_and_evaluate` jits it (shardings, donated state).

    steps_per_call 1: `(state, batch) -> (state, metrics)`; above 1: `train_steps`, whose batches
    are stacked `[n, B, L]` (`put_batches`) with `n <= steps_per_call` (one compile per n).
    """
    if steps_per_call == 1:
        fn, in_batch_sh = train_step, batch_sh
    else:
        fn, in_batch_sh = train_steps, stacked_batch_sharding(batch_sh)
    return jax.jit(functools.partial(fn, config=config, tx=tx, skip_nonfinite=skip_nonfinite,
                                     objective=objective),
                   in_shardings=(state_sh, in_batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)


def stacked_batch_sharding(batch_sh: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """Batches stacked `[n, B, L]`: the sharding of each `[B, L]` batch, the stack replicated."""
    spec = jax.sharding.PartitionSpec(None, *batch_sh.spec)
    return jax.sharding.NamedSharding(batch_sh.mesh, spec)


def put_batches(batches: list[Batch],
                batch_sh: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Global host batches as one stacked `[n, B, L]` array per key; each process contributes its
    own rows (as `sharding.put_batch` does for one batch)."""
    stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
    return sharding_lib.put_batch(stacked, stacked_batch_sharding(batch_sh), batch_axis=1)


def eval_step(params, batch: Batch, *, config: ModelConfig, objective=None):
    """Summed loss and token count of a validation batch (no dropout); an encoder's objective
    adds a dict of sums for its metrics."""
    if objective is not None:
        return objective.eval_sums(params, batch, config)
    logits_BxLxV = model_lib.Transformer(config).apply({"params": params}, batch["inputs"],
                                                       **packed_inputs(batch))
    return cross_entropy(logits_BxLxV, batch["targets"], batch["mask"])


EVAL_AHEAD = 8  # evaluation batches dispatched before the oldest one's sums are fetched


def evaluate(eval_fn, params, batches: Iterable[Batch], objective=None) -> dict[str, float]:
    """Token-weighted validation loss and perplexity over `batches` (+ the objective's metrics
    from the sums its eval_fn returns)."""
    # Up to EVAL_AHEAD batches in flight: fetching each batch's sums at once kept the host from
    # preparing the next batch while the device computed. The sums are the same floats.
    in_flight, outputs = collections.deque(), []
    for batch in batches:
        in_flight.append(eval_fn(params, batch))
        if len(in_flight) > EVAL_AHEAD:
            outputs.append(jax.device_get(in_flight.popleft()))
    outputs.extend(jax.device_get(list(in_flight)))
    total, count, sums = 0.0, 0.0, {}
    for loss_sum, n, *extra in outputs:
        total, count = total + float(loss_sum), count + float(n)
        for name, value in (extra[0] if extra else {}).items():
            sums[name] = sums.get(name, 0) + np.asarray(value)
    loss = total / max(count, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    return result if objective is None else {**result, **objective.finalize(sums, count)}
