"""The training run: `train_and_evaluate(config, workdir)` strings steps.py's jitted pieces
together (state from scratch, a checkpoint or pretrained weights; the loop with periodic
evaluation, checkpoints and logging; end-of-run samples).
"""
from __future__ import annotations

import collections
import functools
import os
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import traverse_util

from lmjax import checkpoint as checkpoint_lib
from lmjax import config_diff
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
from lmjax import steps as steps_lib
from lmjax import tokenizers as tokenizers_lib
from lmjax.config import ModelConfig


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
        tx, schedule = steps_lib.run_optimizer(config)
        state_sh = steps_lib.state_shardings(mcfg, tx, mesh, axis_rules)
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
        changes = config_diff.check_resume_config(info["config"], info["model_config"], config)
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
                  tx: optax.GradientTransformation, state_sh: steps_lib.TrainState,
                  ckpt: checkpoint_lib.Checkpointer, init_from: dict | None) -> steps_lib.TrainState:
    """The state a run starts from, in its sharded layout: the newest good checkpoint of the
    workdir; else `config.init_from`'s params (a run's or an HF folder's) with a fresh optimizer;
    else fresh parameters from `config.seed`. Prints which."""
    restored = ckpt.restore_latest(steps_lib.abstract_train_state(mcfg, tx, state_sh),
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
            lambda rng: steps_lib.create_train_state(mcfg, tx, rng).replace(frozen=None),
            out_shardings=state_sh.replace(frozen=None))
        state = adapters_only(jax.random.key(config.seed)).replace(
            frozen=lora_lib.load_base(config.init_from, mcfg, config.seed, state_sh.frozen))
        message = (f"LoRA: training {model_lib.count_params(state.params):,} adapter parameters "
                   f"on the frozen base {config.init_from or f'from seed {config.seed}'}")
    elif config.init_from:
        params, source = _init_from_params(config, mcfg, state_sh, init_from)
        _, train_rng = jax.random.split(jax.random.key(config.seed))
        state = steps_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                           rng=train_rng)
        message = f"starting from the params of {source} (fresh optimizer state)"
    else:
        create = jax.jit(functools.partial(steps_lib.create_train_state, mcfg, tx), out_shardings=state_sh)
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


def _init_from_params(config, mcfg: ModelConfig, state_sh: steps_lib.TrainState, init_from: dict | None):
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
    errors = config_diff.model_differences(init_from["model_config"], mcfg,
                                           config_diff.SHAPE_MODEL_FIELDS)
    if errors:
        raise config_diff.IncompatibleCheckpointError(
            f"init_from={config.init_from!r} has parameters of another shape: " + "; ".join(errors))
    if mcfg.architecture == "encoder":  # e.g. masked-LM params under a new classifier head
        params, _, _ = checkpoint_lib.load_params(init_from["step_dir"])
        return _with_fresh_heads(params, config, mcfg, state_sh), init_from["step_dir"]
    params, _, _ = checkpoint_lib.load_params(init_from["step_dir"], sharding=state_sh.params)
    return params, init_from["step_dir"]


def _with_fresh_heads(loaded, config, mcfg: ModelConfig, state_sh: steps_lib.TrainState):
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
               tx: optax.GradientTransformation, schedule, state: steps_lib.TrainState,
               state_sh: steps_lib.TrainState, preemption: "safety.PreemptionWatcher | None" = None,
               ) -> tuple[steps_lib.TrainState, dict[str, list], int | None]:
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
    step_fn = steps_lib.jit_train_step(mcfg, tx, state_sh, batch_sh, per_call,
                             skip_nonfinite=config.optim.skip_nonfinite, objective=objective)
    eval_jit = jax.jit(functools.partial(steps_lib.eval_step, config=mcfg, objective=objective),
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
                state, stacked = step_fn(state, steps_lib.put_batches(batches, batch_sh))
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
                result = steps_lib.evaluate(eval_fn, lora_lib.combine(state.frozen, state.params),
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
