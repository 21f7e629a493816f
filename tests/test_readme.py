"""Every command line and Python snippet of README.md runs, against what README's own steps make.

The commands run in order in a scratch copy of the checkout's layout (`experiments/` and
`../shared` linked in), after the command `make demo` runs (read from the Makefile). `lmjax train`
lines get overrides that make them a few steps long (and GPT-2 124M and nanoGPT's
shakespeare_char model, when trained from scratch, one-layer models of the same config), and
nothing else: every other flag is README's. Lines that cannot run here are
listed in NOT_RUN with the reason; any other kind of line fails the test until it is classified.
"""
import os
import re
import shlex
import subprocess
import sys

from conftest import write_random_gpt2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Line prefix -> why the test does not run it.
NOT_RUN = {
    "make": "the Makefile's targets: `make demo`'s command runs first, `make test` is this suite",
    "source": "activates .venv; the test runs .venv's own `lmjax`",
    "pip install": "installs; tests/test_package.py installs the package into a fresh venv",
    "hf download": "needs the internet: the test writes a random GPT-2 folder to models/gpt2",
    "tensorboard": "a viewer that runs until stopped",
    "gcloud": "a TPU pod",
}
SHORT_RUN = ["--config.train.num_steps=2", "--config.optim.warmup_steps=1",
             "--config.train.eval_batches=1", "--config.train.final_eval_batches=0",
             "--config.train.num_samples=0"]
SMALL_MODEL = ["--config.model.num_layers=1", "--config.model.embed_dim=64",
              "--config.model.num_heads=4", "--config.model.mlp_dim=128",
              "--config.data.seq_len=64"]


def readme_blocks(language: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    """Command lines of README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip() if not line.startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def demo_command() -> list[str]:
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    recipe = re.search(r"^demo:.*\n\t(.*(?:\\\n.*)*)", makefile, flags=re.M).group(1)
    return shlex.split(recipe.replace("\\\n", " ").replace("$(BIN)/", ""))


def argv(words: list[str]) -> list[str]:
    """`lmjax ...` runs the lmjax command next to this Python; `python ...` this Python."""
    if words[0] == "lmjax":
        command = os.path.join(os.path.dirname(sys.executable), "lmjax")
        return ([command] if os.path.exists(command) else [sys.executable, "-m", "lmjax"]) + words[1:]
    if words[0] == "python":
        return [sys.executable] + words[1:]
    raise AssertionError(f"README command of an unknown kind: {' '.join(words)}")


def run(words, cwd, **env):
    if words[:2] == ["lmjax", "train"] or words[:2] == ["python", "experiments/train.py"]:
        from_scratch = not any(w.startswith("--config.init_from=") for w in words)
        large = "--config=gpt2_124m" in words or "--config=shakespeare_char" in words
        words = words + SHORT_RUN + (SMALL_MODEL if large and from_scratch else [])
    done = subprocess.run(argv(words), cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert done.returncode == 0, f"{' '.join(words)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_readme_commands_and_snippets_run(tmp_path, tiny_shakespeare):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    os.symlink(os.path.join(ROOT, "experiments"), checkout / "experiments")
    os.symlink(os.path.join(ROOT, "..", "shared"), tmp_path / "shared")
    write_random_gpt2(str(checkout / "models" / "gpt2"), tiny_shakespeare[:200_000],
                      vocab_size=400, n_positions=256)

    demo = demo_command()
    assert demo[:3] == ["lmjax", "train", "--config=shakespeare_char:demo"], demo
    run(demo, checkout)

    commands = readme_commands()
    assert len(commands) >= 10, commands
    ran = 0
    for line in commands:
        if any(line.startswith(prefix) for prefix in NOT_RUN):
            continue
        words = shlex.split(line)
        # Commands that lay out 8 devices get 8 simulated ones.
        env = ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
               if any(w.startswith("--config.mesh.") for w in words) else {})
        out = run(words, checkout, **env)
        if words[:2] == ["lmjax", "sample"]:
            prompt = next(w.split("=", 1)[1] for w in words if w.startswith("--prompt="))
            assert ("-" * 40 + "\n" + prompt) in out, out[-2000:]
        if words[:2] == ["lmjax", "configs"]:
            assert "shakespeare_char" in out
        ran += 1
    assert ran >= 7  # train, sample and HF lines all ran

    snippets = readme_blocks("python")
    assert len(snippets) >= 3
    for snippet in snippets:
        done = subprocess.run([sys.executable, "-c", snippet], cwd=checkout, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode == 0, f"{snippet}\n{done.stderr[-4000:]}"
    assert (checkout / "models" / "exported" / "config.json").exists()  # hf.save_hf ran
