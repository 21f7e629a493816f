"""The shipped experiment configs, named on the command line or in a notebook.

    lmjax train --config=shakespeare_char:demo --workdir=workdirs/demo
    config = configs.get("shakespeare_char:demo")      # the same ConfigDict, in Python

`NAME[:ARG]` names a module of this folder and the argument its `get_config(ARG)` receives; a
path to any other config file (`my_configs/run.py:ARG`) works wherever a name does. Each module
starts from `lmjax.config.default_config()` and overrides fields.
"""
from __future__ import annotations

import ast
import importlib.util
import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped config names."""
    return sorted(f[:-3] for f in os.listdir(DIRECTORY)
                  if f.endswith(".py") and not f.startswith("_"))


def config_file(spec: str) -> str:
    """`NAME[:ARG]` -> `/path/to/lmjax/configs/NAME.py[:ARG]`; an existing file path is kept.

    Raises ValueError naming the shipped configs when `spec` is neither.
    """
    name, sep, arg = spec.partition(":")
    if os.path.isfile(name):
        return spec
    if name in names():
        return os.path.join(DIRECTORY, name + ".py") + sep + arg
    raise ValueError(f"--config={spec!r}: {name!r} is neither a config file nor a shipped config; "
                     f"shipped configs are {', '.join(names())}")


def get(spec: str):
    """The ConfigDict that `--config=spec` gives (`NAME[:ARG]` or `PATH[:ARG]`)."""
    path, _, arg = config_file(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(
        "lmjax_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def describe() -> dict[str, str]:
    """{name: first line of its docstring}, for `lmjax configs`."""
    out = {}
    for name in names():
        with open(os.path.join(DIRECTORY, name + ".py"), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        out[name] = doc.splitlines()[0] if doc else ""
    return out
