"""Accuracy of bf16 and int8 inference (lmjax/quantize.py) against float32, on trained models.

For each model: validation perplexity (non-overlapping windows of the model's context, scored
through the KV cache, so the int8 cache's error counts too) and greedy-token agreement with the
float32 model (8 prompts from the validation text, up to 256 new tokens each, or what fits the
context) for float32, bfloat16, int8 weights, int8 weights + int8 KV cache, and int8 with a
scale per block of 32 input channels (int8_g32, Q8_0's blocks). Greedy agreement counts every
token after the first divergence as different (a near-tie in a weakly trained model ends it);
the teacher-forced top-1 agreement (the argmax at every scored validation position, equal to
float32's) does not.

    python benchmarks/quantize_quality.py --workdir=workdirs/demo         # an existing run
    python benchmarks/quantize_quality.py --train=char --train=bpe         # train them first
    python benchmarks/quantize_quality.py --train=llama100m --steps=300    # LLaMA-style ~100M
    python benchmarks/quantize_quality.py --train=llama100m --steps=300 --train_dtype=bfloat16

--train recipes (trained into --scratch, on the embedded Shakespeare corpus): char
(`shakespeare_char:demo`, what `make demo` trains), bpe (`shakespeare_bpe:demo`, SentencePiece
BPE, 1024 pieces), llama100m (LLaMA-style 12 layers x 768, byte tokenizer, context 256: 76M
parameters, the byte vocabulary leaving out llama_125m's 49M of embeddings; 300 steps take
~15 minutes in bfloat16 on a 2-core CPU with bf16 units, 10 steps fit a loaded 2-core AVX2
one). Goal (issue 20): int8 weights within 1% of float32's perplexity, >= 98% greedy
agreement over 256 tokens.

Prints JSON and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import checkpoint, configs, data, quantize, sample, train
from lmjax.config import preset_fields
from lmjax.attention import init_kv_cache
from lmjax.model import Transformer

VARIANTS = ("float32", "bfloat16", "int8", "int8 + int8 KV", "int8_g32")


def recipe(name: str, steps: int | None,
           train_dtype: str = "float32") -> ml_collections.ConfigDict:
    """The experiment config of a --train recipe (trained with compute dtype `train_dtype`;
    the float32 row always evaluates in float32)."""
    if name == "char":
        config = configs.get("shakespeare_char:demo")
    elif name == "bpe":
        config = configs.get("shakespeare_bpe:demo")
    elif name == "llama100m":
        config = configs.get("shakespeare_char:demo")
        config.tokenizer.kind = "byte"
        config.model.update(preset_fields("llama_125m", vocab_size=0, max_len=256))
        config.data.seq_len, config.data.batch_size = 256, 8
        config.train.num_steps = 300
    else:
        raise SystemExit(f"--train={name!r}: one of char, bpe, llama100m")
    if steps:
        config.train.num_steps = steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, max(steps // 2, 1))
    config.train.update(num_samples=0, progress_bar=False, eval_every=0)
    config.model.dtype = train_dtype
    return config


def variant(params, model_config, name: str):
    """(params, model_config) of one variant, converted once."""
    if name == "int8 + int8 KV":
        params, model_config = quantize.convert(params, model_config, "int8")
        return params, quantize.with_int8_kv_cache(model_config)
    return quantize.convert(params, model_config, name)


def cached_perplexity(params, model_config, ids: list[int], batch: int = 8,
                      max_windows: int = 64) -> tuple[float, np.ndarray]:
    """Token perplexity of non-overlapping context-long windows, through the KV cache, and the
    argmax token at every scored position (for the teacher-forced top-1 agreement)."""
    L = model_config.max_len
    windows = [ids[i:i + L + 1] for i in range(0, len(ids) - L - 1, L)][:max_windows]

    @jax.jit
    def nll(params, tokens_BxL1):
        cache = init_kv_cache(model_config, tokens_BxL1.shape[0], L)
        logits, _ = Transformer(model_config).apply({"params": params}, tokens_BxL1[:, :-1],
                                                    kv_cache=cache, cache_index=0)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(logp, tokens_BxL1[:, 1:, None], -1).sum(), logits.argmax(-1)

    total, top1 = 0.0, []
    for start in range(0, len(windows) - batch + 1, batch):
        window_nll, argmax = nll(params, jnp.asarray(windows[start:start + batch], jnp.int32))
        total, top1 = total + float(window_nll), top1 + [np.asarray(argmax)]
    scored = (len(windows) // batch) * batch * L
    return math.exp(total / scored), np.concatenate(top1)


def greedy(params, model_config, prompts, new_tokens: int) -> np.ndarray:
    sampling = sample.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    return np.asarray(sample.generate(params, model_config, prompts, sampling).tokens)


def evaluate_model(params, model_config, tokenizer, val_text: str, new_tokens: int,
                   max_windows: int = 64) -> list:
    ids = tokenizer.encode(val_text)
    prompt_len = min(32, model_config.max_len // 4)
    new_tokens = min(new_tokens, model_config.max_len - prompt_len)
    starts = np.linspace(0, len(ids) - prompt_len - 1, 8).astype(int)
    prompts = [ids[s:s + prompt_len] for s in starts]
    rows, reference = [], None
    for name in VARIANTS:
        vparams, vconfig = variant(params, model_config, name)
        start = time.perf_counter()
        ppl, top1 = cached_perplexity(vparams, vconfig, ids, max_windows=max_windows)
        tokens = greedy(vparams, vconfig, prompts, new_tokens)
        reference = (tokens, top1) if reference is None else reference
        same = tokens == reference[0]
        first_diff = [int(row.argmin()) if not row.all() else new_tokens for row in same]
        rows.append(dict(variant=name, perplexity=ppl, weight_mb=quantize.weight_bytes(vparams)
                         / 1e6, greedy_agreement=float(same.mean()),
                         first_divergence_mean=float(np.mean(first_diff)),
                         top1_agreement=float((top1 == reference[1]).mean()),
                         top1_positions=int(top1.size),
                         new_tokens=new_tokens, seconds=time.perf_counter() - start))
        rows[-1]["perplexity_vs_f32"] = ppl / rows[0]["perplexity"] - 1
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", action="append", default=[], help="an existing run")
    parser.add_argument("--train", action="append", default=[], help="char | bpe | llama100m")
    parser.add_argument("--steps", type=int, default=None, help="training steps of --train")
    parser.add_argument("--train_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of --train (bfloat16: mixed precision, the fast "
                        "choice on CPUs with bf16 units)")
    parser.add_argument("--scratch", default="/tmp/lmjax_quantize_quality")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64, help="validation windows scored")
    args = parser.parse_args()
    env = _env.environment()
    load_before = os.getloadavg()
    runs = [(w, w) for w in args.workdir]
    for name in args.train:
        workdir = os.path.join(args.scratch, f"{name}_{args.steps or 'default'}"
                               + ("_bf16" if args.train_dtype == "bfloat16" else ""))
        if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
            print(f"training {name} into {workdir}", flush=True)
            train.train_and_evaluate(recipe(name, args.steps, args.train_dtype), workdir)
        runs.append((name, workdir))
    report = []
    for name, workdir in runs:
        params, model_config, tokenizer = checkpoint.load_params(workdir)
        saved = checkpoint.read_checkpoint_info(workdir)["config"]
        val_docs = data.load_texts(ml_collections.ConfigDict(saved["data"]))[1]
        rows = evaluate_model(params, model_config, tokenizer, "\n".join(val_docs),
                              args.new_tokens, args.windows)
        report.append(dict(model=name, workdir=workdir, params=sum(
            x.size for x in jax.tree.leaves(params)), rows=rows))
    print(json.dumps(dict(environment=env, load_average_before=load_before,
                          load_average_after=os.getloadavg(), models=report), indent=1))
    print("\n" + _env.measured_with(env))
    print("\n| model | weights | weight MB | val perplexity | vs float32 | greedy agreement "
          "| first divergence (mean) | top-1 = float32 (teacher-forced) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model in report:
        for r in model["rows"]:
            print(f"| {model['model']} ({model['params'] / 1e6:.1f}M) | {r['variant']} | "
                  f"{r['weight_mb']:.1f} | {r['perplexity']:.4f} | {r['perplexity_vs_f32']:+.3%} "
                  f"| {r['greedy_agreement']:.1%} of {r['new_tokens']} | "
                  f"{r['first_divergence_mean']:.0f} | {r['top1_agreement']:.2%} of "
                  f"{r['top1_positions']} |")


if __name__ == "__main__":
    main()
