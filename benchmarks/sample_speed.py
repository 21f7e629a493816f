"""Decoding speed of `lmjax.sample.generate` vs Hugging Face `GPT2LMHeadModel.generate` on CPU.

GPT-2 124M shapes, random f32 weights (the very same weights in both), 32-token prompts, greedy
decoding without end tokens, batch 1 and 8, 128 / 512 / 992 new tokens (1,024 new tokens would
not fit: 32 + 1024 > max_len 1024, so the longest run is 992 = 1024 - 32).

Reported per (batch, new tokens):
  * tokens/s: batch * new tokens / wall time of a whole steady-state call (prefill included);
  * ms/token: decode latency per step, (t(n) - t(1)) / (n - 1), i.e. without the prefill;
  * compile: first call minus steady call (lmjax only; one jit per bucket, batch and config);
  * the memory-bandwidth bound: measured read bandwidth / bytes of f32 weights read per step,
    times the batch (the weights are read once per step for all rows; the KV cache is extra).

    python benchmarks/sample_speed.py            # full run (~10-15 minutes on 2 cores)
    python benchmarks/sample_speed.py --quick    # 128 new tokens only (a few minutes)
    python benchmarks/sample_speed.py --no-hf    # lmjax only
    python benchmarks/sample_speed.py --beam-only    # just the beam-search row (~3 minutes)

Beam search (4 beams, batch 1, 128 new tokens, no end token, so both run every step) is one
more row, timed the same way (a steady call, after a compile / warm-up call), lmjax's
`generate(num_beams=4)` beside HF's `generate(num_beams=4)` on the same weights.

**Weights dtypes** (`--weights`): GPT-2 124M and a LLaMA-style model of similar size (llama_125m:
12 layers x 768, GQA 12/4 heads, SwiGLU, vocab 32000), side by side: lmjax float32, bfloat16
(`--weights_dtype=bfloat16`), int8 weight-only and int8 weights + int8 KV cache (lmjax/quantize.py),
Hugging Face generate in float32 and, on the LLaMA-style model, with PyTorch's own int8 CPU
recipe (`torch.ao.quantization.quantize_dynamic` of every `nn.Linear`; GPT-2's `Conv1D` layers
are not `nn.Linear`, so that recipe does not apply to it). Each row gives tok/s, the bytes a
decode step reads (weights, and the KV cache at the run's mean length) and the fraction of the
bound those bytes set at the measured read bandwidth.

    python benchmarks/sample_speed.py --weights --batches=1 --lengths=128   # a short run
    python benchmarks/sample_speed.py --weights                             # 1 and 8, 128 and 512
    python benchmarks/sample_speed.py --weights --batches=1 --lengths=128 \
        --dtypes=f32,int8,int8_kv8 --rounds=3   # the int8 rows against f32, interleaved

Prints a JSON object and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import _env  # benchmarks/_env.py: versions and machine
from lmjax import sample as sample_lib
from lmjax.config import preset
from lmjax.model import Transformer, count_params, init_params

PROMPT_LEN = 32


# --------------------------------------------------------------------------- machine bandwidth


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` reductions over a `gib` GiB f32 array (numpy and jax)."""
    n = int(gib * 2**30) // 4
    host = np.ones(n, np.float32)
    device = jnp.ones(n, jnp.float32)
    total = jax.jit(jnp.sum)
    total(device).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        host.sum()
        best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        total(device).block_until_ready()
        best = min(best, time.perf_counter() - start)
    del host, device
    return n * 4 / best


def weight_bytes_per_step(params) -> int:
    """f32 weight bytes one decode step reads: every parameter once, but only a row of pos_embed.

    The tied embedding is read once (the logits matmul; the token lookup reads one row).
    """
    pos = params.get("pos_embed")
    return 4 * (count_params(params) - (0 if pos is None else pos.size - pos.shape[1]))


# --------------------------------------------------------------------------- Hugging Face model


