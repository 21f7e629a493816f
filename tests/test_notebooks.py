"""The Colab notebooks in colab/ run top to bottom (small CI setting, `LMJAX_CI=1`).

Each notebook is executed headless with nbclient, in its own temporary directory (its working
directory: checkpoints and figures go there), on a kernel that runs this interpreter. A cell error
fails the test; then the printed outputs are checked for a finite final loss, sample text and the
figures the notebook saves.
"""
import glob
import json
import math
import os
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
CELL_TIMEOUT = 900  # seconds per cell: generous, the machine may be shared
KERNEL = "lmjax-notebook-test"
NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf"


def _kernel_dir(tmp_path_factory) -> str:
    """A Jupyter data dir with one kernel spec that runs this Python (whatever else is installed)."""
    data_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = data_dir / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "lmjax test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(data_dir)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """The kernel's environment: the CI switch on, CPU only, no inherited XLA flags (the sharding
    notebook sets its own). Only JUPYTER_PATH (to find the kernel spec) changes in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", _kernel_dir(tmp_path_factory))
        env = dict(os.environ, LMJAX_CI="1", JAX_PLATFORMS="cpu",
                   MPLBACKEND="module://matplotlib_inline.backend_inline")
        env.pop("XLA_FLAGS", None)
        yield env


def execute(path: str, workdir: str, env: dict) -> tuple[str, set]:
    """Runs the notebook in `workdir`; returns its printed text and the files it wrote there."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # notebooks are stored without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{os.path.basename(path)} is stored with outputs: clear them")
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": workdir}})
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{os.path.basename(path)}: a cell failed:\n{str(e)[-6000:]}")
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stdout":
                texts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                texts.append("\n" + output.get("data", {}).get("text/plain", "") + "\n")
    return "".join(texts), set(os.listdir(workdir))


def final_loss(text: str, label: str = "final validation loss") -> float:
    found = re.findall(rf"{label} ({NUMBER})", text)
    assert found, f"no '{label} X' printed"
    return float(found[-1])


def check_quickstart(text: str, files: set) -> None:
    loss = final_loss(text)
    assert math.isfinite(loss) and loss < math.log(84)  # better than uniform over 84 characters
    assert math.isfinite(final_loss(text, "final train loss"))
    assert "identical: True" in text  # export_params + load_params round trip
    samples = re.findall(r"--- temperature [\d.]+ [^\n]*---\nROMEO:\n(.*?)(?=\n--- |\Z)", text, re.S)
    assert len(samples) >= 2 and all(len(s.strip()) > 20 for s in samples), samples
    assert {"quickstart_training.png", "quickstart_loss_vs_tokens.png"} <= files


def check_finetune_pretrained(text: str, files: set) -> None:
    diff = float(re.search(rf"max abs logit difference lmjax vs transformers: ({NUMBER})", text)[1])
    assert diff < 1e-3
    before = float(re.search(rf"validation perplexity before: ({NUMBER})", text)[1])
    after = float(re.search(rf"validation perplexity after: ({NUMBER})", text)[1])
    assert math.isfinite(after) and after < before
    assert math.isfinite(final_loss(text))
    assert "--- after fine-tuning ---" in text
    assert "finetune_training.png" in files


def check_tpu_sharding(text: str, files: set) -> None:
    assert "8 devices" in text
    assert math.isfinite(final_loss(text))
    assert "data-parallel and FSDP losses match: True" in text
    assert {"tpu_sharding_layout.png", "tpu_sharding_memory.png"} <= files


CHECKS = {"quickstart.ipynb": check_quickstart,
          "finetune_pretrained.ipynb": check_finetune_pretrained,
          "tpu_sharding.ipynb": check_tpu_sharding}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_metadata(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "colab-badge" in nb.cells[0].source
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "LMJAX_CI" in parameters[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, kernel_env):
    name = os.path.basename(path)
    assert name in CHECKS, f"{name} has no output checks in tests/test_notebooks.py"
    text, files = execute(path, str(tmp_path), kernel_env)
    CHECKS[name](text, files)
