"""Checkpoints with Orbax: exact resume, preemption, params-only loading.

Layout of a run's workdir:

    WORKDIR/checkpoints/<step>/          one Orbax step folder per saved optimizer step
        params/                          the parameters (an Orbax PyTree item)
        train_state/                     step (micro-steps), opt_state, rng key data
        meta/                            JSON: step, micro_step, data position, rng impl, time
        config/                          JSON: the experiment config (config.json equivalent)
        model_config/                    JSON: the ModelConfig fields (model_config.json)
        tokenizer/                       JSON: the tokenizer's files (base64), so a step folder
                                         alone is enough for `load_params`
        checksums/                       JSON: a 64-bit digest of every array's bits and a
                                         SHA-256 of every JSON item, checked on every restore
    WORKDIR/corrupt_checkpoints/<step>-<time>/   steps found unreadable on resume, moved aside

Writes are atomic: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames when every
item is on disk, so a half-written step is never listed; `Checkpointer` moves aside a listed step
that cannot be read (truncated file, missing item, empty folder) or whose arrays or JSON do not
match their recorded checksums, naming the step and the array, and falls back to the newest
verified one. A state with a non-finite value is never saved (`NonFiniteError`). Old steps are
deleted only after a newer save has completed.

    ckpt = Checkpointer(workdir, keep=3, keep_best=True, async_save=True)
    restored = ckpt.restore_latest(steps.abstract_train_state(model_cfg, tx))  # None: fresh
    ckpt.save(state, step=..., micro_step=..., config=config, model_config=model_cfg,
              tokenizer=tokenizer, metrics={'val_loss': 1.9})
    ckpt.close()                                                         # waits for saves

    params, model_cfg, tokenizer = load_params(workdir_or_step_folder)   # no optimizer needed
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from lmjax import encoder as encoder_lib
from lmjax import int8, integrity
from lmjax import model as model_lib
from lmjax import tokenizers
from lmjax.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
ITEMS = ("params", "train_state", "meta", "config", "model_config", "tokenizer", "checksums")
JSON_ITEMS = ("meta", "config", "model_config", "tokenizer")

class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class NonFiniteError(CheckpointError):
    """A state to be saved holds NaN or infinity: it is not written."""


# ----------------------------------------------------------------------------- paths


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def check_writable(directory: str) -> None:
    """Creates `directory` if needed and writes/removes a probe file; a clear error otherwise."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"workdir {directory!r} is not writable ({e.strerror or e}); checkpoints, logs and "
            "the tokenizer go there: choose another --workdir or fix its permissions.") from e


def _is_step_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "params"))