def to_hf_gpt2(params, config):
    """An HF `GPT2LMHeadModel` holding lmjax GPT-2 params (exported with `lmjax.hf.save_hf`)."""
    import tempfile

    from transformers import GPT2LMHeadModel

    from lmjax import hf
    with tempfile.TemporaryDirectory() as folder:
        hf.save_hf(folder, config, params, model_type="gpt2")
        return GPT2LMHeadModel.from_pretrained(folder).eval()


def pick_torch_threads(model, prompts: np.ndarray, forced: int = 0) -> int:
    """Torch's intra-op thread count for HF: `forced`, else the faster of 1 and all cores.

    On a shared 2-core machine OpenMP's barriers can make 2 threads several times slower than 1
    (every small op waits for a descheduled thread), so HF gets whichever is faster here.
    """
    import torch

    if forced:
        torch.set_num_threads(forced)
        return forced
    timings = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        hf_generate(model, prompts, 2)
        timings[threads] = min(hf_generate(model, prompts, 16)[1] for _ in range(2))
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    print(f"torch threads: seconds for 16 tokens {timings} -> {best}", flush=True)
    return best


def hf_generate(model, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, num_beams=1)
        seconds = time.perf_counter() - start
    return out[:, prompts.shape[1]:].numpy(), seconds


def hf_beam(model, prompts: np.ndarray, new_tokens: int, beams: int) -> tuple[np.ndarray, float]:
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, num_beams=beams, pad_token_id=0,
                             eos_token_id=None)
        seconds = time.perf_counter() - start
    return out[:, prompts.shape[1]:].numpy(), seconds


def to_hf_llama(params, config):
    """An HF `LlamaForCausalLM` holding lmjax LLaMA-style params (`lmjax.hf.save_hf`)."""
    import tempfile

    from transformers import LlamaForCausalLM

    from lmjax import hf
    with tempfile.TemporaryDirectory() as folder:
        hf.save_hf(folder, config, params, model_type="llama")
        return LlamaForCausalLM.from_pretrained(folder).eval()


