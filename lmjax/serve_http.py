"""The OpenAI-compatible HTTP API in front of the serving engine (serve.py), on FastAPI.

    app = make_app(engine, model_name="demo")   # then uvicorn.run(app) (see `run_server`)

  POST /v1/completions       prompt (string, list of strings, token ids or lists of them),
                             max_tokens, temperature, top_p, top_k, n, stop, seed, logprobs,
                             echo, stream (Server-Sent Events ending `data: [DONE]`); vLLM's
                             extensions repetition_penalty, min_tokens, ignore_eos,
                             stop_token_ids
  POST /v1/chat/completions  messages rendered by the tokenizer's chat template (400 without one)
  GET  /v1/models, /health, /metrics (Prometheus text)

Where OpenAI's API is silent, this does what vLLM's OpenAI-compatible server does: errors are
`{"error": {"message", "type", "param", "code"}}` (400 names the field, before any compute; 503
with Retry-After when the queue is full); a seed makes a request reproducible; log-probabilities
are those of the unmodified model; `n` choices of prompt i are choices i * n .. i * n + n - 1.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from typing import Any

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmjax.serve import Chunk, Engine, Overloaded, Sequence, ServeError
from lmjax.serve_batch import MAX_END_IDS, TOP_LOGPROBS

MAX_N = 64  # choices per prompt
MAX_STOP = 16  # stop strings per request
MAX_SEED = 2 ** 31 - 1
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.status}},
                            status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------ validation


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (low_open and value == low):
        bound = "(" if low_open else "["
        raise ApiError(400, f"{name}={value!r} must be a number in {bound}{low}, {high}]", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name}={value!r} must be an integer in [{low}, {high}]", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}={value!r} must be true or false", name)
    return value


def _prompts(value, tokenizer, vocab_size: int) -> list[list[int]]:
    """The prompt field as token-id lists: a string, a list of strings, a list of token ids or
    a list of token-id lists."""
    allowed = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"prompt must be {allowed} (non-empty)", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, str):
            try:
                ids = list(tokenizer.encode(item))
            except ValueError as e:  # e.g. a character the tokenizer has never seen
                raise ApiError(400, f"prompt cannot be encoded: {e}", "prompt") from None
            if not ids and getattr(tokenizer, "bos_id", None) is not None:
                ids = [tokenizer.bos_id]
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in item):
            ids = item
        else:
            raise ApiError(400, f"prompt must be {allowed}", "prompt")
        if not ids:
            raise ApiError(400, "prompt is empty and the tokenizer has no bos token", "prompt")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        out.append(ids)
    return out


def sampling_fields(body: dict) -> dict[str, Any]:
    """The fields every generation endpoint shares, validated (ApiError naming the field)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                       "of them", "stop")
    top_k = _integer(body, "top_k", 0, -1, 2 ** 31 - 1)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name}={body[name]!r} is not supported: only 0", name)
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    n = _integer(body, "n", 1, 1, MAX_N)
    if body.get("best_of") not in (None, n):
        raise ApiError(400, f"best_of={body['best_of']!r} is not supported: only n", "best_of")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    # vLLM's extensions that the per-row step cannot apply (they need a row's whole history or
    # a static setting): refused, never silently ignored.
    for name, off in (("no_repeat_ngram_size", 0), ("bad_words", None), ("min_p", 0),
                      ("use_beam_search", False), ("length_penalty", 1)):
        if body.get(name) not in (None, off) and body.get(name) != []:
            raise ApiError(400, f"{name} is not supported by the per-row decode step (supported "
                           "extensions: repetition_penalty, min_tokens, ignore_eos, "
                           "stop_token_ids)", name)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_END_IDS - 1 or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
        raise ApiError(400, f"stop_token_ids must be a list of at most {MAX_END_IDS - 1} token "
                       "ids >= 0", "stop_token_ids")
    return dict(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # vLLM's -1 and OpenAI's absent: off
        n=n, stop=tuple(stop), seed=_integer(body, "seed", None, 0, MAX_SEED),
        # vLLM's extensions, applied per row by the decode step (serve.Sequence).
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, low_open=True),
        min_tokens=_integer(body, "min_tokens", 0, 0, 2 ** 31 - 1),
        ignore_eos=_flag(body, "ignore_eos"), stop_token_ids=tuple(stop_ids),
        stream=_flag(body, "stream"),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")))


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template (tokenizer_config.json's `chat_template`, or the
    `chat_template.jinja` file transformers 5 writes), None without one."""
    files = getattr(tokenizer, "files", {}) or {}
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    template = (getattr(tokenizer, "config", None) or {}).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def render_chat(tokenizer, messages) -> str:
    """The messages as the chat template renders them with add_generation_prompt (as
    transformers' apply_chat_template: a sandboxed jinja2 environment with trim_blocks and
    lstrip_blocks, the tokenizer's special tokens as variables)."""
    import jinja2.sandbox  # only chat needs jinja2
    template = chat_template(tokenizer)
    if template is None:
        raise ApiError(400, "this model's tokenizer has no chat template (tokenizer_config.json "
                       "chat_template): use /v1/completions", "messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects with "
                       "string content", "messages")

    def raise_exception(message):
        raise ApiError(400, f"the chat template refused the messages: {message}", "messages")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    config = getattr(tokenizer, "config", {}) or {}
    specials = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = config.get(name)
        specials[name] = token.get("content") if isinstance(token, dict) else token
    try:
        return env.from_string(template).render(
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True, **specials)
    except jinja2.TemplateError as e:
        raise ApiError(400, f"the chat template failed: {e}", "messages") from None


# ----------------------------------------------------------------------------------- output


def _logprobs_json(tokenizer, chunk_tokens, logprobs, tops, k, offset0, with_prompt=None):
    """OpenAI's completion logprobs object for these tokens (text offsets from `offset0`)."""
    tokens = [tokenizer.decode([t]) for t in chunk_tokens]
    offsets, at = [], offset0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top = [None if t is None else {tokenizer.decode([i]): lp for i, lp in
                                   list(t.items())[:k]} for t in tops]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top,
            "text_offset": offsets}


