"""Maximum-likelihood training: Optax AdamW, one jitted train step, periodic evaluation.

Shape letters: B batch, L sequence length, V vocab size.

The pieces are pure functions of explicit state (`TrainState`: step, params, opt_state, rng), so a
notebook can call them one by one; `train_and_evaluate(config, workdir)` strings them together.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from lmjax import checkpoint as checkpoint_lib
from lmjax import data as data_lib
from lmjax import encoder as encoder_lib
from lmjax import hf
from lmjax import hf_bert
from lmjax import labelled as labelled_lib
from lmjax import lock as lock_lib
from lmjax import lora as lora_lib
from lmjax import metrics as metrics_lib
from lmjax import model as model_lib
from lmjax import objectives as objectives_lib
from lmjax import run_config
from lmjax import safety
from lmjax import sample as sample_lib
from lmjax import sharding as sharding_lib
from lmjax import tokenizers as tokenizers_lib
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


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains a model as `config` says, logging to stdout and TensorBoard under `workdir`.

    Checkpoints go to `workdir/checkpoints` (see lmjax.checkpoint); re-running with the same
    workdir resumes from the newest good one, bit-exactly (batch k depends only on (data.seed, k),
    dropout on fold_in(rng, step)). `config.init_from` starts from another run's params with a
    fresh optimizer. Every micro-step's loss goes to `workdir/metrics.jsonl`.

    On SIGTERM the loop finishes the steps in flight (the host is at most
    `safety.MAX_CALLS_AHEAD` calls ahead of the device), saves a checkpoint at that step, waits
    for it, prints where to resume and returns normally (`result['preempted'] = True`; the
    launcher then exits with code 0). A NaN/inf loss or gradient norm raises
    `safety.NonFiniteLossError` naming the step and the last good checkpoint
    (`optim.skip_nonfinite=True`: such steps are passed over and counted instead).
    The workdir is locked for the run (`lmjax.lock`): a second run on it fails at once.

    Returns the final state and metrics: {'state', 'train_loss', 'eval', 'samples', 'seconds',
    ...}; 'seconds' says where the wall time went: compile (the first training call), train,
    eval, save (checkpoints' synchronous part), other (data, initialisation, samples), total.
    Each step below is a public function a notebook can call on its own.
    """
    config = run_config.prepare_config(config)
    checkpoint_lib.check_writable(workdir)  # before any compute: a clear error
    # One writer per workdir, taken before the Checkpointer (which cleans up Orbax's temporary
    # folders: another run's save in flight). Process 0 holds it for a multi-host run.
    workdir_lock = lock_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0).acquire()
    preemption = safety.PreemptionWatcher()  # from the start: an early SIGTERM is not lost
    ckpt, finished = None, False
    try:
        ckpt = checkpoint_lib.Checkpointer(
            workdir, keep=config.train.keep_checkpoints, keep_best=config.train.keep_best,
            async_save=config.train.async_checkpoints)
        result = _train_and_evaluate(config, workdir, ckpt, preemption)
        finished = True
        return result
    finally:
        preemption.uninstall()
        try:
            if ckpt is not None:
                ckpt.close()  # waits for an asynchronous save in flight
        except Exception as e:  # noqa: BLE001 - never hides the error that got us here
            if finished:
                raise
            logging.error("closing the checkpointer after an error: %s", e)
        finally:
            workdir_lock.release()


