"""lmjax as a package: a wheel installed into a fresh virtual environment outside the checkout,
its `lmjax` command and shipped configs, command-line errors before any compute, and imports
that run one way (no cycle inside lmjax/, imports inside functions included)."""
import ast
import graphlib
import os
import subprocess
import sys
import sysconfig

import pytest

import lmjax
from lmjax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lmjax_import_graph() -> dict[str, set[str]]:
    """{module: lmjax modules it imports}, from every import statement of lmjax/ (ast)."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "lmjax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in imported if m in modules and m not in (module, "lmjax")}
    return graph


def test_no_import_cycle_inside_lmjax():
    graph = lmjax_import_graph()
    assert {"lmjax.train", "lmjax.config", "lmjax.commands.train"} <= set(graph)
    assert "lmjax.sharding" in graph["lmjax.train"]  # the walk sees real edges
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert not graph["lmjax.config"], "config.py imports nothing from lmjax"
    assert order.index("lmjax.config") < order.index("lmjax.train")


def test_configs_are_the_files_of_lmjax_configs():
    files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "lmjax", "configs"))
                   if f.endswith(".py") and f != "__init__.py")
    assert configs.names() == files
    demo = configs.get("shakespeare_char:demo")
    assert demo.model.max_len == 128 and demo.train.num_steps == 800
    assert configs.get("shakespeare_char").model.num_layers == 6  # nanoGPT's shakespeare_char
    assert not os.path.exists(os.path.join(ROOT, "experiments", "configs"))  # no second copy


def run_command(args, cwd, check=True, **env):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new virtual environment with lmjax installed from a wheel of the checkout; its other
    dependencies are this environment's (a .pth file), so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("package")
    run_command([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ROOT, "-w",
                 str(tmp / "wheels")], cwd=tmp)
    wheel, = (tmp / "wheels").glob("lmjax-*.whl")
    venv = tmp / "venv"
    run_command([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = str(venv / "bin" / "python")
    site = run_command([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp).stdout.strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run_command([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                 str(wheel)], cwd=tmp)
    return {"bin": venv / "bin", "site": site, "cwd": tmp}


def test_installed_lmjax_runs_outside_the_checkout(fresh_venv):
    bin_, cwd = fresh_venv["bin"], fresh_venv["cwd"]
    where = run_command([str(bin_ / "python"), "-c", "import lmjax; print(lmjax.__file__)"],
                        cwd=cwd).stdout.strip()
    assert where.startswith(fresh_venv["site"]), where  # the wheel's copy, not the checkout
    assert run_command([str(bin_ / "lmjax"), "version"], cwd=cwd).stdout.strip() == \
        lmjax.__version__
    listed = run_command([str(bin_ / "lmjax"), "configs"], cwd=cwd).stdout
    assert [line.split()[0] for line in listed.splitlines()] == configs.names()

    workdir = str(cwd / "demo")
    out = run_command([str(bin_ / "lmjax"), "train", "--config=shakespeare_char:demo",
                       f"--workdir={workdir}", "--config.train.num_steps=3",
                       "--config.optim.warmup_steps=1", "--config.train.eval_batches=1",
                       "--config.train.num_samples=1", "--config.train.sample_len=8",
                       "--config.train.sample_prompt=ROMEO."], cwd=cwd).stdout
    assert "starting from scratch" in out and "-" * 40 + "\nROMEO." in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    # `python -m lmjax` is the same command; the default 200 new tokens are capped to the
    # demo model's context of 128 instead of failing.
    out = run_command([str(bin_ / "python"), "-m", "lmjax", "sample", f"--workdir={workdir}",
                       "--prompt=ROMEO.", "--greedy"], cwd=cwd).stdout
    sample = out.split("-" * 40 + "\n")[1]
    assert sample.startswith("ROMEO.") and len(sample) > len("ROMEO.") + 50


@pytest.mark.parametrize("args, message", [
    (["--config=shakespeare_chr"], "'shakespeare_chr' is neither a config file nor a shipped "
                                   "config; shipped configs are gpt2_124m"),
    (["--config=shakespeare_char:demo", "--config.model.num_layerz=3"],
     "config.model has no field 'num_layerz'; did you mean --config.model.num_layers?"),
    (["--config=shakespeare_char:demo", "--config.model.dtype=float16"],
     "model.dtype='float16' is for inference only"),
    (["--config=shakespeare_char:demo", "--config.data.seq_len=4096"],
     "data.seq_len=4096 is not allowed: at most the model's maximum length model.max_len=128"),
])
def test_train_command_errors_name_the_field_before_any_compute(tmp_path, args, message):
    done = run_command([sys.executable, "-m", "lmjax", "train", f"--workdir={tmp_path / 'w'}"]
                       + args, cwd=ROOT, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing was started


def test_unknown_command_lists_the_commands():
    done = run_command([sys.executable, "-m", "lmjax", "trian"], cwd=ROOT, check=False)
    assert done.returncode == 2 and "unknown command 'trian'" in done.stderr
    assert "train" in done.stderr and "sample" in done.stderr
