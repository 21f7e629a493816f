"""lmjax's lm-evaluation-harness model against lm_eval's own `hf` model on the same weights, with
lm_eval's `simple_evaluate` on local YAML tasks over local JSONL files (nothing downloaded)."""
import glob
import json
import os
import subprocess
import sys

import lm_eval  # the `eval` extra (also in `test`)
import numpy as np
import pytest

from conftest import write_random_gpt2
from lmjax import lm_eval_model  # noqa: F401 - registers the `lmjax` model

TASKS = {
    "lmjax_test_mc": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "lmjax_test_ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "lmjax_test_gen": """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", ";"]
  do_sample: false
  max_gen_toks: 12
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder, lines):
    """The three tasks' YAML files and JSONL documents (10 each) in `folder`."""
    docs = {
        "lmjax_test_mc": [{"context": lines[i], "choices": [lines[i + 1], lines[i + 5],
                                                           lines[i + 2][:20], "pigs"],
                           "label": i % 4} for i in range(0, 50, 5)],
        # Long enough for several of the model's 64-token windows.
        "lmjax_test_ppl": [{"text": "\n".join(lines[i:i + 3 + i % 9])} for i in range(0, 100, 10)],
        "lmjax_test_gen": [{"prompt": lines[i][:12], "answer": lines[i][12:].split(";")[0]}
                           for i in range(10)],
    }
    for name, body in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def model_and_tasks(tmp_path_factory, pigs_text):
    """A random GPT-2 folder and the tasks' folder."""
    folder = tmp_path_factory.mktemp("lm_eval")
    model_dir = folder / "gpt2"
    write_random_gpt2(str(model_dir), pigs_text, vocab_size=300, n_positions=64)
    tasks = folder / "tasks"
    tasks.mkdir()
    write_tasks(tasks, pigs_text.splitlines())
    return model_dir, tasks


@pytest.fixture(scope="module")
def results(model_and_tasks):
    model_dir, tasks = model_and_tasks
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # no indexing of
    # the ~10k built-in task files (30 s)
    out = {}
    for model, args in (("hf", f"pretrained={model_dir},dtype=float32"),
                        ("lmjax", f"hf_model={model_dir}")):
        out[model] = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=list(TASKS), task_manager=manager, batch_size=16,
            device="cpu", log_samples=True)
    return out


def test_multiple_choice_accuracies_equal_hf(results):
    hf, ours = (results[m]["results"]["lmjax_test_mc"] for m in ("hf", "lmjax"))
    assert (ours["acc,none"], ours["acc_norm,none"]) == (hf["acc,none"], hf["acc_norm,none"])
    hf_lls, our_lls = ([r[0][0] for s in results[m]["samples"]["lmjax_test_mc"]
                        for r in s["resps"]] for m in ("hf", "lmjax"))
    assert len(our_lls) == 40
    np.testing.assert_allclose(our_lls, hf_lls, rtol=1e-4)


def test_rolling_perplexities_equal_hf(results):
    hf, ours = (results[m]["results"]["lmjax_test_ppl"] for m in ("hf", "lmjax"))
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours[metric], hf[metric], rtol=1e-4)


def test_generate_until_equals_hf(results):
    hf, ours = (results[m]["results"]["lmjax_test_gen"] for m in ("hf", "lmjax"))
    assert ours["exact_match,none"] == hf["exact_match,none"]
    hf_texts, our_texts = ([s["resps"][0][0] for s in results[m]["samples"]["lmjax_test_gen"]]
                           for m in ("hf", "lmjax"))
    assert our_texts == hf_texts and any(our_texts)


def test_lmjax_lm_eval_command_runs_lm_evals_cli(model_and_tasks, results, tmp_path):
    """`lmjax lm-eval` is lm_eval's own command line with `--model lmjax` (the default here)."""
    model_dir, tasks = model_and_tasks
    lmjax = os.path.join(os.path.dirname(sys.executable), "lmjax")
    command = [lmjax] if os.path.exists(lmjax) else [sys.executable, "-m", "lmjax"]
    done = subprocess.run(command + [
        "lm-eval", "--model_args", f"hf_model={model_dir}", "--tasks", "lmjax_test_gen",
        "--include_path", str(tasks), "--batch_size", "16", "--output_path", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-4000:]
    [written] = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    with open(written, encoding="utf-8") as f:
        ours = json.load(f)
    assert ours["config"]["model"] == "lmjax" and ours["config"]["model_source"] == str(model_dir)
    hf = results["hf"]["results"]["lmjax_test_gen"]
    assert ours["results"]["lmjax_test_gen"]["exact_match,none"] == hf["exact_match,none"]