def torch_int8(model):
    """PyTorch's dynamic int8 quantization of every nn.Linear (weights int8, activations
    quantized per call), and the bytes a decode step reads with it (Linear weights 1 byte,
    everything else 4)."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()  # one row read per step
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
    return quantized, linear + 4 * (total - linear - embed)


# ------------------------------------------------------------------------------------- lmjax


def lmjax_generate(params, config, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
    sampling = sample_lib.SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    start = time.perf_counter()
    out = sample_lib.generate(params, config, prompts, sampling, rng=0)
    tokens = np.asarray(out.tokens)  # waits for the result
    return tokens, time.perf_counter() - start


def lmjax_beam(params, config, prompts: np.ndarray, new_tokens: int, beams: int
               ) -> tuple[np.ndarray, float]:
    sampling = sample_lib.SamplingConfig(max_new_tokens=new_tokens, num_beams=beams)
    start = time.perf_counter()
    tokens = np.asarray(sample_lib.generate(params, config, prompts, sampling).tokens)
    return tokens, time.perf_counter() - start


def beam_row(params, config, prompts: np.ndarray, hf_model, beams: int = 4,
             new_tokens: int = 128) -> dict:
    """Beam search, batch 1: lmjax's steady call (after the compiling one) beside HF's (after
    a warm-up call)."""
    lmjax_beam(params, config, prompts[:1], new_tokens, beams)
    tokens, steady = lmjax_beam(params, config, prompts[:1], new_tokens, beams)
    row = dict(kind=f"beam search, {beams} beams", batch=1, new_tokens=new_tokens,
               lmjax_total_s=steady, lmjax_tokens_per_s=new_tokens / steady)
    if hf_model is not None:
        hf_beam(hf_model, prompts[:1], 8, beams)
        hf_tokens, hf_seconds = hf_beam(hf_model, prompts[:1], new_tokens, beams)
        agree = (tokens[0] == hf_tokens[0, :new_tokens])
        row.update(hf_total_s=hf_seconds, hf_tokens_per_s=new_tokens / hf_seconds,
                   speedup=hf_seconds / steady,
                   beam_tokens_agree_first=int(new_tokens if agree.all() else np.argmin(agree)))
    return row


def cache_bytes_per_step(config, batch: int, mean_len: float) -> float:
    """KV-cache bytes one decode step reads at `mean_len` cached tokens (keys and values of every
    layer; an int8 cache's scales included)."""
    per_token = 2 * config.num_layers * batch * config.kv_heads
    if config.kv_cache_dtype == "int8":
        return per_token * mean_len * (config.head_size + 4)
    return per_token * mean_len * config.head_size * np.dtype(config.dtype).itemsize


def weights_rows(args, bandwidth: float) -> list[dict]:
    """The --weights table: every dtype of lmjax and the HF peers, per model, batch, length."""
    from lmjax import quantize

    rows = []
    for model_name in args.models.split(","):
        config = preset(model_name)
        params = init_params(config, jax.random.key(0))
        prompts = np.random.RandomState(0).randint(0, config.vocab_size, (8, PROMPT_LEN))
        variants = {}
        for name, dtype, kv in (("lmjax f32", None, False), ("lmjax bf16", "bfloat16", False),
                                ("lmjax int8", "int8", False),
                                ("lmjax int8 + int8 KV", "int8", True),
                                ("lmjax int8_g32 (blocks of 32)", "int8_g32", False)):
            if WEIGHTS_KEYS[name] not in args.dtypes.split(","):
                continue
            vparams, vconfig = quantize.convert(params, config, dtype)
            variants[name] = (vparams, quantize.with_int8_kv_cache(vconfig, kv))
        peers = {}
        if not args.no_hf:
            import torch
            torch.set_num_threads(args.hf_threads or 1)
            hf_model = (to_hf_gpt2 if config.position == "learned" else to_hf_llama)(params, config)
            peers["HF f32"] = (hf_model, weight_bytes_per_step(params))
            if config.position == "rope":  # nn.Linear layers: PyTorch's int8 recipe applies
                peers["HF + torch int8 (quantize_dynamic)"] = torch_int8(to_hf_llama(params, config))
        for batch in [int(b) for b in args.batches.split(",")]:
            for n in [int(x) for x in args.lengths.split(",")]:
                mean_len = PROMPT_LEN + n / 2
                reference, timed = None, {}
                for name, (vparams, vconfig) in variants.items():
                    lmjax_generate(vparams, vconfig, prompts[:batch], n)  # compiles
                for _ in range(args.rounds):  # the variants interleaved; the fastest call kept
                    for name, (vparams, vconfig) in variants.items():
                        tokens, seconds = lmjax_generate(vparams, vconfig, prompts[:batch], n)
                        timed[name] = min(timed.get(name, (tokens, seconds)),
                                          (tokens, seconds), key=lambda t: t[1])
                for name, (vparams, vconfig) in variants.items():
                    tokens, seconds = timed[name]
                    reference = tokens if reference is None else reference
                    wbytes = weight_bytes_per_step(vparams) if name == "lmjax f32" else (
                        quantize.weight_bytes(vparams) - _pos_rows_bytes(vparams))
                    rows.append(_row(model_name, name, batch, n, seconds, wbytes,
                                     cache_bytes_per_step(vconfig, batch, mean_len), bandwidth,
                                     float((tokens == reference).mean())))
                    print(json.dumps(rows[-1]), flush=True)
                for name, (model, wbytes) in peers.items():
                    hf_generate(model, prompts[:batch], 4)  # warm-up
                    tokens, seconds = hf_generate(model, prompts[:batch], n)
                    rows.append(_row(model_name, name, batch, n, seconds, wbytes,
                                     cache_bytes_per_step(config, batch, mean_len), bandwidth,
                                     float((tokens == reference).mean())))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


# --dtypes names of the lmjax rows
WEIGHTS_KEYS = {"lmjax f32": "f32", "lmjax bf16": "bf16", "lmjax int8": "int8",
                "lmjax int8 + int8 KV": "int8_kv8", "lmjax int8_g32 (blocks of 32)": "int8_g32"}


def _pos_rows_bytes(params) -> int:
    """GPT-2's position table minus the one row a step reads."""
    pos = params.get("pos_embed")
    return 0 if pos is None else (pos.size - pos.shape[1]) * pos.dtype.itemsize


def _row(model, name, batch, n, seconds, wbytes, cbytes, bandwidth, agree) -> dict:
    bound = bandwidth / (wbytes + cbytes) * batch
    return dict(model=model, weights=name, batch=batch, new_tokens=n,
                tokens_per_s=batch * n / seconds, weight_mb_per_step=wbytes / 1e6,
                cache_mb_per_step=cbytes / 1e6, bytes_per_token=(wbytes + cbytes) / batch,
                bound_tokens_per_s=bound, fraction_of_bound=batch * n / seconds / bound,
                greedy_agree_with_lmjax_f32=agree)


def print_weights_table(rows: list[dict]) -> None:
    print("\n| model | weights | batch | new tokens | tok/s | x lmjax f32 | weights MB/step "
          "| KV MB/step | bytes/token | bound tok/s | of bound | greedy = f32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in rows:
        key = (r["model"], r["batch"], r["new_tokens"])
        base.setdefault(key, r["tokens_per_s"])
        print(f"| {r['model']} | {r['weights']} | {r['batch']} | {r['new_tokens']} | "
              f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base[key]:.2f}x | "
              f"{r['weight_mb_per_step']:.0f} | {r['cache_mb_per_step']:.1f} | "
              f"{r['bytes_per_token'] / 1e6:.1f} MB | {r['bound_tokens_per_s']:.1f} | "
              f"{r['fraction_of_bound']:.0%} | {r['greedy_agree_with_lmjax_f32']:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 new tokens only")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face")
    parser.add_argument("--beam-only", action="store_true", help="only the beam-search row")
    parser.add_argument("--hf-threads", type=int, default=0,
                        help="torch threads for HF (0: the faster of 1 and all cores)")
    parser.add_argument("--weights", action="store_true",
                        help="the weights-dtype table (f32, bf16, int8 [+ int8 KV], int8_g32, HF)")
    parser.add_argument("--models", default="gpt2_124m,llama_125m", help="--weights: presets")
    parser.add_argument("--batches", default="1,8", help="--weights: batch sizes")
    parser.add_argument("--lengths", default="128,512", help="--weights: new tokens")
    parser.add_argument("--dtypes", default=",".join(WEIGHTS_KEYS.values()),
                        help="--weights: the lmjax rows (f32 first: the ratios' base)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--weights: timed calls per lmjax row, interleaved; the fastest kept")
    args = parser.parse_args()
    if args.weights:
        env = _env.environment(peers=() if args.no_hf else ("torch", "transformers"))
        load_before = os.getloadavg()
        bandwidth = read_bandwidth()
        rows = weights_rows(args, bandwidth)
        print(json.dumps(dict(environment=env, read_bandwidth_gb_s=bandwidth / 1e9,
                              load_average_before=load_before,
                              load_average_after=os.getloadavg(), prompt_len=PROMPT_LEN,
                              rows=rows), indent=1))
        print("\n" + _env.measured_with(env) + f"; read bandwidth {bandwidth / 1e9:.1f} GB/s")
        print_weights_table(rows)
        return
    lengths = [128] if args.quick else [128, 512, 992]
    batches = [1, 8]

    config = preset("gpt2_124m")
    assert PROMPT_LEN + max(lengths) <= config.max_len
    params = init_params(config, jax.random.key(0))
    prompts = np.random.RandomState(0).randint(0, config.vocab_size, (max(batches), PROMPT_LEN))
    load_before = os.getloadavg()
    env = _env.environment(peers=() if args.no_hf else ("torch", "transformers"))

    bandwidth = read_bandwidth()
    weight_bytes = weight_bytes_per_step(params)
    steps_bound = bandwidth / weight_bytes
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, f32 weights {weight_bytes / 1e6:.0f} MB/step"
          f" -> bound {steps_bound:.1f} steps/s", flush=True)

    hf_model = None if args.no_hf else to_hf_gpt2(params, config)
    sanity = {}
    if hf_model is not None:
        import torch
        with torch.inference_mode():
            hf_logits = hf_model(torch.from_numpy(prompts[:1].astype(np.int64))).logits.numpy()
        ours = np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(prompts[:1])))
        sanity["prompt_logits_max_abs_diff"] = float(np.abs(hf_logits - ours).max())
        sanity["hf_torch_threads"] = pick_torch_threads(hf_model, prompts[:1], args.hf_threads)

    results = []
    for batch in [] if args.beam_only else batches:
        batch_prompts = prompts[:batch]
        # Prefill + first token alone (its own compile), to separate prefill from decode.
        lmjax_generate(params, config, batch_prompts, 1)
        _, ours_first_token = lmjax_generate(params, config, batch_prompts, 1)
        hf_first_token = None
        if hf_model is not None:
            _, hf_first_token = hf_generate(hf_model, batch_prompts, 1)
        for n in lengths:
            tokens, first = lmjax_generate(params, config, batch_prompts, n)
            _, steady = lmjax_generate(params, config, batch_prompts, n)
            row = dict(batch=batch, new_tokens=n,
                       lmjax_tokens_per_s=batch * n / steady,
                       lmjax_ms_per_token=1e3 * (steady - ours_first_token) / (n - 1),
                       lmjax_prefill_s=ours_first_token,
                       lmjax_compile_s=first - steady, lmjax_total_s=steady,
                       bound_tokens_per_s=batch * steps_bound)
            if hf_model is not None:
                hf_tokens, hf_seconds = hf_generate(hf_model, batch_prompts, n)
                row.update(hf_tokens_per_s=batch * n / hf_seconds,
                           hf_ms_per_token=1e3 * (hf_seconds - hf_first_token) / (n - 1),
                           hf_total_s=hf_seconds,
                           speedup=hf_seconds / steady)
                agree = (tokens == hf_tokens).all(axis=0)
                row["greedy_tokens_agree_first"] = int(n if agree.all() else np.argmin(agree))
            results.append(row)
            print(json.dumps(row), flush=True)

    beam = beam_row(params, config, prompts, hf_model)
    print(json.dumps(beam), flush=True)

    report = dict(
        model="gpt2_124m (random f32 weights)", prompt_len=PROMPT_LEN,
        note="1024 new tokens do not fit after a 32-token prompt (max_len 1024): 992 is the "
             "longest run",
        jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
        machine=platform.processor() or platform.machine(),
        load_average_before=load_before, load_average_after=os.getloadavg(),
        read_bandwidth_gb_s=bandwidth / 1e9, weight_mb_per_step=weight_bytes / 1e6,
        bound_steps_per_s=steps_bound, **sanity, environment=env, results=results, beam=beam)
    print(json.dumps(report, indent=2))

    print("\n" + _env.measured_with(env))
    print("\n| batch | new tokens | lmjax tok/s | lmjax ms/token | compile s | HF tok/s "
          "| HF ms/token | speedup | bandwidth bound tok/s | lmjax / bound | greedy agree |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        hf = (f"{r['hf_tokens_per_s']:.1f} | {r['hf_ms_per_token']:.1f} | {r['speedup']:.2f}x"
              if "hf_tokens_per_s" in r else "- | - | -")
        agree = r.get("greedy_tokens_agree_first", "-")
        print(f"| {r['batch']} | {r['new_tokens']} | {r['lmjax_tokens_per_s']:.1f} | "
              f"{r['lmjax_ms_per_token']:.1f} | {r['lmjax_compile_s']:.1f} | {hf} | "
              f"{r['bound_tokens_per_s']:.1f} | "
              f"{r['lmjax_tokens_per_s'] / r['bound_tokens_per_s']:.0%} | {agree} |")
    print("\n| decoding | batch | new tokens | lmjax s | lmjax tok/s | HF s | HF tok/s | speedup "
          "| best beam agrees |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    hf = (f"{beam['hf_total_s']:.2f} | {beam['hf_tokens_per_s']:.1f} | {beam['speedup']:.2f}x | "
          f"{beam['beam_tokens_agree_first']}" if "hf_total_s" in beam else "- | - | - | -")
    print(f"| {beam['kind']} | 1 | {beam['new_tokens']} | {beam['lmjax_total_s']:.2f} | "
          f"{beam['lmjax_tokens_per_s']:.1f} | {hf} |")


if __name__ == "__main__":
    main()
