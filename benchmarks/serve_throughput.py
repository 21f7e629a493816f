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
time through a one-slot server ("no batching"); and Hugging Face `GPT2LMHeadModel.generate`
with a TextIteratorStreamer (what `pipeline("text-generation")` runs for one prompt), one
request at a time behind the same client loop (the pipeline has no continuous batching).

    python benchmarks/serve_throughput.py                      # the full run (long on 2 cores)
    python benchmarks/serve_throughput.py --layers=2 --new_tokens=32 --requests=32 \
        --concurrency=1,4,16 --prompt_max=64                   # a quick look

Prints one JSON object per row, then the JSON summary and a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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


def summarize(name, concurrency, runs, wall, new_tokens):
    ttft = [t[1] - t[0] for t in runs]
    gaps = np.concatenate([np.diff(t[1:]) for t in runs])
    tokens = sum(len(t) - 1 for t in runs)
    assert tokens == len(runs) * new_tokens, (tokens, len(runs), new_tokens)
    pct = lambda x, q: float(np.percentile(x, q))  # noqa: E731
    return {"name": name, "concurrency": concurrency, "requests": len(runs), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "token_p50_ms": 1e3 * pct(gaps, 50), "token_p99_ms": 1e3 * pct(gaps, 99)}


def profile(engine, before=None):
    """Where the engine thread's time went (seconds per phase, decode steps, active rows per
    step), since `before` (an earlier profile)."""
    now = {**engine.seconds, "step_dispatch": engine.batch.dispatch_seconds,
           "step_device": engine.batch.device_seconds, "steps": engine.steps,
           "row_steps": engine.row_steps}
    if before is None:
        return now
    out = {k: round(v - before[k], 3) for k, v in now.items()}
    out["rows_per_step"] = round(out["row_steps"] / max(out["steps"], 1), 2)
    out["step_ms"] = round(1e3 * (out["step"] + out["output"]) / max(out["steps"], 1), 1)
    return out


def serve_rows(params, config, args, prompts):
    rows = []
    url, stop, compile_s, engine = start_server(params, config, args.slots, args.cache_len)
    print(json.dumps({"server_compile_s": compile_s, "slots": args.slots}), flush=True)
    try:
        for c in args.concurrency:
            async def run(c=c):
                async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
                    await http_request(client, prompts[0], 2)  # a warm connection pool
                    return await client_loop(lambda p: http_request(client, p, args.new_tokens),
                                             prompts[:max(args.requests, c)], c)
            before = profile(engine)
            rows.append(summarize("lmjax-serve", c, *asyncio.run(run()), args.new_tokens))
            rows[-1]["engine"] = profile(engine, before)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop()
    url, stop, _, engine = start_server(params, config, 1, args.cache_len)
    try:
        async def single():
            async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
                return await client_loop(lambda p: http_request(client, p, args.new_tokens),
                                         prompts[:args.sequential_requests], 1)
        before = profile(engine)
        rows.append(summarize("one at a time (1 slot)", 1, *asyncio.run(single()),
                              args.new_tokens))
        rows[-1]["engine"] = profile(engine, before)
        print(json.dumps(rows[-1]), flush=True)
    finally:
        stop()
    return rows


def hf_row(params, config, args, prompts):
    """HF generate with a streamer, one request at a time (a lock), behind the same loop."""
    import tempfile

    import torch
    from transformers import GPT2LMHeadModel, TextIteratorStreamer

    from lmjax import hf
    with tempfile.TemporaryDirectory() as folder:
        hf.save_hf(folder, config, params, model_type="gpt2")
        model = GPT2LMHeadModel.from_pretrained(folder).eval()

    class Streamer(TextIteratorStreamer):  # token ids instead of text
        def put(self, value):
            if self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.text_queue.put("<>" * value.numel())

    lock = threading.Lock()

    def generate(prompt_ids):
        with lock, torch.no_grad():
            times = [time.perf_counter()]
            streamer = Streamer(tokenizer=None)
            ids = torch.tensor([IdTokenizer(0).encode(prompt_ids)])
            worker = threading.Thread(target=model.generate, kwargs=dict(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                streamer=streamer, pad_token_id=0))
            worker.start()
            for piece in streamer:
                times += [time.perf_counter()] * (len(piece) // 2)
            worker.join()
            return times

    async def run():
        loop = asyncio.get_running_loop()
        return await client_loop(lambda p: loop.run_in_executor(None, generate, p),
                                 prompts[:args.sequential_requests], 4)
    row = summarize("HF generate (pipeline's loop)", 4, *asyncio.run(run()), args.new_tokens)
    print(json.dumps(row), flush=True)
    return row


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
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    config = preset("gpt2_124m", num_layers=args.layers, dtype=args.dtype)
    args.cache_len = 1 << (args.prompt_max + args.new_tokens - 1).bit_length()
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [IdTokenizer(0).decode(rng.integers(0, config.vocab_size, n))
               for n in rng.integers(args.prompt_min, args.prompt_max + 1,
                                     max(args.requests, max(args.concurrency)))]
    env = _env.environment(peers=() if args.no_hf else ("torch", "transformers"))
    rows = serve_rows(params, config, args, prompts)
    if not args.no_hf:
        rows.append(hf_row(params, config, args, prompts))
    single = next(r for r in rows if r["name"].startswith("one at a time"))
    for r in rows:
        r["speedup_vs_one_at_a_time"] = r["tokens_per_s"] / single["tokens_per_s"]
        r["token_p50_vs_single"] = r["token_p50_ms"] / single["token_p50_ms"]
    print(json.dumps({"env": env, "settings": {k: v for k, v in vars(args).items()},
                      "rows": rows}, indent=1))
    print("\n" + _env.measured_with(env))
    print(f"GPT-2 124M shapes, {args.layers} layers, {args.dtype}; prompts "
          f"{args.prompt_min}-{args.prompt_max} tokens, {args.new_tokens} new tokens, "
          f"{args.slots} slots, cache {args.cache_len}\n")
    print("| server | concurrency | tokens/s | x one-at-a-time | TTFT p50 / p99 ms | "
          "per-token p50 / p99 ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_one_at_a_time']:.2f} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['token_p50_ms']:.1f} / {r['token_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
