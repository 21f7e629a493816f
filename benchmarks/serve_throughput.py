"""Serving throughput and latency of `lmjax-serve` (lmjax/serve.py behind lmjax/serve_http.py) on
CPU, against the same requests sent one at a time and against Hugging Face generate.

GPT-2 124M shapes (random f32 weights, `--layers` to shrink), random prompts of 32-256 tokens,
128 new tokens each (no end token), streamed over HTTP on 127.0.0.1 by one asyncio loop that
keeps `concurrency` requests in flight. Reported per row:
  * output tokens/s: all generated tokens / wall time of the row;
  * TTFT p50/p99: request sent -> first streamed token;
  * per-token latency p50/p99: gaps between a request's consecutive streamed tokens;
  * engine: where the engine thread's time went (Engine.seconds: idle, admit = prefill and
    insert, step = launch and wait, output = detokenizing / stop strings / chunks; the step's
    launch and device wait; steps and active rows per step).
Rows: the server (--slots decode slots) at concurrency 1, 4, 16, 32; the same requests one at a
time through a one-slot server ("no batching", --sequential_requests of them); and Hugging Face
`GPT2LMHeadModel.generate` with a TextIteratorStreamer (what `pipeline("text-generation")` runs
for one prompt), one request at a time behind the same client loop (the pipeline has no
continuous batching). Concurrency above --slots is a legitimate row too: the rest queue.

The load on a shared machine drifts, so the rows run in a palindrome: the references (one at a
time, HF, concurrency 1) run the first half of their requests first, the batched rows next, then
the references' second halves in mirrored order; each row pools its segments (tokens over summed
wall time) and reports the 1-minute load average at each segment's start and end.

    python benchmarks/serve_throughput.py                      # the full run (long on 2 cores)
    python benchmarks/serve_throughput.py --layers=1 --new_tokens=4 --requests=4 \
        --concurrency=1,2 --prompt_max=40                      # a smoke test

Prints one JSON object per segment, then the JSON summary and a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time

import httpx
import jax
import numpy as np
import uvicorn

import _env  # benchmarks/_env.py: versions and machine
from lmjax import serve, serve_http
from lmjax.config import preset
from lmjax.model import init_params


class IdTokenizer:
    """Token ids as text ("<id>"): random weights need no real vocabulary."""

    kind, bos_id, eos_id, pad_id = "ids", None, None, None

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [int(t) for t in text.strip("<>").split("><") if t]

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


def start_server(params, config, slots, cache_len):
    engine = serve.Engine(params, config, IdTokenizer(config.vocab_size), slots=slots,
                          cache_len=cache_len, max_queue=4096)
    compile_s = engine.start()
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(serve_http.make_app(engine, "bench"),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop():
        server.should_exit = True
        thread.join()
        engine.stop()
    return url, stop, compile_s, engine


async def http_request(client, prompt, new_tokens):
    """Token arrival times of one streamed completion (send time first)."""
    times = [time.perf_counter()]
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text = json.loads(line[6:])["choices"][0]["text"]
                times += [time.perf_counter()] * text.count("<")
    return times


async def client_loop(send, prompts, concurrency):
    limit = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with limit:
            return await send(prompt)
    start = time.perf_counter()
    runs = await asyncio.gather(*(one(p) for p in prompts))
    return runs, time.perf_counter() - start


def summarize(name, concurrency, segments, new_tokens):
    """One row from its segments (each {"runs", "wall", "load", "engine"?}): tokens/s over the
    segments' summed wall time, percentiles over all their requests."""
    runs = [t for s in segments for t in s["runs"]]
    wall = sum(s["wall"] for s in segments)
    ttft = [t[1] - t[0] for t in runs]
    gaps = np.concatenate([np.diff(t[1:]) for t in runs])
    tokens = sum(len(t) - 1 for t in runs)
    assert tokens == len(runs) * new_tokens, (tokens, len(runs), new_tokens)
    pct = lambda x, q: float(np.percentile(x, q))  # noqa: E731
    row = {"name": name, "concurrency": concurrency, "requests": len(runs), "tokens": tokens,
           "wall_s": wall, "tokens_per_s": tokens / wall,
           "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
           "token_p50_ms": 1e3 * pct(gaps, 50), "token_p99_ms": 1e3 * pct(gaps, 99),
           "prompt_tokens_mean": float(np.mean([s["prompt_tokens_mean"] for s in segments])),
           "segments": [s["order"] for s in segments],
           "load_1min": [x for s in segments for x in s["load"]]}
    if "engine" in segments[0]:
        row["engine"] = profile_sum([s["engine"] for s in segments])
    return row


