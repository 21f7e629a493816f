"""What a benchmark ran against: package versions and the machine, for its JSON output.

The benchmark scripts are run as `python benchmarks/X.py`, so this folder is `sys.path[0]` and
they `import _env`. Versions come from the installed distributions' metadata
(`importlib.metadata.version`), which imports nothing.

    env = _env.environment(peers=("torch", "transformers"))   # {"versions": ..., "machine": ...}
    print(_env.measured_with(env))   # measured with: jax 0.10.2, torch 2.13.0, transformers 5.24.0
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

# The stack every benchmark runs on (distribution names, as pip spells them).
CORE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_HERE = os.path.dirname(os.path.abspath(__file__))


def version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """`git describe --always --dirty` of the checkout holding this folder, or None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=_HERE,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine: OS, architecture, CPU model, CPU count (all and usable by this process)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable}


def environment(peers: tuple[str, ...] = ()) -> dict:
    """{"versions": python, lmjax (+ git commit), the core stack and `peers`, "machine": ...}.

    `peers` are the other frameworks the benchmark measures against (e.g. torch, transformers).
    """
    versions = {"python": platform.python_version(), "lmjax": version("lmjax"),
                "lmjax_git": _git_commit()}
    versions.update({name: version(name) for name in (*CORE, *peers)})
    return {"versions": versions, "machine": machine()}


def measured_with(env: dict, names: tuple[str, ...] = ("jax", "torch", "transformers")) -> str:
    """One line for above a Markdown table: "measured with: jax X, torch Y, transformers Z".

    Names the benchmark did not record (e.g. torch in an lmjax-only run) are left out.
    """
    versions = env["versions"]
    shown = ", ".join(f"{name} {versions[name]}" for name in names if versions.get(name))
    cpus = env["machine"]["cpus_usable"]
    return f"measured with: {shown} (python {versions['python']}, {cpus} CPUs)"