class _Choice:
    """What a streaming or non-streaming answer collects for one sequence."""

    def __init__(self, index: int, seq: Sequence):
        self.index, self.seq = index, seq
        self.text, self.tokens, self.logprobs, self.tops = "", [], [], []
        self.finish_reason = None


def _sequences(prompts, fields, max_tokens, prompt_logprobs, emit_for):
    if fields["min_tokens"] > max_tokens:
        raise ApiError(400, f"min_tokens={fields['min_tokens']} must be <= max_tokens="
                       f"{max_tokens}", "min_tokens")
    seqs = []
    for i, ids in enumerate(prompts):
        for j in range(fields["n"]):
            seq = Sequence(ids, max_tokens, emit_for(len(seqs)), temperature=fields["temperature"],
                           top_k=fields["top_k"], top_p=fields["top_p"], seed=fields["seed"],
                           choice=j, stop=fields["stop"], eos_ids=fields["stop_token_ids"],
                           ignore_eos=fields["ignore_eos"],
                           repetition_penalty=fields["repetition_penalty"],
                           min_tokens=fields["min_tokens"], prompt_logprobs=prompt_logprobs)
            seqs.append(seq)
    return seqs


# -------------------------------------------------------------------------------------- app


def make_app(engine: Engine, model_name: str = "lmjax") -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) under `model_name`."""
    tokenizer = engine.tokenizer
    registry = prom.CollectorRegistry()
    metrics = _Metrics(registry, engine)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state["draining"] = True

    app = FastAPI(title="lmjax", lifespan=lifespan)
    app.state.engine, app.state.model_name, app.state.metrics = engine, model_name, metrics

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        metrics.http.labels(request.url.path, str(error.status)).inc()
        return error.response()

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = body.get("model")
        if name is not None and name != model_name:
            raise ApiError(404, f"The model `{name}` does not exist: this server serves "
                           f"`{model_name}`", "model", kind="NotFoundError")
        return body

    def submit(seqs):
        try:
            engine.submit(seqs)
        except ServeError as e:
            raise ApiError(400, str(e), e.param) from None
        except Overloaded as e:
            raise ApiError(503, f"The server is overloaded ({e}): retry later", None,
                           kind="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None

    async def generate(request, prompts, fields, max_tokens, chat, logprobs=None, echo=False):
        """Submits the sequences and answers (streaming or not)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit_for(i):
            return lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, (i, chunk))

        seqs = _sequences(prompts, fields, max_tokens, bool(echo and logprobs is not None),
                          emit_for)
        submit(seqs)
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * fields["n"])
        choices = [_Choice(i, s) for i, s in enumerate(seqs)]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        k = logprobs or 0

        def piece(choice, chunk: Chunk, first: bool) -> tuple[str, dict | None]:
            """The chunk's text (with the echoed prompt first) and its logprobs object."""
            text, lp = chunk.text, None
            seq = choice.seq
            if echo and first:
                text = tokenizer.decode(seq.prompt_ids) + text
            if logprobs is not None:
                toks, lps, tops = list(chunk.token_ids), list(chunk.logprobs), list(
                    chunk.top_logprobs)
                if echo and first:
                    toks = seq.prompt_ids + toks
                    lps = (chunk.prompt_logprobs or [None] * len(seq.prompt_ids)) + lps
                    tops = (chunk.prompt_top_logprobs or [None] * len(seq.prompt_ids)) + tops
                lp = _logprobs_json(tokenizer, toks, lps, tops, k, len(choice.text))
            return text, lp

        async def events():
            """(choice, chunk) until every sequence has finished."""
            left = len(seqs)
            while left:
                i, chunk = await queue.get()
                yield choices[i], chunk
                if chunk.finish_reason is not None:
                    left -= 1

        def usage():
            completion = sum(len(c.seq.ids) for c in choices)
            prompt = sum(len(c.seq.prompt_ids) for c in choices[::fields["n"]])
            return {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion}

        if not fields["stream"]:
            try:
                firsts = set()
                async for choice, chunk in events():
                    text, lp = piece(choice, chunk, choice.index not in firsts)
                    firsts.add(choice.index)
                    choice.text += text
                    if lp is not None:
                        choice.lp = _merge(getattr(choice, "lp", None), lp)
                    choice.finish_reason = chunk.finish_reason or choice.finish_reason
            finally:
                for s in seqs:
                    if s.finish_reason is None:
                        engine.cancel(s)
            if any(c.finish_reason == "error" for c in choices):
                raise ApiError(500, "generation failed: " + next(
                    c.text for c in choices if c.finish_reason == "error"), kind="server_error")
            metrics.http.labels(request.url.path, "200").inc()
            if chat:
                out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
                return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                                     "model": model_name, "choices": out, "usage": usage()})
            out = [{"index": c.index, "text": c.text, "logprobs": getattr(c, "lp", None),
                    "finish_reason": c.finish_reason} for c in choices]
            return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                                 "model": model_name, "choices": out, "usage": usage()})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(choice_json):
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                          "model": model_name, "choices": [choice_json]}) + "\n\n"

        async def stream():
            firsts = set()
            try:
                if chat:
                    for c in choices:
                        yield sse({"index": c.index, "delta": {"role": "assistant",
                                                               "content": ""},
                                   "logprobs": None, "finish_reason": None})
                async for choice, chunk in events():
                    first = choice.index not in firsts
                    firsts.add(choice.index)
                    text, lp = piece(choice, chunk, first)
                    choice.text += text
                    finish = chunk.finish_reason
                    if finish == "error":
                        yield "data: " + json.dumps({"error": {
                            "message": "generation failed: " + chunk.text,
                            "type": "server_error", "param": None, "code": 500}}) + "\n\n"
                        continue
                    if chat:
                        delta = {"content": text} if text else {}
                        yield sse({"index": choice.index, "delta": delta, "logprobs": None,
                                   "finish_reason": finish})
                    else:
                        yield sse({"index": choice.index, "text": text, "logprobs": lp,
                                   "finish_reason": finish})
                if fields["include_usage"]:
                    yield "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                                 "model": model_name, "choices": [],
                                                 "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slots
                for s in seqs:
                    if s.finish_reason is None:
                        engine.cancel(s)

        metrics.http.labels(request.url.path, "200").inc()
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        fields = sampling_fields(body)
        if "prompt" not in body:
            raise ApiError(400, "prompt is required", "prompt")
        prompts = _prompts(body["prompt"], tokenizer, engine.model_config.vocab_size)
        max_tokens = _integer(body, "max_tokens", 16, 1, 2 ** 31 - 1)
        logprobs = _integer(body, "logprobs", None, 0, TOP_LOGPROBS)
        echo = _flag(body, "echo")
        if body.get("suffix") is not None:
            raise ApiError(400, "suffix is not supported", "suffix")
        return await generate(request, prompts, fields, max_tokens, chat=False,
                              logprobs=logprobs, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        fields = sampling_fields(body)
        if body.get("logprobs"):
            raise ApiError(400, "logprobs is not supported in chat completions: use "
                           "/v1/completions", "logprobs")
        text = render_chat(tokenizer, body.get("messages"))
        prompts = _prompts(text, tokenizer, engine.model_config.vocab_size)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        default = engine.context - len(prompts[0])
        max_tokens = _integer(body, name, max(default, 1), 1, 2 ** 31 - 1)
        return await generate(request, prompts, fields, max_tokens, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "lmjax",
                                            "max_model_len": engine.context}]}

    @app.get("/health")
    async def health():
        if state["draining"] or not engine.running:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    return app


