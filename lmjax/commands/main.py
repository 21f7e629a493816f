"""The `lmjax` command (also `python -m lmjax`): one subcommand per job, each a thin absl main.

    lmjax train  --config=shakespeare_char:demo --workdir=workdirs/demo
    lmjax sample --workdir=workdirs/demo --prompt="ROMEO."
    lmjax prepare --config=shakespeare_char         # tokenize the data once (training does too)
    lmjax eval   --workdir=workdirs/demo --task=perplexity --data=val
    lmjax serve  --workdir=workdirs/demo --port=8000   # OpenAI-compatible HTTP (lmjax-serve)
    lmjax quantize --workdir=workdirs/demo --output=workdirs/demo_int8   # int8 weights
    lmjax classify --workdir=workdirs/genre --text="O Romeo, Romeo!"   # encoder classifiers
    lmjax lm-eval --model_args workdir=workdirs/demo --tasks hellaswag  # lm-evaluation-harness
    lmjax configs                                   # the shipped configs

Only the chosen subcommand's module is imported, so each defines its own absl flags.
"""
from __future__ import annotations

import sys

import lmjax

USAGE = """usage: lmjax COMMAND [--flags]   (lmjax COMMAND --help for its flags)

commands:
  train    train a model: lmjax train --config=NAME[:ARG] --workdir=DIR [--config.x.y=v ...]
  prepare  tokenize a config's data once into its token store: lmjax prepare --config=NAME
  sample   sample from a run or a Hugging Face folder: lmjax sample --workdir=DIR --prompt=...
  eval     evaluate a run or a Hugging Face folder: lmjax eval --workdir=DIR --task=... --data=...
  serve    an OpenAI-compatible HTTP server: lmjax serve --workdir=DIR --port=8000 (lmjax-serve)
  quantize int8 / bfloat16 weights of a run or HF folder: lmjax quantize --workdir=DIR --output=DIR
  classify label texts with a fine-tuned encoder: lmjax classify --workdir=DIR --text=...
  lm-eval  lm-evaluation-harness on lmjax: lmjax lm-eval --model_args workdir=DIR --tasks=...
  configs  list the shipped configs (named in --config=NAME[:ARG])
  version  print lmjax's version
"""


def main(argv: list[str] | None = None) -> None:
    """Dispatches `lmjax COMMAND ARGS...` to `lmjax.commands.COMMAND.run`."""
    argv = list(sys.argv if argv is None else argv)
    command = argv[1] if len(argv) > 1 else ""
    rest = [f"lmjax {command}"] + argv[2:]
    if command == "train":
        from lmjax.commands import train
        train.run(rest)
    elif command == "prepare":
        from lmjax.commands import prepare
        prepare.run(rest)
    elif command == "sample":
        from lmjax.commands import sample
        sample.run(rest)
    elif command == "eval":
        from lmjax.commands import evaluate
        evaluate.run(rest)
    elif command == "serve":
        from lmjax.commands import serve
        serve.run(rest)
    elif command == "quantize":
        from lmjax.commands import quantize
        quantize.run(rest)
    elif command == "classify":
        from lmjax.commands import classify
        classify.run(rest)
    elif command == "lm-eval":
        from lmjax.commands import lm_eval
        lm_eval.run(rest)
    elif command == "configs":
        from lmjax import configs
        for name, doc in configs.describe().items():
            print(f"{name:24s} {doc}")
    elif command in ("version", "--version"):
        print(lmjax.__version__)
    elif command in ("", "help", "-h", "--help"):
        print(USAGE, end="")
    else:
        print(f"lmjax: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        sys.exit(2)
