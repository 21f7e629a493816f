"""What every subcommand does before its work: config names on the command line, quiet logs."""
from __future__ import annotations

import dataclasses
import difflib
import logging as py_logging
import os
import sys
import traceback

import jax
from absl import app, flags, logging

from lmjax import checkpoint, configs, hf, lora, quantize

# Third-party loggers that write INFO lines nobody acts on (e.g. jax's "Unable to initialize
# backend 'tpu'" on every CPU start); their warnings still show.
_NOISY_LOGGERS = ("jax", "orbax", "absl.orbax", "etils", "tensorstore", "urllib3", "fsspec")


def expand_config_flag(argv: list[str]) -> list[str]:
    """`--config=NAME[:ARG]` (or `--config NAME[:ARG]`) -> the shipped config's file path, so
    that ml_collections' config flag (which takes a path) accepts the names of `lmjax.configs`."""
    out, expand_next = [], False
    for arg in argv:
        if expand_next:
            arg, expand_next = configs.config_file(arg), False
        elif arg.startswith("--config="):
            arg = "--config=" + configs.config_file(arg[len("--config="):])
        elif arg == "--config":
            expand_next = True
        out.append(arg)
    return out


def check_overrides(argv: list[str]) -> None:
    """Raises ValueError for a `--config.a.b=v` whose field the config does not have, naming the
    closest field (ml_collections' own error is an escaped traceback from inside flag parsing)."""
    spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    if spec is None or not overrides:
        return
    config = configs.get(spec)
    for path in overrides:
        node, parts = config, path.split(".")
        for depth, key in enumerate(parts):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                where = ".".join(["config"] + parts[:depth])
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean --{where}.{close[0]}?" if close else ""
                raise ValueError(f"--config.{path}: {where} has no field {key!r}{hint} "
                                 f"Fields of {where}: {', '.join(sorted(fields))}")
            node = node[key]


def setup_logging() -> None:
    """lmjax's INFO lines on stderr; other libraries' only from WARNING up."""
    logging.set_verbosity(logging.INFO)
    for name in _NOISY_LOGGERS:
        py_logging.getLogger(name).setLevel(py_logging.WARNING)
    checkpoint.quiet_orbax_logs()  # Orbax logs through absl's logger: filtered by file


def use_compilation_cache() -> None:
    """XLA's persistent compilation cache for every command: a program compiled once (by any
    run of this user with the same shapes, config and JAX) is read back from disk instead of
    compiled again. JAX's own settings win: `JAX_COMPILATION_CACHE_DIR` picks the folder,
    `JAX_ENABLE_COMPILATION_CACHE=false` turns it off; the default folder is
    ~/.cache/lmjax/xla, capped at 4 GiB (least recently used entries go first)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(
            os.path.expanduser("~"), ".cache", "lmjax", "xla"))
        if jax.config.jax_compilation_cache_max_size < 0:
            jax.config.update("jax_compilation_cache_max_size", 4 << 30)


def run(main, argv: list[str]) -> None:
    """`absl.app.run(main)` over `argv` with `--config=NAME` expanded; a bad name or an
    override of a field that does not exist is a usage error (exit code 2), before any flag is
    parsed. Compiled programs are cached on disk across runs (`use_compilation_cache`)."""
    try:
        argv = expand_config_flag(argv)
        check_overrides(argv)
    except ValueError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    use_compilation_cache()
    app.run(main, argv=argv)


def fail(program: str, error: BaseException, code: int) -> None:
    """Ends the command with one line naming the error (`LMJAX_TRACEBACK=1`: the traceback
    too) and exit code `code` (2: a bad setting or input; 1: the run could not go on)."""
    if os.environ.get("LMJAX_TRACEBACK"):
        traceback.print_exception(error)
    print(f"{program}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


@dataclasses.dataclass(frozen=True)
class ModelFlags:
    """The flags that name the model of `lmjax sample`, `eval` and `serve` (one definition):
    --workdir [--step] or --hf_model [--dtype], and optionally --adapter and --weights_dtype."""

    workdir: flags.FlagHolder
    step: flags.FlagHolder
    hf_model: flags.FlagHolder
    dtype: flags.FlagHolder
    adapter: flags.FlagHolder
    weights_dtype: flags.FlagHolder

    def check(self) -> None:
        """A usage error unless exactly one of --workdir and --hf_model is given."""
        check_one_model(self.workdir.value, self.hf_model.value)

    def load(self):
        """(params, model_config, tokenizer): `load_model` of the flags' values."""
        return load_model(self.workdir.value, self.hf_model.value, self.dtype.value,
                          self.step.value, self.adapter.value, self.weights_dtype.value)

    def describe(self) -> dict:
        """Where the model came from, for a result's JSON: absolute paths and the dtypes."""
        if self.hf_model.value:
            source = {"hf_model": os.path.abspath(self.hf_model.value), "dtype": self.dtype.value}
        else:
            source = {"workdir": os.path.abspath(self.workdir.value),
                      "step_dir": checkpoint.resolve_step_dir(self.workdir.value,
                                                              self.step.value)}
        if self.adapter.value:
            source["adapter"] = os.path.abspath(self.adapter.value)
        return {**source, "weights_dtype": self.weights_dtype.value}