def _merge(old: dict | None, new: dict) -> dict:
    if old is None:
        return new
    return {key: old[key] + new[key] for key in old}


class _Metrics:
    """Prometheus metrics (vLLM's names, `lmjax:` prefix), fed by the engine's finish hook."""

    def __init__(self, registry, engine: Engine):
        def gauge(name, doc, fn):
            prom.Gauge(name, doc, registry=registry).set_function(fn)

        self.http = prom.Counter("lmjax:http_requests", "HTTP requests answered",
                                 ["endpoint", "status"], registry=registry)
        self.finished = prom.Counter("lmjax:request_success", "Sequences finished",
                                     ["finished_reason"], registry=registry)
        self.prompt_tokens = prom.Counter("lmjax:prompt_tokens", "Prompt tokens submitted",
                                          registry=registry)
        self.generation_tokens = prom.Counter("lmjax:generation_tokens", "Tokens generated",
                                              registry=registry)
        gauge("lmjax:num_requests_running", "Sequences in decode slots", engine.active)
        gauge("lmjax:num_requests_waiting", "Sequences in the queue", engine.queue_depth)
        gauge("lmjax:generation_tokens_per_second", "Tokens per second of the decode steps",
              lambda: engine.tokens_per_second)
        gauge("lmjax:decode_slots", "Decode slots (KV-cache rows)", lambda: engine.slots)
        buckets = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
        self.ttft = prom.Histogram("lmjax:time_to_first_token_seconds", "Time to first token",
                                   buckets=buckets, registry=registry)
        self.tpot = prom.Histogram("lmjax:time_per_output_token_seconds",
                                   "Time per output token after the first", buckets=buckets,
                                   registry=registry)
        self.e2e = prom.Histogram("lmjax:e2e_request_latency_seconds", "Sequence latency",
                                  buckets=buckets, registry=registry)
        engine.on_finish.append(self.observe)

    def observe(self, seq: Sequence):
        self.finished.labels(seq.finish_reason).inc()
        self.generation_tokens.inc(len(seq.ids))
        if seq.first_token is not None:
            self.ttft.observe(seq.first_token - seq.submitted)
            self.e2e.observe(seq.finished - seq.submitted)
            if len(seq.ids) > 1:
                self.tpot.observe((seq.finished - seq.first_token) / (len(seq.ids) - 1))


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
               drain_seconds: float = 30.0, sock=None) -> None:
    """Serves `app` with uvicorn until SIGTERM or SIGINT, then drains: no new connections, the
    requests in flight finish (for up to `drain_seconds`), the engine stops; returns normally
    (exit code 0). `sock`: an already bound, listening socket (e.g. on port 0)."""
    import signal

    import uvicorn
    engine: Engine = app.state.engine
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=drain_seconds, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down: into a handler that does
    # nothing, so that the process ends with exit code 0 after the drain.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.stop(drain_seconds=drain_seconds)
