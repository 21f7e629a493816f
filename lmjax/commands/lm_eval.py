"""`lmjax lm-eval`: lm-evaluation-harness's own command line, with lmjax's model registered.

  lmjax lm-eval --model_args workdir=workdirs/demo --tasks hellaswag
  lmjax lm-eval --model_args hf_model=models/gpt2,batch_size=16 --tasks my_task --include_path my_tasks/

Every argument is lm_eval's (`lm_eval run --help`); `--model` defaults to `lmjax` here (lm_eval's
own default is `hf`). lm_eval looks models up only in the registry its own modules fill, so
`lm_eval --model lmjax` cannot find lmjax; this command imports `lmjax.lm_eval_model` (which
registers it) and hands over to lm_eval's `cli_evaluate`. Needs the `eval` extra.
"""
from __future__ import annotations

import sys

LM_EVAL_COMMANDS = ("run", "ls", "validate")


def run(argv: list[str]) -> None:
    """`argv[0]` is the program name; the rest is lm_eval's arguments."""
    try:
        from lmjax import lm_eval_model  # noqa: F401 - registers the `lmjax` model
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        sys.exit(f"lmjax lm-eval needs lm-evaluation-harness: pip install 'lmjax[eval]' ({error})")
    args = argv[1:]
    if not args or args[0] not in LM_EVAL_COMMANDS:
        args = ["run"] + args
    if args[0] == "run" and not any(a == "--model" or a.startswith("--model=") for a in args):
        args[1:1] = ["--model", "lmjax"]
    sys.argv = ["lm-eval"] + args
    cli_evaluate()