def define_model_flags() -> ModelFlags:
    """Defines the model flags (once per process: each command module calls this at import)."""
    return ModelFlags(
        workdir=flags.DEFINE_string("workdir", None, "Training workdir, step folder or params "
                                    "export."),
        step=flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest)."),
        hf_model=flags.DEFINE_string("hf_model", None, "A Hugging Face model folder instead."),
        dtype=flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--hf_model dtype."),
        adapter=flags.DEFINE_string("adapter", None, "A LoRA adapter on the model: a PEFT folder "
                                    "or a LoRA run's workdir (merged into the weights)."),
        weights_dtype=flags.DEFINE_enum("weights_dtype", None, list(quantize.WEIGHTS_DTYPES),
                                        "Keep the weights in this dtype while running (int8: "
                                        "lmjax.quantize); default: as stored."))


def check_one_model(workdir: str | None, hf_model: str | None) -> None:
    if (workdir is None) == (hf_model is None):
        raise app.UsageError("give exactly one of --workdir and --hf_model")


def load_model(workdir: str | None, hf_model: str | None, dtype: str, step: int | None = None,
               adapter: str | None = None, weights_dtype: str | None = None):
    """(params, model_config, tokenizer) of exactly one of `workdir` (its newest verified step,
    or `step`) and `hf_model` (a Hugging Face folder with a tokenizer, loaded as `dtype`).

    `adapter`: a PEFT LoRA folder or a LoRA run's workdir / step folder, applied onto that base.
    A LoRA run's own workdir brings its base (a QLoRA run's int8 base is dequantized to merge,
    then kept int8 unless `weights_dtype` says otherwise). Adapters come back merged into the
    weights (`lora.merge`: sampling at the base model's speed).
    weights_dtype: None (as stored), 'float32', 'bfloat16' or 'int8' (`quantize.convert`, once,
    here, after any adapter is merged): the dtype the weights are kept in while decoding.
    """
    check_one_model(workdir, hf_model)
    quantize.check_weights_dtype(weights_dtype)
    if hf_model:
        model_config, params, tokenizer = hf.load_hf(hf_model, dtype)
        if tokenizer is None:
            raise app.UsageError(f"{hf_model} has no tokenizer.json or tokenizer.model")
    else:
        params, model_config, tokenizer = lora.load_params(workdir, step=step)
    if model_config.lora_rank and model_config.quantization == "int8":
        # A QLoRA run (int8 base): merged in float32, then int8 again unless told otherwise.
        params, model_config = quantize.dequantize(params, model_config)
        weights_dtype = weights_dtype or "int8"
    if adapter:
        if model_config.lora_rank:
            params, model_config = lora.merge(params, model_config)
        params, model_config = lora.apply_adapter(params, model_config, adapter)
    if model_config.lora_rank:
        params, model_config = lora.merge(params, model_config)
    params, model_config = quantize.convert(params, model_config, weights_dtype)
    return params, model_config, tokenizer