def _train_and_evaluate(config, workdir: str, ckpt: checkpoint_lib.Checkpointer,
                        preemption: "safety.PreemptionWatcher") -> dict[str, Any]:
    """`train_and_evaluate` once the workdir is locked and its Checkpointer open."""
    start = time.perf_counter()
    init_from = check_workdir(config, workdir, ckpt)  # before any compute, too
    if config.model.head == "classifier":  # labelled examples (lmjax/labelled.py)
        data = labelled_lib.build_data(config, workdir)
    else:
        data = data_lib.build_data(_row_config(config), workdir, jax.process_index(),
                                   jax.process_count())
    run_config.check_sample_prompt(config, data.tokenizer)  # before compiling anything
    mcfg = run_config.model_config(config, data.tokenizer.vocab_size)
    if mcfg.lora_rank:  # every checkpoint names the exact base its adapters belong to
        config = config.copy_and_resolve_references()
        config.init_from = lora_base_reference(config, ckpt, init_from)
    _log_model_and_data(config, mcfg, data)
    mesh = sharding_lib.make_mesh(config.mesh)
    axis_rules = sharding_lib.rules(config.mesh, mcfg, mesh.shape)
    with jax.set_mesh(mesh):
        tx, schedule = run_optimizer(config)
        state_sh = state_shardings(mcfg, tx, mesh, axis_rules)
        state = initial_state(config, mcfg, tx, state_sh, ckpt, init_from)
        write_run_configs(workdir, config, mcfg)
        # Activation constraints follow the rules from here on (not during init: Flax's
        # DenseGeneral initialises a flattened kernel, which the rules do not fit).
        with nn.logical_axis_rules(axis_rules):
            state, history, preempted_at = train_loop(
                config, workdir, ckpt, data, mcfg, tx, schedule, state, state_sh, preemption)
            wait_start = time.perf_counter()
            ckpt.wait()  # the final (or preemption) checkpoint is on disk before we go on
            history["seconds"]["save"] += time.perf_counter() - wait_start
            samples = [] if preempted_at is not None else end_of_run_samples(
                config, lora_lib.combine(state.frozen, state.params), mcfg, data.tokenizer)
    _account_time(history["seconds"], time.perf_counter() - start)
    result = {"state": state, "model_config": mcfg, "tokenizer": data.tokenizer,
              "samples": samples, "preempted": preempted_at is not None, **history}
    if preempted_at is not None:
        logging.warning("Preempted (SIGTERM): checkpoint saved at step %d in %s. Re-run the "
                        "same command (same --workdir) to resume.", preempted_at,
                        ckpt.step_dir(preempted_at))
        return {**result, "step": preempted_at}
    for text in samples:
        print("-" * 40 + "\n" + text)
    return result


def _account_time(seconds: dict[str, float], total: float) -> None:
    """Adds 'total' and 'other' (data, initialisation, samples) to the loop's `seconds` and logs
    them: where a run's wall time went."""
    seconds.update(total=total, other=max(total - sum(seconds.values()), 0.0))
    logging.info("time: %s", ", ".join(f"{name} {value:.1f} s" for name, value in
                                       seconds.items()))


def _row_config(config):
    """The config whose data.seq_len is the token-store rows' length: data.seq_len - 2 for
    masked LM, whose rows gain [CLS] and [SEP] in the step (objectives.add_special_tokens)."""
    if config.model.architecture != "encoder" or config.model.head != "lm":
        return config
    if config.data.seq_len < 3:
        raise ValueError(f"data.seq_len={config.data.seq_len}: masked LM needs at least 3 "
                         "([CLS] token [SEP])")
    rows = config.copy_and_resolve_references()
    rows.data.seq_len = config.data.seq_len - 2
    return rows


def _resume_check(config: ml_collections.ConfigDict) -> Callable[[dict], None]:
    """`check(info)` for a checkpoint: raises for a config it cannot resume, logs the safe
    changes once per step."""
    logged = set()

    def check(info):
        changes = checkpoint_lib.check_resume_config(info["config"], info["model_config"], config)
        if changes and info["meta"]["step"] not in logged:
            logged.add(info["meta"]["step"])
            logging.info("config changes since checkpoint step %d (allowed): %s",
                         info["meta"]["step"], "; ".join(changes))
    return check


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  ckpt: checkpoint_lib.Checkpointer) -> dict | None:
    """Before any compute: the newest checkpoint in `workdir` must be resumable with `config`
    (IncompatibleCheckpointError otherwise). A fresh workdir with `init_from` (a run, not hf:)
    gets that run's tokenizer, so fine-tuning keeps its token ids; returns that run's checkpoint
    info (`checkpoint.read_checkpoint_info`), else None."""
    steps = ckpt.all_steps()
    if steps:
        try:
            info = ckpt.read_info(steps[-1])
        except checkpoint_lib.CheckpointError:
            info = None  # unreadable: restore_latest moves it aside and falls back
        if info is not None:
            _resume_check(config)(info)
        if config.init_from:
            logging.info("workdir has checkpoints: resuming, init_from=%s ignored",
                         config.init_from)
        return None
    if not config.init_from or config.init_from.startswith("hf:"):
        return None
    init_from = checkpoint_lib.read_checkpoint_info(config.init_from)
    if not tokenizers_lib.has_saved_tokenizer(workdir):
        checkpoint_lib.write_tokenizer_files(
            checkpoint_lib.read_tokenizer_item(init_from["step_dir"]), workdir)
    return init_from


