r"""`lmjax quantize`: a run or a Hugging Face folder as a params-only folder of int8 (or bfloat16)
weights, which `lmjax sample/eval --workdir=OUTPUT` and `lmjax.pipeline` load directly.

  lmjax quantize --workdir=workdirs/demo --output=workdirs/demo_int8
  lmjax quantize --hf_model=models/gpt2 --output=models/gpt2_int8 --weights_dtype=bfloat16

Prints the bytes of the weights before and after and the folder's size on disk (JSON).
"""
from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import app, flags

from lmjax import checkpoint, quantize
from lmjax.commands import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, step folder or params export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_HF_MODEL = flags.DEFINE_string("hf_model", None, "A Hugging Face model folder instead.")
_OUTPUT = flags.DEFINE_string("output", None, "The folder to write (must not exist).")
_WEIGHTS_DTYPE = flags.DEFINE_enum("weights_dtype", "int8", ["int8", "int8_g32", "bfloat16"],
                                   "The stored weights' dtype.")


def folder_bytes(path: str) -> int:
    """Bytes of every file under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _OUTPUT.value:
        raise app.UsageError("give --output, the folder to write")
    if os.path.exists(_OUTPUT.value):
        common.fail("lmjax quantize", FileExistsError(f"--output={_OUTPUT.value} exists"), 2)
    common.setup_logging()
    try:
        params, model_config, tokenizer = common.load_model(_WORKDIR.value, _HF_MODEL.value,
                                                            "float32", _STEP.value)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        common.fail("lmjax quantize", e, 1)
    before = quantize.weight_bytes(params)
    params, model_config = quantize.convert(params, model_config, _WEIGHTS_DTYPE.value)
    # A run's experiment config goes along (so that `lmjax eval --data=val` finds its data).
    config = None
    if _WORKDIR.value:
        try:
            config = checkpoint.read_checkpoint_info(_WORKDIR.value, _STEP.value).get("config")
        except checkpoint.CheckpointError:  # a params export without one
            config = None
    checkpoint.export_params(_OUTPUT.value, params, model_config, tokenizer,
                             ml_collections.ConfigDict(config) if config else None)
    print(json.dumps({"output": os.path.abspath(_OUTPUT.value), "weights_dtype":
                      _WEIGHTS_DTYPE.value, "weight_bytes_before": before,
                      "weight_bytes_after": quantize.weight_bytes(params),
                      "disk_bytes": folder_bytes(_OUTPUT.value)}))


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)`: the `lmjax quantize` command."""
    common.run(main, sys.argv if argv is None else argv)
