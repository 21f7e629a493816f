"""What every subcommand does before its work: config names on the command line, quiet logs."""
from __future__ import annotations

import logging as py_logging
import sys

from absl import app, logging

from lmjax import checkpoint, configs

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


def setup_logging() -> None:
    """lmjax's INFO lines on stderr; other libraries' only from WARNING up."""
    logging.set_verbosity(logging.INFO)
    for name in _NOISY_LOGGERS:
        py_logging.getLogger(name).setLevel(py_logging.WARNING)
    checkpoint.quiet_orbax_logs()  # Orbax logs through absl's logger: filtered by file


def run(main, argv: list[str]) -> None:
    """`absl.app.run(main)` over `argv` with `--config=NAME` expanded; a bad name is a usage
    error (exit code 2) that lists the shipped configs, before any flag is parsed."""
    try:
        argv = expand_config_flag(argv)
    except ValueError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main, argv=argv)