def _log_model_and_data(config, mcfg: ModelConfig, data) -> None:
    """One line each: the model and data; the mesh's devices; a CPU speed hint where it helps."""
    logging.info("model: %s parameters, %.3g FLOPs/token; data: %d train / %d val tokens",
                 f"{encoder_lib.num_params(mcfg):,}",
                 model_lib.flops_per_token(mcfg, config.data.seq_len),
                 data.train_tokens, data.val_tokens)
    kinds = collections.Counter(d.device_kind for d in jax.devices())
    logging.info("devices: %s over %d process(es); mesh %s", dict(kinds), jax.process_count(),
                 sharding_lib.mesh_shape(config.mesh, jax.device_count()))
    if (jax.default_backend() == "cpu" and sys.platform == "linux"
            and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")):
        # XLA's CPU runtime allocates each step's temporaries afresh; glibc maps big blocks anew
        # each time, and with 4 KiB pages GPT-2 124M took ~477k page faults per step.
        logging.info("CPU hint: start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
                     "(transparent huge pages for large allocations): 7-10% faster steps")


def initial_state(config: ml_collections.ConfigDict, mcfg: ModelConfig,
                  tx: optax.GradientTransformation, state_sh: TrainState,
                  ckpt: checkpoint_lib.Checkpointer, init_from: dict | None) -> TrainState:
    """The state a run starts from, in its sharded layout: the newest good checkpoint of the
    workdir; else `config.init_from`'s params (a run's or an HF folder's) with a fresh optimizer;
    else fresh parameters from `config.seed`. Prints which."""
    restored = ckpt.restore_latest(abstract_train_state(mcfg, tx, state_sh),
                                   check=_resume_check(config))  # None: no verified step
    if restored is not None:
        state, meta = restored
        if mcfg.lora_rank:  # a LoRA checkpoint holds the adapters: the base is read again
            state = state.replace(frozen=lora_lib.load_base(config.init_from, mcfg, config.seed,
                                                            state_sh.frozen))
        message = (f"resuming from checkpoint step {meta['step']} (micro-step "
                   f"{meta['micro_step']}) in {ckpt.step_dir(meta['step'])}")
    elif mcfg.lora_rank:  # fresh adapters (and optimizer) on the frozen base
        adapters_only = jax.jit(  # XLA drops the unused random base
            lambda rng: create_train_state(mcfg, tx, rng).replace(frozen=None),
            out_shardings=state_sh.replace(frozen=None))
        state = adapters_only(jax.random.key(config.seed)).replace(
            frozen=lora_lib.load_base(config.init_from, mcfg, config.seed, state_sh.frozen))
        message = (f"LoRA: training {model_lib.count_params(state.params):,} adapter parameters "
                   f"on the frozen base {config.init_from or f'from seed {config.seed}'}")
    elif config.init_from:
        params, source = _init_from_params(config, mcfg, state_sh, init_from)
        _, train_rng = jax.random.split(jax.random.key(config.seed))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                           rng=train_rng)
        message = f"starting from the params of {source} (fresh optimizer state)"
    else:
        create = jax.jit(functools.partial(create_train_state, mcfg, tx), out_shardings=state_sh)
        state = create(jax.random.key(config.seed))
        message = "starting from scratch"
    print(message, flush=True)
    return state


def lora_base_reference(config, ckpt: checkpoint_lib.Checkpointer, init_from: dict | None) -> str:
    """The base of a LoRA run, pinned: the one its checkpoints name (resuming), else
    `config.init_from`'s step folder (`hf:` + the absolute folder); '' = fresh from seed."""
    for step in reversed(ckpt.all_steps()):
        try:
            return ckpt.read_info(step)["config"].get("init_from", "")
        except checkpoint_lib.CheckpointError:
            continue
    if config.init_from.startswith("hf:"):
        return "hf:" + os.path.abspath(config.init_from[len("hf:"):])
    return init_from["step_dir"] if init_from else config.init_from