def _steps_in(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def resolve_step_dir(path: str, step: int | None = None) -> str:
    """The step folder meant by `path`: a workdir, its `checkpoints` folder or a step folder.

    `step=None` takes the newest step whose folder is complete (Orbax only renames finished
    steps into place, so tmp folders are never candidates).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if _is_step_folder(path):
        if step is not None and os.path.basename(path).isdigit() and int(
                os.path.basename(path)) != step:
            raise ValueError(f"{path} is the step folder of step {os.path.basename(path)}, "
                             f"not step {step}")
        return path
    directory = path if not os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) else (
        os.path.join(path, CHECKPOINT_DIR))
    steps = _steps_in(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path!r} (looked for step folders in "
                                f"{directory})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; steps: {steps}")
    return os.path.join(directory, str(step))


# ----------------------------------------------------------------------------- small helpers


def _sharded(tree, sharding):
    """ShapeDtypeStructs of `tree` with `sharding` (one Sharding, or a pytree of them)."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)


def abstract_params(model_config: ModelConfig, sharding=None):
    """Shapes/dtypes/shardings of a model's parameters (no memory, no compute); a LoRA model's
    adapters alone (what a LoRA run saves: lmjax/lora.py)."""
    shapes = jax.eval_shape(lambda rng: encoder_lib.init_params(model_config, rng),
                            jax.random.key(0))
    if model_config.lora_rank:
        shapes = model_lib.split_adapters(shapes)[1]
    return _sharded(shapes, sharding)


def restore_target(abstract_state, sharding=None):
    """The restore target of a train state: every leaf a ShapeDtypeStruct with `.sharding`.

    `abstract_state` is a TrainState of shapes (`jax.eval_shape` of how it is built, see
    `steps.abstract_train_state`). `sharding` is one `jax.sharding.Sharding` for all leaves or a
    pytree of them matching it; None places everything on the default device. The rng leaf
    becomes the uint32 key data (as saved), not a typed key.
    """
    state = abstract_state.replace(rng=jax.eval_shape(jax.random.key_data, abstract_state.rng))
    return _sharded(state, sharding)


def _tokenizer_to_json(tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = base64.b64encode(f.read()).decode("ascii")
    return {"kind": tokenizer.kind, "files": files}


def _tokenizer_from_json(content: dict):
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(content, tmp)
        return tokenizers.load_tokenizer(tmp)


def write_tokenizer_files(content: dict, directory: str) -> None:
    """Writes a checkpoint's tokenizer item as files (lmjax_tokenizer.json, ...) into `directory`."""
    tokenizers.write_files(directory, {name: base64.b64decode(data)
                                       for name, data in content["files"].items()})


def _read_json_item(step_dir: str, item: str) -> Any:
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
            os.path.join(step_dir, item), args=ocp.args.JsonRestore())
    except Exception as e:  # noqa: BLE001 - Orbax raises many types
        raise CheckpointError(f"cannot read item {item!r} of checkpoint {step_dir}: {e}") from e


def _read_checksums(step_dir: str) -> dict | None:
    """The `checksums` item of a step folder; None if it has none (older lmjax)."""
    if not os.path.isdir(os.path.join(step_dir, "checksums")):
        return None
    return _read_json_item(step_dir, "checksums")


def read_tokenizer_item(path: str, step: int | None = None) -> dict:
    """The raw tokenizer item of a checkpoint (see `write_tokenizer_files`)."""
    return _read_json_item(resolve_step_dir(path, step), "tokenizer")


def read_checkpoint_info(path: str, step: int | None = None) -> dict:
    """{'step_dir', 'meta', 'config', 'model_config'} of a checkpoint, reading only small JSON."""
    step_dir = resolve_step_dir(path, step)
    return {"step_dir": step_dir, **{k: _read_json_item(step_dir, k)
                                      for k in ("meta", "config", "model_config")}}


def read_saved_config(path: str, step: int | None = None) -> dict | None:
    """The run config saved with a checkpoint (a step folder, workdir or `export_params` folder,
    which has no `meta` and a `config` only when exported with one); None when there is none."""
    step_dir = resolve_step_dir(path, step)
    if not os.path.isdir(os.path.join(step_dir, "config")):
        return None
    return _read_json_item(step_dir, "config")


# ----------------------------------------------------------------------------- manager


class _QuietOrbax:
    """absl-logging filter: Orbax's INFO lines (dozens per save) are dropped, warnings kept."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    import logging as py_logging
    logger = py_logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())


class Checkpointer:
    """Orbax CheckpointManager in `workdir/checkpoints` with lmjax's items and policies.

    keep: the newest `keep` steps are kept; keep_best: also the step with the lowest
    `metrics['val_loss']`; async_save: `save` returns once arrays are copied to host memory and
    writes in a background thread (`wait()`/`close()` block until done).
    """

    def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = checkpoint_dir(self.workdir)
        check_writable(self.directory)
        quiet_orbax_logs()
        policies = [ocp.checkpoint_managers.LatestN(n=max(keep, 1))]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,  # half-written steps of a killed run
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn only makes Orbax write each step's metrics (used by BestN on restarts).
            best_fn=(lambda m: m["val_loss"]) if keep_best else None, best_mode="min")
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # -- saving

    def save(self, state, *, step: int, micro_step: int, config: ml_collections.ConfigDict,
             model_config: ModelConfig, tokenizer, metrics: dict | None = None,
             reason: str = "periodic") -> bool:
        """Saves `state` as step `step` (optimizer steps); `micro_step` is the data position.

        Raises CheckpointError if this save or a previous asynchronous one failed; the steps
        already on disk are left as they were.
        """
        if step in self._manager.all_steps():
            return False
        tree = {"step": state.step, "opt_state": state.opt_state,
                "rng": jax.random.key_data(state.rng)}
        checksums, nonfinite = integrity.array_checksums({"params": state.params,
                                                           "train_state": tree})
        if nonfinite:
            raise NonFiniteError(
                f"not saving step {step}: {len(nonfinite)} arrays hold NaN or infinity (first: "
                f"{nonfinite[0]}); the checkpoints on disk are left as they are: steps "
                f"{_steps_in(self.directory)}")
        meta = {"step": int(step), "micro_step": int(micro_step),
                "data_position": int(micro_step), "rng_impl": str(jax.random.key_impl(state.rng)),
                "reason": reason, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "metrics": metrics or {}, "checksums": True}
        json_items = {"meta": meta, "config": json.loads(config.to_json_best_effort()),
                      "model_config": dataclasses.asdict(model_config),
                      "tokenizer": _tokenizer_to_json(tokenizer)}
        json_items = json.loads(json.dumps(json_items))  # as read back (tuples become lists)
        record = {"arrays": checksums,
                  "json": {name: integrity.json_checksum(content)
                           for name, content in json_items.items()}}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train_state=ocp.args.StandardSave(tree),
            checksums=ocp.args.JsonSave(record),
            **{name: ocp.args.JsonSave(content) for name, content in json_items.items()})
        try:
            return self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001
            raise self._save_error(step, e) from e

    def _save_error(self, step: int, error: BaseException) -> CheckpointError:
        intact = _steps_in(self.directory)
        return CheckpointError(
            f"saving checkpoint step {step} (or the previous asynchronous save) in "
            f"{self.directory} failed: {type(error).__name__}: {error}. Earlier checkpoints are "
            f"intact: steps {intact}. Free disk space / fix permissions and re-run to resume.")

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk; CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._manager.latest_step() or -1, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    # -- reading

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_info(self, step: int) -> dict:
        return read_checkpoint_info(self.step_dir(step))

    def restore(self, step: int, abstract_state):
        """(TrainState, meta) of `step`, placed as `abstract_state` (see `restore_target`) says,
        after checking every array and JSON item against the step's checksums
        (CheckpointError naming the first that differs)."""
        tree = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                "rng": abstract_state.rng}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            train_state=ocp.args.StandardRestore(tree),
            meta=ocp.args.JsonRestore()))
        meta, state_tree = restored["meta"], restored["train_state"]
        step_dir = self.step_dir(step)
        json_items = {"meta": meta, **{k: _read_json_item(step_dir, k)
                                       for k in ("config", "model_config", "tokenizer")}}
        record = _read_checksums(step_dir)
        if record is None and meta.get("checksums"):
            raise CheckpointError(f"checkpoint step {step}: its checksums item is missing")
        integrity.verify_checksums(f"checkpoint step {step}", record,
                         {"params": restored["params"], "train_state": state_tree}, json_items)
        rng = jax.random.wrap_key_data(state_tree["rng"], impl=meta.get("rng_impl"))
        state = abstract_state.replace(step=state_tree["step"], params=restored["params"],
                                       opt_state=state_tree["opt_state"], rng=rng)
        if int(state.step) != meta["micro_step"]:
            raise CheckpointError(f"step {step}: train_state.step={int(state.step)} but "
                                  f"meta.micro_step={meta['micro_step']}")
        return state, meta

    def restore_latest(self, abstract_state,
                       check: Callable[[dict], None] | None = None):
        """(state, meta) of the newest readable step, or None when there is none.

        A step that fails to read is logged as bad, moved to `WORKDIR/corrupt_checkpoints/`
        (never deleted) and the next older one is tried. `check(info)` runs on each candidate's
        JSON (`read_info`) before any array is read, e.g. to reject an incompatible config;
        its exceptions propagate.
        """
        listed = set(self.all_steps())
        for step in _steps_in(self.directory):
            if step not in listed:  # e.g. an empty folder: Orbax skips it, a save there fails
                self._quarantine(step, CheckpointError("not a complete Orbax step folder"))
        for step in sorted(self.all_steps(), reverse=True):
            try:
                info = self.read_info(step)
            except Exception as e:  # noqa: BLE001
                self._quarantine(step, e)
                continue
            if check is not None:
                check(info)
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001
                self._quarantine(step, e)
        return None

    def last_saved(self) -> str:
        """'step N in DIR' of the newest step on disk, or 'none' (for error messages)."""
        steps = _steps_in(self.directory)
        return f"step {steps[-1]} in {self.step_dir(steps[-1])}" if steps else "none"

    def _quarantine(self, step: int, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}".splitlines()[0][:400]
        target = os.path.join(self.workdir, CORRUPT_DIR,
                              f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self.step_dir(step), target)
        logging.warning("checkpoint step %d in %s is unreadable or fails its checksums (%s); "
                        "moved it to %s and falling back to an older step", step,
                        self.directory, message, target)
        print(f"WARNING: checkpoint step {step} is corrupt or incomplete ({message}); "
              f"moved to {target}; falling back to the newest verified checkpoint.", flush=True)
        self._manager.reload()


# ----------------------------------------------------------------------------- params only


def load_params(workdir_or_path: str, step: int | None = None, sharding=None):
    """Parameters, ModelConfig and tokenizer of a checkpoint, without any optimizer state.

    `workdir_or_path` is a run's workdir (newest step, or `step`), its `checkpoints` folder, a
    step folder, or a folder written by `export_params`. `sharding`: as `restore_target`.
    Every array and JSON item read is checked against the step's checksums. Given a workdir and
    no `step`, a step that fails is skipped with a warning naming it and the newest verified
    one is used (it is not moved: the training run does that when it resumes).
    Returns (params, model_config, tokenizer).
    """
    path = os.path.abspath(os.path.expanduser(workdir_or_path))
    if step is not None or _is_step_folder(path):
        return _load_params_from(resolve_step_dir(path, step), sharding)
    directory = resolve_step_dir(path).rsplit(os.sep, 1)[0]
    steps = sorted(_steps_in(directory), reverse=True)
    for i, candidate in enumerate(steps):
        try:
            return _load_params_from(os.path.join(directory, str(candidate)), sharding)
        except CheckpointError as e:
            if i + 1 == len(steps):
                raise CheckpointError(f"no verified checkpoint in {directory}; the oldest, step "
                                      f"{candidate}, fails too: {e}") from e
            print(f"WARNING: checkpoint step {candidate} is corrupt or incomplete "
                  f"({str(e).splitlines()[0][:400]}); trying step {steps[i + 1]}.",
                  file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _load_params_from(step_dir: str, sharding=None):
    """`load_params` of one step folder: CheckpointError for anything unreadable or changed."""
    try:
        json_items = {k: _read_json_item(step_dir, k) for k in ("model_config", "tokenizer")}
        model_config = ModelConfig.from_dict(json_items["model_config"])
        tokenizer = _tokenizer_from_json(json_items["tokenizer"])
        target = abstract_params(model_config, sharding)
        perms = _input_major_int8(os.path.join(step_dir, "params"), target, model_config)
        flat_target = traverse_util.flatten_dict(target)
        params = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"), _sharded(
            _with_leaves(target, {p: jax.ShapeDtypeStruct(shape, flat_target[p].dtype)
                                  for p, (_, shape) in perms.items()}), None)
            if perms else target)  # an old layout: restored as stored, on one device
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax, TensorStore, JSON, base64 raise many types
        message = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        raise CheckpointError(f"cannot read checkpoint {step_dir}: {message}") from e
    try:
        integrity.verify_checksums(step_dir, _read_checksums(step_dir), {"params": params},
                                   json_items)
    except integrity.IntegrityError as e:
        raise CheckpointError(str(e)) from e
    if perms:
        print(f"NOTE: {step_dir} stores its int8 kernels input-major (lmjax before 2026-12-02); "
              "transposed at load to the output-major layout the int8 dot reads. `lmjax "
              f"quantize --workdir={step_dir} --output=NEW` writes them so.", file=sys.stderr,
              flush=True)
        flat = traverse_util.flatten_dict(params)
        params = jax.device_put(_with_leaves(params, {
            p: jnp.transpose(flat[p], perm) for p, (perm, _) in perms.items()}),
            jax.tree.map(lambda t: t.sharding, target))
    return params, model_config, tokenizer


def _input_major_int8(params_dir: str, target, model_config: ModelConfig) -> dict:
    """{flat path: (permutation, stored shape)} of an int8 params item stored input-major
    (`int8.input_major_permutations`, from its metadata); {} for any other."""
    if model_config.quantization != "int8" or model_config.lora_rank:
        return {}
    stored = {p: tuple(m.shape) for p, m in traverse_util.flatten_dict(
        ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree).items()}
    perms = int8.input_major_permutations(stored, {p: t.shape for p, t in
                                                   traverse_util.flatten_dict(target).items()})
    return {p: (perm, stored[p]) for p, perm in perms.items()}


def _with_leaves(tree, leaves: dict):
    """`tree` with the leaves at the flat paths of `leaves` replaced by theirs."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(tree), **leaves})


def export_params(path: str, params, model_config: ModelConfig, tokenizer,
                  config: ml_collections.ConfigDict | None = None) -> str:
    """Writes a params-only folder (params, model_config, tokenizer[, config]) for inference.

    The folder has a step folder's layout without `train_state`, so `load_params(path)` reads it.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; export_params does not overwrite")
    json_items = {"model_config": dataclasses.asdict(model_config),
                  "tokenizer": _tokenizer_to_json(tokenizer)}
    if config is not None:
        json_items["config"] = json.loads(config.to_json_best_effort())
    json_items = json.loads(json.dumps(json_items))
    checksums, nonfinite = integrity.array_checksums({"params": params})
    if nonfinite:
        raise NonFiniteError(f"not exporting: {nonfinite[0]} holds NaN or infinity")
    record = {"arrays": checksums,
              "json": {k: integrity.json_checksum(v) for k, v in json_items.items()}}
    items = {"params": ocp.args.StandardSave(params), "checksums": ocp.args.JsonSave(record),
             **{k: ocp.args.JsonSave(v) for k, v in json_items.items()}}
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(path, ocp.args.Composite(**items))
    return path
