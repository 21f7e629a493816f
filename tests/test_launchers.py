"""The absl launchers and the fine-tuning path from a Hugging Face folder, end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_random_gpt2
from lmjax import data as data_lib
from lmjax import run_config
from lmjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def run(args, **kwargs):
    done = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"), **kwargs)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, pigs_text):
    """A random GPT-2 with a byte-level BPE trained here, saved as Hugging Face files."""
    folder = str(tmp_path_factory.mktemp("gpt2"))
    return folder, write_random_gpt2(folder, pigs_text, vocab_size=300, n_positions=64)


def test_finetune_from_hf_folder_starts_from_its_weights(tmp_path, gpt2_folder, tiny_config):
    import torch
    folder, hf_model = gpt2_folder
    config = tiny_config(num_steps=3, log_every=1, eval_every=0, eval_batches=2)
    config.data.batch_size, config.model.max_len = 4, 64
    config.optim.warmup_steps, config.optim.learning_rate = 1, 1e-3
    config.init_from = f"hf:{folder}"
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["model_config"].num_layers == 2 and result["tokenizer"].kind == "hf"
    # The first step's loss is the loss of the imported weights on batch 0: recompute it in
    # PyTorch on the same batch.
    batch = data_lib.build_data(run_config.prepare_config(config)).train.batch(0)
    with torch.no_grad():
        logits = hf_model(torch.from_numpy(batch["inputs"]).long()).logits
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch["targets"]).long().reshape(-1),
            reduction="none").numpy()
    mask = batch["mask"].reshape(-1)
    expected = (losses * mask).sum() / mask.sum()
    np.testing.assert_allclose(result["train_loss"][0], expected, rtol=1e-5)
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_train_and_sample_launchers(tmp_path, pigs_text):
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from lmjax.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.data.source, c.data.train_files = 'files', {str(tmp_path / 'corpus.txt')!r}\n"
        "    return c\n")
    (tmp_path / "corpus.txt").write_text(pigs_text)
    workdir = str(tmp_path / "run")
    out = run(["experiments/train.py", f"--config={config_file}", f"--workdir={workdir}",
               "--config.model.num_layers=1", "--config.model.embed_dim=32",
               "--config.model.num_heads=2", "--config.model.mlp_dim=64",
               "--config.data.seq_len=32", "--config.data.batch_size=4",
               "--config.optim.warmup_steps=1", "--config.train.num_steps=4",
               "--config.train.eval_every=0", "--config.train.eval_batches=1",
               "--config.train.num_samples=2", "--config.train.sample_len=20",
               "--config.train.sample_prompt=7 little", "--config.train.progress_bar=false"])
    assert out.count("-" * 40 + "\n7 little") == 2  # end-of-run samples from the KV-cache sampler
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert sum('"loss"' in line for line in f) == 4

    out = run(["experiments/sample.py", f"--workdir={workdir}", "--prompt=3 little",
               "--prompt=9 pigs", "--num_samples=2", "--max_new_tokens=10", "--greedy"])
    samples = out.split("-" * 40 + "\n")[1:]
    assert len(samples) == 4 and samples[0] == samples[1]  # greedy: the same twice
    assert samples[0].startswith("3 little") and samples[2].startswith("9 pigs")

    bad = subprocess.run([sys.executable, "experiments/sample.py", f"--workdir={workdir}",
                          "--top_p=1.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "sampling.top_p=1.5 must be in (0, 1]" in bad.stderr


def test_sample_launcher_from_hf_folder(gpt2_folder):
    folder, _ = gpt2_folder
    out = run(["experiments/sample.py", f"--hf_model={folder}", "--prompt=3 little",
               "--max_new_tokens=8", "--greedy"])
    assert out.split("-" * 40 + "\n")[1].startswith("3 little")