def _init_from_params(config, mcfg: ModelConfig, state_sh: TrainState, init_from: dict | None):
    """(params, source) of `config.init_from`: another run's checkpoint or `hf:FOLDER`."""
    if config.init_from.startswith("hf:"):  # its shape and tokenizer are in the config already
        source = config.init_from[len("hf:"):]
        hf_cfg = hf.read_hf_config(source)
        if hf_cfg["model_type"] in ("bert", "roberta"):
            loaded = hf_bert.load_hf_bert_params(source, hf_bert.config_from_hf_bert(
                hf_cfg, mcfg.param_dtype))
            return _with_fresh_heads(loaded, config, mcfg, state_sh), source
        model_type = hf_cfg["model_type"]
        return jax.device_put(hf.load_hf_params(source, mcfg, model_type), state_sh.params), source
    init_from = init_from or checkpoint_lib.read_checkpoint_info(config.init_from)
    errors = checkpoint_lib.model_differences(init_from["model_config"], mcfg,
                                              checkpoint_lib.SHAPE_MODEL_FIELDS)
    if errors:
        raise checkpoint_lib.IncompatibleCheckpointError(
            f"init_from={config.init_from!r} has parameters of another shape: " + "; ".join(errors))
    if mcfg.architecture == "encoder":  # e.g. masked-LM params under a new classifier head
        params, _, _ = checkpoint_lib.load_params(init_from["step_dir"])
        return _with_fresh_heads(params, config, mcfg, state_sh), init_from["step_dir"]
    params, _, _ = checkpoint_lib.load_params(init_from["step_dir"], sharding=state_sh.params)
    return params, init_from["step_dir"]


def _with_fresh_heads(loaded, config, mcfg: ModelConfig, state_sh: TrainState):
    """An encoder's params: those of `loaded` where it has them (the embeddings and blocks),
    fresh ones from `config.seed` for the rest (a new head: pooler, classifier), placed."""
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    fresh = jax.jit(functools.partial(encoder_lib.init_params, mcfg),
                    out_shardings=state_sh.params)(init_rng)
    flat = traverse_util.flatten_dict(loaded)
    merged = {path: flat[path] if path in flat and flat[path].shape == value.shape else value
              for path, value in traverse_util.flatten_dict(fresh).items()}
    logging.info("init_from: fresh parameters for %s",
                 sorted("/".join(p) for p in merged if p not in flat) or "none")
    return jax.device_put(traverse_util.unflatten_dict(merged), state_sh.params)