def profile(engine, before=None):
    """Where the engine thread's time went (seconds per phase, decode steps, active rows per
    step), since `before` (an earlier profile)."""
    now = {**engine.seconds, "step_dispatch": engine.batch.dispatch_seconds,
           "step_device": engine.batch.device_seconds, "steps": engine.steps,
           "row_steps": engine.row_steps}
    if before is None:
        return now
    return {k: v - before[k] for k, v in now.items()}


def profile_sum(profiles):
    out = {k: round(sum(p[k] for p in profiles), 3) for k in profiles[0]}
    out["rows_per_step"] = round(out["row_steps"] / max(out["steps"], 1), 2)
    out["step_ms"] = round(1e3 * (out["step"] + out["output"]) / max(out["steps"], 1), 1)
    return out


def server_segment(url, engine, prompts, concurrency, new_tokens):
    """`prompts` through the server at `concurrency`: runs, wall time, engine profile."""
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
            await http_request(client, prompts[0], 2)  # a warm connection pool
            before = profile(engine)
            runs, wall = await client_loop(lambda p: http_request(client, p, new_tokens),
                                           prompts, concurrency)
            return {"runs": runs, "wall": wall, "engine": profile(engine, before)}
    return asyncio.run(run())


def hf_generator(params, config, new_tokens, threads):
    """HF `GPT2LMHeadModel.generate` with a TextIteratorStreamer (what transformers'
    `pipeline("text-generation")` runs for one prompt, its streamer the one its docs give for
    serving) on the same weights: a function prompt -> token arrival times, one request at a
    time (a lock)."""
    import tempfile

    import torch
    from transformers import GPT2LMHeadModel, TextIteratorStreamer

    from lmjax import hf
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_hf(folder, config, params, model_type="gpt2")
        model = GPT2LMHeadModel.from_pretrained(folder).eval()

    class Streamer(TextIteratorStreamer):  # one "<>" per token id instead of decoded text
        def put(self, value):
            if self.next_tokens_are_prompt:  # generate puts the prompt first
                self.next_tokens_are_prompt = False
                return
            self.text_queue.put("<>" * value.numel())

    lock = threading.Lock()

    def generate(prompt):
        with lock, torch.no_grad():
            times = [time.perf_counter()]
            streamer = Streamer(tokenizer=None)
            ids = torch.tensor([IdTokenizer(0).encode(prompt)])
            worker = threading.Thread(target=model.generate, kwargs=dict(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                streamer=streamer, pad_token_id=0))
            worker.start()
            for piece in streamer:
                times += [time.perf_counter()] * (len(piece) // 2)
            worker.join()
            return times
    generate(IdTokenizer(0).decode(range(8)))  # first-call costs out of the row
    print(json.dumps({"hf_torch_threads": torch.get_num_threads()}), flush=True)
    return generate


def hf_segment(generate, prompts):
    async def run():
        loop = asyncio.get_running_loop()
        runs, wall = await client_loop(lambda p: loop.run_in_executor(None, generate, p),
                                       prompts, 1)
        return {"runs": runs, "wall": wall}
    return asyncio.run(run())


def measure(params, config, args, prompts):
    """Every row, in a palindrome so that load drifting over the run falls alike on the rows
    compared: the references (one at a time, HF, concurrency 1) run half their requests first
    and half last, in mirrored order, and the batched rows run in between."""
    single_url, single_stop, single_compile, single_engine = start_server(
        params, config, 1, args.cache_len)
    url, stop, compile_s, engine = start_server(params, config, args.slots, args.cache_len)
    print(json.dumps({"server_compile_s": compile_s, "slots": args.slots,
                      "one_slot_server_compile_s": single_compile}), flush=True)
    generate = (None if args.no_hf
                else hf_generator(params, config, args.new_tokens, args.hf_threads))
    n = lambda c: max(args.requests, c)  # noqa: E731
    rows = {"one": ("one at a time (1 slot)", 1, lambda p: server_segment(
                single_url, single_engine, p, 1, args.new_tokens), args.sequential_requests)}
    if generate is not None:
        rows["hf"] = ("HF generate + streamer, one at a time", 1,
                      lambda p: hf_segment(generate, p), args.sequential_requests)
    for c in args.concurrency:
        rows[c] = (f"lmjax-serve, {args.slots} slots", c, lambda p, c=c: server_segment(
            url, engine, p, c, args.new_tokens), n(c))
    split = [k for k in ("one", "hf", 1) if k in rows]  # the references, split in two halves
    plan = ([(k, 0, rows[k][3] // 2) for k in split]
            + [(k, 0, rows[k][3]) for k in rows if k not in split]
            + [(k, rows[k][3] // 2, rows[k][3]) for k in reversed(split)])
    segments = {k: [] for k in rows}
    try:
        for order, (k, lo, hi) in enumerate(plan):
            if lo == hi:
                continue
            load = os.getloadavg()[0]
            segment = rows[k][2](prompts[lo:hi])
            segment.update(order=order, load=[round(load, 2), round(os.getloadavg()[0], 2)],
                           prompt_tokens_mean=float(np.mean(
                               [len(IdTokenizer(0).encode(p)) for p in prompts[lo:hi]])))
            segments[k].append(segment)
            print(json.dumps({"row": rows[k][0], "concurrency": rows[k][1],
                              "requests": f"{lo}:{hi}", "wall_s": round(segment["wall"], 2),
                              "load_1min": segment["load"],
                              **({"engine": profile_sum([segment["engine"]])}
                                 if "engine" in segment else {})}), flush=True)
    finally:
        stop()
        single_stop()
    return [summarize(rows[k][0], rows[k][1], segments[k], args.new_tokens)
            for k in [*(c for c in args.concurrency), "one", "hf"] if k in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_min", type=int, default=32)
    parser.add_argument("--prompt_max", type=int, default=256)
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=64, help="per concurrency row (at least "
                        "the concurrency)")
    parser.add_argument("--sequential_requests", type=int, default=8)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--no-hf", action="store_true")
    # One thread by default: on the 2 shared cores at load average 8, GPT-2 124M generate took
    # 1069-1093 ms a token with torch's 2 threads (each op's threads wait for a descheduled one)
    # and 284-286 ms with one (100-token prompt, 16 new tokens, 2 repeats interleaved).
    parser.add_argument("--hf_threads", type=int, default=1, help="torch threads for the HF "
                        "row (0: torch's default)")
    args = parser.parse_args()
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency={args.concurrency!r} must be integers >= 1, comma-separated")
    for name, value in [("concurrency", min(args.concurrency)), ("requests", args.requests),
                        ("sequential_requests", args.sequential_requests),
                        ("slots", args.slots), ("new_tokens", args.new_tokens)]:
        if value < 1:
            parser.error(f"--{name}={value} must be >= 1")
    if args.hf_threads < 0:
        parser.error(f"--hf_threads={args.hf_threads} must be >= 0 (0: torch's default)")
    if not 1 <= args.prompt_min <= args.prompt_max:
        parser.error(f"--prompt_min={args.prompt_min} and --prompt_max={args.prompt_max} must "
                     "satisfy 1 <= prompt_min <= prompt_max")
    config = preset("gpt2_124m", num_layers=args.layers, dtype=args.dtype)
    args.cache_len = 1 << (args.prompt_max + args.new_tokens - 1).bit_length()
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [IdTokenizer(0).decode(rng.integers(0, config.vocab_size, n))
               for n in rng.integers(args.prompt_min, args.prompt_max + 1, max(
                   args.requests, max(args.concurrency), args.sequential_requests))]
    env = _env.environment(peers=() if args.no_hf else ("torch", "transformers"))
    rows = measure(params, config, args, prompts)
    single = next(r for r in rows if r["name"].startswith("one at a time"))
    first = next((r for r in rows if r["name"].startswith("lmjax") and r["concurrency"] == 1),
                 None)
    for r in rows:
        r["speedup_vs_one_at_a_time"] = r["tokens_per_s"] / single["tokens_per_s"]
        r["speedup_vs_concurrency_1"] = r["tokens_per_s"] / first["tokens_per_s"] if first else None
        r["token_p50_vs_single"] = r["token_p50_ms"] / single["token_p50_ms"]
    print(json.dumps({"env": env, "settings": {k: v for k, v in vars(args).items()},
                      "rows": rows}, indent=1))
    print("\n" + _env.measured_with(env))
    print(f"GPT-2 124M shapes, {args.layers} layers, {args.dtype}; prompts "
          f"{args.prompt_min}-{args.prompt_max} tokens, {args.new_tokens} new tokens, "
          f"{args.slots} slots, cache {args.cache_len}; load: 1-minute load average at the start "
          "and end of the row's segments\n")
    print("| server | concurrency | requests | tokens/s | x one-at-a-time | x concurrency 1 | "
          "TTFT p50 / p99 ms | per-token p50 / p99 ms | load |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x1 = f"{r['speedup_vs_concurrency_1']:.2f}" if first else "-"
        print(f"| {r['name']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_one_at_a_time']:.2f} | {x1} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['token_p50_ms']:.1f} / {r['token_p99_ms']:.1f} | "
              f"{min(r['load_1min']):.1f}-{max(r['load_1min']):.1f} |")

if __name__ == "__main__":
    main()
