"""lm-evaluation-harness speed: lmjax's `lmjax` model vs lm_eval's own `hf` (PyTorch) model, CPU.

The same random weights in both (a GPT-2 folder written by transformers, read by `hf.load_hf`),
the same three local tasks through lm_eval's `simple_evaluate`, one backend after the other:

  * mc: 4-choice multiple choice (context = 3 lines of tiny shakespeare, choices = the true next
    line and 3 others), acc / acc_norm;
  * ppl: loglikelihood_rolling over documents of ~40 lines (several 1,024-token windows);
  * gen: generate_until, greedy, 32 new tokens, stop at a newline.

Reported per task and backend: wall time (lmjax's includes its jit compiles, reported apart by a
second, warm run), tokens/s (tokens scored or generated per second) and the metrics (which must
agree). Also the speed-up of `evaluate.score_choices` (context prefilled once into the KV cache,
choices scored from it) over `evaluate.score_sequences` (every full sequence) on the mc task.

    python benchmarks/eval_speed.py                # GPT-2 124M shapes
    python benchmarks/eval_speed.py --small        # 4 layers x 256 wide (a quick check)

Prints a JSON object and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import _env  # benchmarks/_env.py: versions and machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
SHAPES = {"gpt2_124m": dict(n_layer=12, n_embd=768, n_head=12),
          "small": dict(n_layer=4, n_embd=256, n_head=4)}


def write_model(folder: str, text: str, shape: dict) -> None:
    """A random GPT-2 (vocab 50,257, context 1,024) with a byte-level BPE trained on `text`."""
    import tokenizers
    import torch
    import transformers
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(os.path.join(folder, "tokenizer.json"))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=1024, bos_token_id=0, eos_token_id=0, **shape))
    model.save_pretrained(folder)


def write_tasks(folder: str, lines: list[str]) -> list[str]:
    """The three YAML tasks over JSONL documents made from `lines`; returns the task names."""
    rng = np.random.default_rng(0)
    mc = []
    for i in range(0, 30 * 40, 40):
        others = rng.choice(len(lines), 3, replace=False)
        choices = [lines[i + 3]] + [lines[j] for j in others]
        order = rng.permutation(4)
        mc.append({"context": "\n".join(lines[i:i + 3]) + "\n",
                   "choices": [choices[k] for k in order], "label": int(np.argmin(order))})
    docs = {"mc": mc,
            "ppl": [{"text": "\n".join(lines[i:i + 150])} for i in range(0, 8 * 150, 150)],
            "gen": [{"prompt": "\n".join(lines[i:i + 2]) + "\n", "answer": lines[i + 2]}
                    for i in range(0, 16 * 20, 20)]}
    bodies = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
              'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
              "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
               "  do_sample: false\n  max_gen_toks: 32\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, body in bodies.items():
        data = os.path.join(folder, f"bench_{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs[name])
        with open(os.path.join(folder, f"bench_{name}.yaml"), "w") as f:
            f.write(f"task: bench_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data}\ntest_split: test\n{body}")
    return [f"bench_{name}" for name in bodies], docs


def run_backend(model, task, manager):
    import lm_eval
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager,
                                  batch_size=8, device="cpu")
    seconds = time.perf_counter() - start
    metrics = {k.split(",")[0]: v for k, v in out["results"][task].items()
               if isinstance(v, float) and "stderr" not in k}
    return seconds, metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="4 layers x 256 wide")
    args = parser.parse_args()
    shape_name = "small" if args.small else "gpt2_124m"
    import lm_eval  # noqa: F401 - the `eval` extra
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from lmjax import evaluate
    from lmjax.lm_eval_model import LmjaxLM

    text = open(TEXT, encoding="utf-8").read()
    lines = [line for line in text.splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        write_model(tmp, text, SHAPES[shape_name])
        tasks, docs = write_tasks(tmp, lines)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        backends = {"hf": get_model("hf")(pretrained=tmp, dtype="float32", batch_size=8,
                                          device="cpu"),
                    "lmjax": LmjaxLM(hf_model=tmp, batch_size=8)}
        tok = backends["lmjax"].tok_encode
        tokens = {"bench_mc": sum(len(tok(d["context"] + c)) - len(tok(d["context"]))
                                  for d in docs["mc"] for c in d["choices"]),
                  "bench_ppl": sum(len(tok(d["text"])) for d in docs["ppl"]),
                  "bench_gen": None}
        rows = []
        for task in tasks:
            row = {"task": task, "tokens": tokens[task]}
            for name, model in backends.items():
                seconds, metrics = run_backend(model, task, manager)
                if name == "lmjax":  # again, compiled
                    row["lmjax_cold_s"] = seconds
                    seconds, metrics = run_backend(model, task, manager)
                row[f"{name}_s"], row[f"{name}_metrics"] = seconds, metrics
            row["speedup"] = row["hf_s"] / row["lmjax_s"]
            rows.append(row)
        # The shared-context cache against full sequences, on the mc task's requests.
        lm = backends["lmjax"]
        pairs = [evaluate.encode_pair(lm.tok_encode, d["context"], c, 0)
                 for d in docs["mc"] for c in d["choices"]]
        groups = [(pairs[i][0], [p[1] for p in pairs[i:i + 4]]) for i in range(0, len(pairs), 4)]
        timings = {}
        for name, fn, arg in (("cached", evaluate.score_choices, groups),
                              ("full", evaluate.score_sequences, pairs)):
            fn(lm.params, lm.model_config, arg, 8)  # compile
            start = time.perf_counter()
            fn(lm.params, lm.model_config, arg, 8)
            timings[name] = time.perf_counter() - start
    env = _env.environment(peers=("torch", "transformers", "lm-eval"))
    result = {"shape": shape_name, "rows": rows, "mc_cache_s": timings,
              "mc_cache_speedup": timings["full"] / timings["cached"], **env}
    print(json.dumps(result, indent=1))
    print(_env.measured_with(env, ("jax", "torch", "transformers", "lm-eval")))
    print(f"\n| task ({shape_name}) | hf s | lmjax s (cold) | speed-up | hf metrics | lmjax metrics |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda m: ", ".join(f"{k} {v:.4g}" for k, v in m.items())  # noqa: E731
        print(f"| {r['task']} | {r['hf_s']:.1f} | {r['lmjax_s']:.1f} ({r['lmjax_cold_s']:.1f}) "
              f"| {r['speedup']:.2f}x | {fmt(r['hf_metrics'])} | {fmt(r['lmjax_metrics'])} |")
    print(f"\nmc scoring: shared-context cache {timings['cached']:.2f} s vs full sequences "
          f"{timings['full']:.2f} s ({result['mc_cache_speedup']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