def write_run_configs(workdir: str, config: ml_collections.ConfigDict, mcfg: ModelConfig) -> None:
    """`config.json` and `model_config.json` in the workdir (process 0), for people and tools."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "model_config.json"), "w") as f:
            f.write(mcfg.to_json())


def _call_end(config, micro_step: int, num_micro_steps: int) -> int:
    """Where a jitted call of several micro-steps that starts at `micro_step` ends: after
    `train.steps_per_call` steps, or earlier where an eval or a save is due."""
    accum = config.optim.grad_accum
    ends = [num_micro_steps, micro_step + config.train.steps_per_call]
    ends += [(micro_step // (e * accum) + 1) * e * accum
             for e in (config.train.eval_every, config.train.checkpoint_every) if e]
    return min(ends)


def train_loop(config, workdir: str, ckpt: checkpoint_lib.Checkpointer, data, mcfg: ModelConfig,
               tx: optax.GradientTransformation, schedule, state: TrainState,
               state_sh: TrainState, preemption: "safety.PreemptionWatcher | None" = None,
               ) -> tuple[TrainState, dict[str, list], int | None]:
    """Steps from `state.step` to the end, with evaluation, checkpoints and preemption.

    The host stays at most `safety.MAX_CALLS_AHEAD` calls ahead of the device; every finished
    step's loss and gradient norm are checked (`safety.nonfinite_check`) before the next save.
    Returns (state, history {'train_loss', 'eval'}, the step a SIGTERM stopped at or None).
    """
    accum, per_call = config.optim.grad_accum, config.train.steps_per_call
    num_micro_steps = config.train.num_steps * accum
    batch_sh = sharding_lib.batch_sharding(state_sh.step.mesh)
    objective = objectives_lib.for_run(mcfg, data.tokenizer,
                                       run_config.class_weights(config.data),
                                       config.data.mlm_probability, config.data.whole_word_mask)
    step_fn = jit_train_step(mcfg, tx, state_sh, batch_sh, per_call,
                             skip_nonfinite=config.optim.skip_nonfinite, objective=objective)
    eval_jit = jax.jit(functools.partial(eval_step, config=mcfg, objective=objective),
                       in_shardings=(lora_lib.combine(state_sh.frozen, state_sh.params), batch_sh))
    eval_fn = lambda params, batch: eval_jit(params, sharding_lib.put_batch(batch, batch_sh))
    max_eval = None if config.train.eval_batches < 0 else config.train.eval_batches
    final_batches = config.train.final_eval_batches or config.train.eval_batches
    max_final_eval = None if final_batches < 0 else final_batches
    micro_step = int(state.step)
    log = metrics_lib.MetricsLog(
        workdir, start_micro=micro_step, num_micro_steps=num_micro_steps, accum=accum,
        log_every=config.train.log_every, schedule=schedule,
        tokens_per_micro_step=config.data.batch_size * config.data.seq_len,
        progress_bar=config.train.progress_bar, is_main=jax.process_index() == 0)
    own_watcher = preemption is None
    preemption, preempted_at = preemption or safety.PreemptionWatcher(), None
    check, in_flight = safety.nonfinite_check(config, ckpt), collections.deque()
    # Where the loop's time goes: the first call (the compile), evaluations, checkpoint saves
    # (their synchronous part) and the rest, the training steps.
    seconds, loop_start = {"compile": 0.0, "eval": 0.0, "save": 0.0}, time.perf_counter()
    try:
        while micro_step < num_micro_steps:
            end = _call_end(config, micro_step, num_micro_steps) if per_call > 1 else micro_step + 1
            batches = [data.train.batch(k) for k in range(micro_step, end)]
            call_start = time.perf_counter()
            if per_call == 1:
                state, metrics = step_fn(state, sharding_lib.put_batch(batches[0], batch_sh))
                call_metrics = [metrics]
            else:
                state, stacked = step_fn(state, put_batches(batches, batch_sh))
                call_metrics = [jax.tree.map(lambda x, i=i: x[i], stacked)
                                for i in range(end - micro_step)]
            if not in_flight and not seconds["compile"]:
                seconds["compile"] = time.perf_counter() - call_start
            in_flight.append(list(enumerate(call_metrics, micro_step)))
            for k, metrics in in_flight[-1]:
                log.record(k, metrics)
            # call k-2 has finished before call k is dispatched
            safety.wait_for_device(in_flight, safety.MAX_CALLS_AHEAD - 1, check)
            micro_step = end
            if micro_step % accum:
                continue
            step, is_last = micro_step // accum, micro_step == num_micro_steps
            preemption.pause_for_test(step)
            stop = preemption.requested(step)  # `state` is at this step
            save_due = is_last or (config.train.checkpoint_every
                                   and step % config.train.checkpoint_every == 0)
            result = None
            eval_due = ((config.train.eval_every and step % config.train.eval_every == 0)
                        or is_last or (save_due and config.train.keep_best and not stop))
            if save_due or stop or eval_due:
                safety.wait_for_device(in_flight, 0, check)  # never a checkpoint past a bad step
            if eval_due:
                eval_start = time.perf_counter()
                result = evaluate(eval_fn, lora_lib.combine(state.frozen, state.params),
                                  data.val.eval_batches(max_final_eval if is_last else max_eval),
                                  objective)
                log.log_eval(step, result)
                seconds["eval"] += time.perf_counter() - eval_start
            if save_due or stop:
                log.write_losses()  # a checkpoint never covers a step missing from the log
                save_start = time.perf_counter()
                ckpt.save(state, step=step, micro_step=micro_step, config=config,
                          model_config=mcfg, tokenizer=data.tokenizer,
                          metrics=None if result is None else {"val_loss": result["loss"]},
                          reason="preemption" if stop else "final" if is_last else "periodic")
                seconds["save"] += time.perf_counter() - save_start
            if stop:
                preempted_at = step
                break
            if result is not None or save_due:
                log.restart_clock()  # eval and save time is not training time
        safety.wait_for_device(in_flight, 0, check)
        seconds["train"] = time.perf_counter() - loop_start - sum(seconds.values())
    except safety.NonFiniteLossError:
        log.write_losses()  # the bad step's loss is in metrics.jsonl too
        raise
    finally:
        if own_watcher:
            preemption.uninstall()
        log.close()
    return state, {**log.history, "seconds": seconds}, preempted_at


def end_of_run_samples(config, params, mcfg: ModelConfig, tokenizer) -> list[str]:
    """`train.num_samples` samples from `train.sample_prompt`, as the run prints at its end."""
    if config.train.num_samples <= 0 or mcfg.architecture == "encoder":
        return []
    prompt_len = len(tokenizer.encode(config.train.sample_prompt))
    sampling = sample_lib.SamplingConfig(
        max_new_tokens=min(config.train.sample_len, mcfg.max_len - max(prompt_len, 1)),
        temperature=config.train.sample_temperature, top_k=config.train.sample_top_k)
    prompts = [config.train.sample_prompt] * config.train.num_samples
    completions = sample_lib.sample_text(params, mcfg, tokenizer, prompts, sampling, config.seed)
    return [p + c for p, c in zip(prompts, completions)]
