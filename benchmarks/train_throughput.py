"""Training throughput of lmjax vs PyTorch (`transformers` GPT2LMHeadModel), side by side, as MFU.

    python benchmarks/train_throughput.py                          # every shape (~10 min, 2 cores)
    python benchmarks/train_throughput.py --shapes baby,middle --steps 20 --repeats 5
    python benchmarks/train_throughput.py --memory_check           # + GPT-2 124M, 1024 x 8 (slow)
    python benchmarks/train_throughput.py --no_torch --dispatch_ahead 0   # the loop unbounded
    python benchmarks/train_throughput.py --compare_dispatch_ahead --shapes baby,gpt2  # bound vs not
    python benchmarks/train_throughput.py --dtype bfloat16         # mixed precision in both
    python benchmarks/train_throughput.py --context_sweep --repeats 3   # GPT-2 at 256/512/1024

Shapes (GPT-2 architecture in both frameworks: learned positions, LayerNorm, tanh-GELU MLP, biases,
tied embeddings, dropout 0; float32, or with `--dtype bfloat16` mixed precision: float32 parameters
and optimizer, bfloat16 matmul inputs with float32 accumulation):
  baby    4 layers, 4 heads, width 128, context 64, batch 12, vocab 65 (nanoGPT's CPU baby run)
  middle  6 layers, 6 heads, width 384, context 256, batch 16, vocab 65
  gpt2    GPT-2 124M (`preset('gpt2_124m')`), context 256, batch 4, vocab 50257
  gpt2_ctx512, gpt2_ctx1024   GPT-2 124M at context 512, batch 2 and 1024, batch 1 (the same
          1,024 tokens per step as gpt2; `--context_sweep` runs gpt2 and these two)

lmjax runs its own training step: `steps_lib.create_train_state` + `steps_lib.make_optimizer` (AdamW,
warmup + cosine, clipping at 1.0, decay on matrices) + the step function that `train.train_loop`
jits (`steps_lib.jit_train_step`: shardings, donated state, `--steps_per_call` = the config's
`train.steps_per_call` optimizer steps per call under `lax.scan`),
fed by `sharding.put_batch` on fresh host batches each step, as the training loop does.
PyTorch runs `GPT2LMHeadModel` + `torch.optim.AdamW` (same decay groups, clipping at 1.0),
cross-entropy on the logits, with the faster of 1 and all cores as torch's thread count
(timed in the worker). With `--dtype bfloat16`, lmjax runs
`model.dtype='bfloat16'` (params float32) and PyTorch runs the forward pass and loss under
`torch.autocast('cpu', torch.bfloat16)`, its standard mixed precision.

Each (framework, shape) lives in its own worker process, so that its peak RSS is its own; the
parent interleaves them (lmjax repeat 1, torch repeat 1, lmjax repeat 2, ...) so that both see
the same load on a shared machine, and reports medians over repeats with the spread (min-max).

Reported per shape and framework:
  * step_ms / tokens_s: steady state, median over repeats of (wall time of `--steps` steps)/steps.
    Each timed run follows one untimed step (call) of the same worker: while the other
    framework runs, a worker sits idle, and lmjax's first step after a pause of a few seconds was
    0.3-0.5 s slower at the middle shape (2.37-2.51 s after a 2.5 s sleep, 1.88-1.97 s back to
    back; a jitted matmul chain showed no such effect), which a training loop running step after
    step never pays;
  * compile_s: lmjax: first call minus its steps at the steady rate (tracing + XLA compilation);
    torch: first step minus one steady step (eager warm-up);
  * peak_rss_MiB: the worker's peak resident set size (VmHWM in /proc/self/status; the whole process:
    framework, model, optimizer, activations), and `import_rss_MiB` before building anything;
  * MFU: flops_per_token(config, seq_len) x tokens/s / measured peak. `lmjax.model.flops_per_token`
    is 6N + 12·layers·seq·width with N the matmul parameters including the output projection
    (counted once, tied), excluding the embedding lookups (PaLM, appendix B). The same count is
    used for both frameworks. The peak is the best of several 4096x4096 matmuls in the run's
    dtype (bfloat16: bf16 inputs, f32 accumulation) timed with jax on this machine (also with
    torch), measured by this script before, between and after the runs; MFU uses the largest
    measurement of either (in float32 that is jax's; in bfloat16 torch's was ~10% higher).

Environment: lmjax workers run with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (lmjax's recommended
CPU setting, as in the Makefile; `--lmjax_glibc_tunables=""` turns it off). XLA's CPU runtime
allocates a step's temporary buffers afresh every step, and glibc serves such large blocks with
new mmaps: without transparent huge pages the GPT-2 step took 477k page faults (4 KiB each), with
them about 1k, and the step got 7-10% faster. PyTorch gained nothing from it (measured on the
middle and GPT-2 shapes), so its worker keeps the machine's default environment.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import _env  # benchmarks/_env.py (this folder is sys.path[0]): versions and machine

SHAPES = {
    "baby": dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=64,
                 vocab_size=65, seq_len=64, batch=12),
    "middle": dict(num_layers=6, num_heads=6, embed_dim=384, mlp_dim=1536, max_len=256,
                   vocab_size=65, seq_len=256, batch=16),
    "gpt2": dict(preset="gpt2_124m", seq_len=256, batch=4),
    # The context sweep (--context_sweep: gpt2, then these): GPT-2 124M at 1,024 tokens per
    # step, as gpt2, over longer contexts, so only attention's share of the step grows.
    "gpt2_ctx512": dict(preset="gpt2_124m", seq_len=512, batch=2),
    "gpt2_ctx1024": dict(preset="gpt2_124m", seq_len=1024, batch=1),
    # Memory check only (--memory_check): does GPT-2 124M train at context 1024, batch 8?
    "gpt2_1024": dict(preset="gpt2_124m", seq_len=1024, batch=8),
}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def rss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM from /proc (ru_maxrss would carry the
    parent's peak across fork + exec); `resource.getrusage` maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- configs


def experiment_config(shape: str, remat: str = "none", steps_per_call: int = 1,
                      dtype: str = "float32"):
    """The lmjax experiment config of a shape (GPT-2 architecture, dropout 0, biases, tied),
    computing in `dtype` with float32 parameters."""
    from lmjax.config import default_config, preset_fields
    spec = dict(SHAPES[shape])
    seq_len, batch = spec.pop("seq_len"), spec.pop("batch")
    name = spec.pop("preset", "gpt2_124m")
    config = default_config()
    config.model.update(preset_fields(name, **spec, dropout=0.0, bias=True, tie_embeddings=True,
                                      dtype=dtype, param_dtype="float32", remat=remat))
    config.data.seq_len, config.data.batch_size = seq_len, batch
    config.train.steps_per_call = steps_per_call
    return config


def host_batch(rng, vocab: int, batch: int, seq_len: int) -> dict:
    import numpy as np
    tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "mask": np.ones((batch, seq_len), np.float32)}


# --------------------------------------------------------------------------- workers


class LmjaxRunner:
    """lmjax's train step as `train.train_loop` builds it, on one device."""

    def __init__(self, shape: str, remat: str, steps_per_call: int, dtype: str = "float32"):
        import functools

        import flax.linen as nn
        import jax
        import numpy as np

        from lmjax import run_config, safety, sharding
        from lmjax import steps as steps_lib
        self.jax, self.np, self.sharding = jax, np, sharding
        config = experiment_config(shape, remat, steps_per_call, dtype)
        run_config.validate_config(config)
        self.mcfg = run_config.model_config(config, config.model.vocab_size)
        self.batch_size, self.seq_len = config.data.batch_size, config.data.seq_len
        mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules(config.mesh, self.mcfg, mesh.shape)
        jax.set_mesh(mesh).__enter__()
        tx, _ = steps_lib.make_optimizer(config.optim, 10_000)
        state_sh = steps_lib.state_shardings(self.mcfg, tx, mesh, rules)
        self.batch_sh = sharding.batch_sharding(mesh)
        self.state = jax.jit(functools.partial(steps_lib.create_train_state, self.mcfg, tx),
                             out_shardings=state_sh)(jax.random.key(0))
        nn.logical_axis_rules(rules).__enter__()
        self.per_call = config.train.steps_per_call
        self.step_fn = steps_lib.jit_train_step(self.mcfg, tx, state_sh, self.batch_sh, self.per_call)
        self.put_batches = steps_lib.put_batches
        self.rng = np.random.default_rng(0)
        # As the training loop: call k is dispatched once call k-2 has finished (0: unbounded).
        ahead = int(os.environ.get("LMJAX_BENCH_DISPATCH_AHEAD", "-1"))
        self.ahead = safety.MAX_CALLS_AHEAD if ahead < 0 else ahead
        self.wait_for_device = safety.wait_for_device

    def _batch(self):
        """Fresh host batches put on the device, as the training loop does each call."""
        host = [host_batch(self.rng, self.mcfg.vocab_size, self.batch_size, self.seq_len)
                for _ in range(self.per_call)]
        if self.per_call == 1:
            return self.sharding.put_batch(host[0], self.batch_sh)
        return self.put_batches(host, self.batch_sh)

    def run(self, steps: int) -> float:
        """Wall time of `steps` optimizer steps (rounded up to whole calls), per step."""
        calls = max(1, -(-steps // self.per_call))
        start = time.perf_counter()
        metrics, in_flight = None, collections.deque()
        for _ in range(calls):
            self.state, metrics = self.step_fn(self.state, self._batch())
            if self.ahead:
                in_flight.append([(0, metrics)])
                self.wait_for_device(in_flight, self.ahead - 1)
        self.jax.block_until_ready((self.state.step, metrics))
        self.loss = float(self.np.asarray(metrics["loss"]).reshape(-1)[-1])
        return (time.perf_counter() - start) / (calls * self.per_call)


class TorchRunner:
    """The same model and batch in PyTorch: GPT2LMHeadModel + AdamW."""

    def __init__(self, shape: str, remat: str, steps_per_call: int, dtype: str = "float32"):
        del steps_per_call
        import contextlib
        import functools

        import numpy as np
        import torch
        import transformers
        from lmjax.config import preset
        torch.set_num_threads(cores())
        torch.manual_seed(0)
        self.torch, self.np = torch, np
        spec = dict(SHAPES[shape])
        self.seq_len, self.batch_size = spec.pop("seq_len"), spec.pop("batch")
        mcfg = preset(spec.pop("preset", "gpt2_124m"), **spec)
        self.vocab = mcfg.vocab_size
        hf_config = transformers.GPT2Config(
            vocab_size=mcfg.vocab_size, n_positions=mcfg.max_len, n_embd=mcfg.embed_dim,
            n_layer=mcfg.num_layers, n_head=mcfg.num_heads, n_inner=mcfg.mlp_dim,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=mcfg.norm_eps, tie_word_embeddings=True)
        self.model = transformers.GPT2LMHeadModel(hf_config).train()
        if remat != "none":
            self.model.gradient_checkpointing_enable()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        self.rng = np.random.default_rng(0)
        self.autocast = (functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
                         if dtype == "bfloat16" else contextlib.nullcontext)

    def step(self):
        torch = self.torch
        batch = host_batch(self.rng, self.vocab, self.batch_size, self.seq_len)
        inputs = torch.from_numpy(batch["inputs"]).long()
        targets = torch.from_numpy(batch["targets"]).long()
        with self.autocast():
            logits = self.model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss

    def pick_threads(self) -> dict:
        """Intra-op threads: the faster of 1 and all cores, as in sample_speed.py. On a shared
        2-core machine OpenMP's barriers can make 2 threads slower than 1 (every op waits for a
        descheduled thread), so PyTorch gets whichever is faster here. Returns the timings."""
        timings = {}
        for threads in sorted({1, cores()}):
            self.torch.set_num_threads(threads)
            self.run(1)
            timings[threads] = min(self.run(1) for _ in range(2))
        self.torch.set_num_threads(min(timings, key=timings.get))
        return timings

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        self.loss = loss.item()
        return (time.perf_counter() - start) / steps


def worker(framework: str, shape: str, remat: str, steps_per_call: int, dtype: str) -> None:
    """Serves `run N` requests on stdin; answers one JSON line per request on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # keep library prints off the protocol channel
    for module in ("jax",) if framework == "lmjax" else ("torch", "transformers"):
        importlib.import_module(module)  # before measuring the RSS of the imports alone
    import_rss = rss_mib()
    runner = (LmjaxRunner if framework == "lmjax" else TorchRunner)(shape, remat, steps_per_call,
                                                                    dtype)
    start = time.perf_counter()
    runner.run(1)
    first_s = time.perf_counter() - start
    steady_s = min(runner.run(1) for _ in range(1 if shape == "gpt2_1024" else 2))
    per_call = getattr(runner, "per_call", 1)  # the first call ran this many steps
    info = {"first_call_s": first_s, "compile_s": max(first_s - per_call * steady_s, 0.0),
            "import_rss_MiB": import_rss}
    if framework == "lmjax":
        import jax
        info.update(backend=jax.default_backend(), per_call=runner.per_call, jax=jax.__version__,
                    xla_flags=os.environ.get("XLA_FLAGS", ""))
    else:
        import torch
        timings = runner.pick_threads()
        info.update(torch=torch.__version__, threads=torch.get_num_threads(),
                    thread_step_s={str(k): v for k, v in timings.items()})
    info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    out.write(json.dumps(info) + "\n")
    out.flush()
    for line in sys.stdin:
        steps = int(line.split()[1])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step_s = runner.run(steps)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
        out.write(json.dumps({"step_s": step_s, "loss": runner.loss, "page_faults_per_step": faults,
                              "peak_rss_MiB": rss_mib()}) + "\n")
        out.flush()


class Worker:
    def __init__(self, framework: str, shape: str, args, env: dict | None = None):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--shapes", shape,
               "--remat", args.remat, "--steps_per_call", str(args.steps_per_call),
               "--dtype", args.dtype]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# --------------------------------------------------------------------------- machine peak


def matmul_peak(n: int = 4096, repeats: int = 5, torch_too: bool = True,
                dtype: str = "float32") -> dict:
    """Best-of-`repeats` n x n matmul FLOP/s in `dtype` (accumulating in float32) with jax (and
    torch, for reference)."""
    import functools

    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)
    y = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    mm(x, y).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(x, y).block_until_ready()
        best = min(best, time.perf_counter() - start)
    result = {"jax": 2 * n ** 3 / best}
    if not torch_too:
        return result
    try:
        import torch
        torch.set_num_threads(cores())
        # Without AVX512-BF16/AMX (this AMD EPYC: AVX2 only) torch's bfloat16 matmul is a
        # scalar fallback, 0.3-0.9 GFLOP/s at 1024-2048² against jax's 92-99: one 4096² product
        # took minutes, which looked like a stalled run. 1024² bounds it to seconds.
        n = min(n, 1024) if dtype == "bfloat16" else n
        a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        result["torch"] = 2 * n ** 3 / best
    except ImportError:
        pass
    return result


# --------------------------------------------------------------------------- main


def flops_per_token(shape: str) -> float:  # the same in every dtype
    from lmjax import model
    from lmjax.run_config import model_config
    config = experiment_config(shape)
    return model.flops_per_token(model_config(config, config.model.vocab_size),
                                 config.data.seq_len)


def lmjax_env(args) -> dict:
    """Environment of the lmjax workers (see the module docstring)."""
    return {"GLIBC_TUNABLES": args.lmjax_glibc_tunables}


def bench_shape(shape: str, args, peaks: list) -> dict:
    spec = SHAPES[shape]
    tokens_per_step = spec["batch"] * spec["seq_len"]
    frameworks = ["lmjax"] + ([] if args.no_torch else ["torch"])
    workers = {}
    try:
        for fw in frameworks:  # one at a time: compile / warm-up not under the other's load
            workers[fw] = Worker(fw, shape, args, env=lmjax_env(args) if fw == "lmjax" else None)
        samples = {fw: [] for fw in frameworks}
        for _ in range(args.repeats):
            # the best over the whole run
            peaks.append(matmul_peak(repeats=2, torch_too=False, dtype=args.dtype))
            for fw in frameworks:
                workers[fw].run(1)  # untimed: the first step after a pause is slow (docstring)
                samples[fw].append(workers[fw].run(args.steps))
    finally:
        for w in workers.values():
            w.close()
    fpt = flops_per_token(shape)
    result = {"shape": shape, **spec, "flops_per_token": fpt}
    for fw in frameworks:
        times = [s["step_s"] for s in samples[fw]]
        step_s = statistics.median(times)
        result[fw] = {
            "step_ms": 1e3 * step_s, "step_ms_min_max": [1e3 * min(times), 1e3 * max(times)],
            "tokens_s": tokens_per_step / step_s,
            "spread_pct": 100 * (max(times) - min(times)) / step_s,
            "best_tokens_s": tokens_per_step / min(times),
            "mfu": fpt * tokens_per_step / step_s / max(max(p.values()) for p in peaks),
            "compile_s": workers[fw].info["compile_s"],
            "peak_rss_MiB": max(s["peak_rss_MiB"] for s in samples[fw]),
            "page_faults_per_step": statistics.median(s["page_faults_per_step"]
                                                      for s in samples[fw]),
            "import_rss_MiB": workers[fw].info["import_rss_MiB"],
            "loss": samples[fw][-1]["loss"], "info": workers[fw].info}
    if "torch" in result:
        result["speedup"] = result["lmjax"]["tokens_s"] / result["torch"]["tokens_s"]
        # ratio per repeat (each pair ran back to back): its spread shows the noise of the ratio
        ratios = [t["step_s"] / l["step_s"] for l, t in zip(samples["lmjax"], samples["torch"])]
        result["speedup_per_repeat"] = ratios
        # best repeat of each: an estimate of the speeds on a machine without other load
        result["speedup_best"] = min(samples["torch"], key=lambda x: x["step_s"])["step_s"] / min(
            samples["lmjax"], key=lambda x: x["step_s"])["step_s"]
    return result


def bench_dispatch_ahead(shape: str, args) -> dict:
    """lmjax's step with the training loop's bound on calls ahead of the device
    (safety.MAX_CALLS_AHEAD) and unbounded, two workers interleaved repeat by repeat."""
    modes = {"bounded": "-1", "unbounded": "0"}
    workers, samples = {}, {mode: [] for mode in modes}
    try:
        for mode, ahead in modes.items():
            workers[mode] = Worker("lmjax", shape, args, env={
                **lmjax_env(args), "LMJAX_BENCH_DISPATCH_AHEAD": ahead})
        for _ in range(args.repeats):
            for mode in modes:
                workers[mode].run(1)  # untimed, as in bench_shape
                samples[mode].append(workers[mode].run(args.steps)["step_s"])
    finally:
        for w in workers.values():
            w.close()
    result = {"shape": shape, "steps": args.steps, "steps_per_call": args.steps_per_call,
              "repeats": args.repeats}
    for mode in modes:
        result[mode] = {"step_ms": 1e3 * statistics.median(samples[mode]),
                        "step_ms_min_max": [1e3 * min(samples[mode]), 1e3 * max(samples[mode])]}
    ratios = [u / b for b, u in zip(samples["bounded"], samples["unbounded"])]
    result["unbounded_over_bounded"] = statistics.median(ratios)
    result["ratio_per_repeat"] = ratios
    return result


def dispatch_ahead_markdown(results: list[dict]) -> str:
    lines = ["| shape | steps/call | bounded step ms (min–max) | unbounded step ms (min–max) "
             "| unbounded / bounded time: median (per repeat) |", "|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r[m]['step_ms']:.1f} ({r[m]['step_ms_min_max'][0]:.1f}–"
                 f"{r[m]['step_ms_min_max'][1]:.1f})" for m in ("bounded", "unbounded")]
        per = r["ratio_per_repeat"]
        lines.append(f"| {r['shape']} | {r['steps_per_call']} | {cells[0]} | {cells[1]} "
                     f"| {r['unbounded_over_bounded']:.3f} ({min(per):.3f}–{max(per):.3f}) |")
    return "\n".join(lines)


MEMORY_XLA_FLAGS = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def memory_check(args) -> dict:
    """GPT-2 124M training at context 1024, batch 8: a couple of steps, peak RSS."""
    args = argparse.Namespace(**{**vars(args), "remat": args.memory_remat, "steps_per_call": 1})
    # XLA CPU's default scheduler needed 24.1 GiB of temporaries here (remat none or full alike,
    # with the earlier attention layout); the memory-optimised one 13.1 GiB then, 16.1 GiB with
    # the heads-first CPU attention (compiled.memory_analysis()).
    flags = os.environ.get("XLA_FLAGS", "") + " " + MEMORY_XLA_FLAGS
    try:
        w = Worker("lmjax", "gpt2_1024", args, env={**lmjax_env(args), "XLA_FLAGS": flags.strip()})
        run = w.run(args.memory_steps)
        w.close()
    except RuntimeError as e:
        return {"shape": "gpt2_1024", "error": str(e), "fits_24GiB": False}
    return {"shape": "gpt2_1024", **SHAPES["gpt2_1024"], "remat": args.remat,
            "step_s": run["step_s"], "peak_rss_MiB": run["peak_rss_MiB"],
            "peak_rss_GiB": run["peak_rss_MiB"] / 1024,
            "fits_24GiB": run["peak_rss_MiB"] < 24 * 1024,
            "compile_s": w.info["compile_s"], "loss": run["loss"], "xla_flags": flags.strip()}


def markdown(results: list[dict], peak: dict, dtype: str, env: dict) -> str:
    lines = [_env.measured_with(env), "", f"{dtype} matmul peak (4096², best over the run): jax "
             f"{peak['jax'] / 1e9:.1f} GFLOP/s"
             + (f", torch {peak['torch'] / 1e9:.1f} GFLOP/s" if "torch" in peak else "")
             + "; MFU is against the larger", "",
             "| shape | framework | step ms median (min–max) | tokens/s | MFU | best tokens/s "
             "| compile s | peak RSS MiB | page faults/step | lmjax / torch: median (per repeat) "
             "| best / best |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for fw in ("lmjax", "torch"):
            if fw not in r:
                continue
            m = r[fw]
            ratio = best = ""
            if fw == "lmjax" and "speedup" in r:
                per = r["speedup_per_repeat"]
                ratio = f"**{r['speedup']:.2f}×** ({min(per):.2f}–{max(per):.2f})"
                best = f"{r['speedup_best']:.2f}×"
            name = fw + (f" ({m['info']['per_call']} steps/call)"
                         if fw == "lmjax" and m["info"]["per_call"] > 1 else "")
            lines.append(
                f"| {r['shape']} | {name} | {m['step_ms']:.1f} ({m['step_ms_min_max'][0]:.1f}–"
                f"{m['step_ms_min_max'][1]:.1f}) | {m['tokens_s']:,.0f} | {100 * m['mfu']:.1f}% "
                f"| {m['best_tokens_s']:,.0f} | {m['compile_s']:.1f} | {m['peak_rss_MiB']:,.0f} "
                f"| {m['page_faults_per_step']:,.0f} | {ratio} | {best} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="baby,middle,gpt2",
                        help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per timed repeat (0: 40 baby, 3 middle, 1 gpt2)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed repeats per framework, alternating lmjax and torch")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--lmjax_glibc_tunables", default="glibc.malloc.hugetlb=1",
                        help="GLIBC_TUNABLES of the lmjax workers ('' for glibc's defaults)")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of both frameworks (bfloat16: mixed precision)")
    parser.add_argument("--steps_per_call", type=int, default=0,
                        help="lmjax train.steps_per_call (optimizer steps per jitted call); "
                             "0: 8 for baby, 1 for the others")
    parser.add_argument("--context_sweep", action="store_true",
                        help="shapes gpt2,gpt2_ctx512,gpt2_ctx1024: GPT-2 124M at context 256, "
                             "512, 1024 with 1,024 tokens per step (overrides --shapes)")
    parser.add_argument("--memory_check", action="store_true",
                        help="also train GPT-2 124M at context 1024, batch 8 (slow on CPU)")
    parser.add_argument("--memory_steps", type=int, default=1,
                        help="timed steps of the memory check (after one compile + warm-up step)")
    parser.add_argument("--memory_remat", default="full", choices=("none", "full", "dots"),
                        help="model.remat of the memory check")
    parser.add_argument("--dispatch_ahead", type=int, default=-1,
                        help="lmjax calls dispatched ahead of the device: -1 the training loop's "
                             "bound (safety.MAX_CALLS_AHEAD), 0 unbounded")
    parser.add_argument("--compare_dispatch_ahead", action="store_true",
                        help="lmjax only: each shape with the loop's bound on calls ahead of the "
                             "device and unbounded, interleaved (issue 15)")
    parser.add_argument("--worker", choices=("lmjax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.shapes, args.remat, args.steps_per_call, args.dtype)
    os.environ["LMJAX_BENCH_DISPATCH_AHEAD"] = str(args.dispatch_ahead)  # read by the workers
    if args.context_sweep:
        args.shapes = "gpt2,gpt2_ctx512,gpt2_ctx1024"
    unknown = [s for s in args.shapes.split(",") if s and s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {','.join(unknown)}; allowed: {','.join(SHAPES)}")

    default_steps = {"baby": 40, "middle": 3, "gpt2": 1, "gpt2_ctx512": 1, "gpt2_ctx1024": 1}
    load_before = os.getloadavg()
    if args.compare_dispatch_ahead:
        results = []
        for shape in [s for s in args.shapes.split(",") if s]:
            shape_args = argparse.Namespace(**vars(args))
            shape_args.steps = args.steps or 4 * default_steps.get(shape, 2)  # several calls
            shape_args.steps_per_call = args.steps_per_call or (8 if shape == "baby" else 1)
            results.append(bench_dispatch_ahead(shape, shape_args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        print(json.dumps({"load_average_before": load_before,
                          "load_average_after": os.getloadavg(), "results": results}, indent=1))
        print()
        print(dispatch_ahead_markdown(results))
        return
    env = _env.environment(peers=() if args.no_torch else ("torch", "transformers"))
    peaks = [matmul_peak(dtype=args.dtype)]
    results = []
    for shape in [s for s in args.shapes.split(",") if s]:
        shape_args = argparse.Namespace(**vars(args))
        shape_args.steps = args.steps or default_steps.get(shape, 2)
        shape_args.steps_per_call = args.steps_per_call or (8 if shape == "baby" else 1)
        results.append(bench_shape(shape, shape_args, peaks))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    peaks.append(matmul_peak(dtype=args.dtype))
    peak = {k: max(p[k] for p in peaks if k in p) for k in peaks[0]}
    best_peak = max(peak["jax"], peak.get("torch", 0.0))
    for r in results:  # MFU against the best peak seen (before or after, either framework)
        for fw in ("lmjax", "torch"):
            if fw in r:
                r[fw]["mfu"] = r["flops_per_token"] * r[fw]["tokens_s"] / best_peak
    out = {"cores": cores(), "dtype": args.dtype, "peak_flops": peak,
           "peak_jax_runs_GFLOPs": [round(p["jax"] / 1e9, 1) for p in peaks],
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "environment": env, "results": results}
    print(markdown(results, peak, args.dtype, env), file=sys.stderr, flush=True)  # before the slow memory check
    if args.memory_check:
        out["memory_check"] = memory_check(args)
    print(json.dumps(out, indent=1))
    print()
    print(markdown(results, peak, args.dtype, env))
    if args.memory_check and "error" in out["memory_check"]:
        print(f"\nMemory check failed: {out['memory_check']['error']}")
    elif args.memory_check:
        m = out["memory_check"]
        print(f"\nMemory check: GPT-2 124M, context 1024, batch 8, remat={m['remat']}: peak RSS "
              f"{m['peak_rss_GiB']:.2f} GiB ({'fits' if m['fits_24GiB'] else 'does NOT fit'} in "
              f"24 GiB), {m['step_s']:.1f} s/step, loss {m['loss']:.3f}")


if __name__ == "__main__":
    main()
