"""The serving engine and its OpenAI-compatible HTTP API, against offline `generate` (itself tested
against transformers), transformers' warpers and chat templates, and real clients (the official
`openai` package, raw httpx) on 127.0.0.1. No timing windows: the engine's pause / step / finish
hooks order the events."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn

from conftest import write_random_gpt2
from lmjax import hf, sample as sample_lib, serve, serve_http, tokenizers
from lmjax.config import preset
from lmjax.model import Transformer, init_params
from lmjax.sample import SamplingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "".join(f"{i} little pigs went to market; {i * 7 % 13} came home.\n" for i in range(50))
TOKENIZER = tokenizers.CharTokenizer.train([TEXT])
# A tiny GPT-2 (init_std 0.3: peaked next-token distributions, as a trained model's).
CONFIG = preset("nanogpt_baby", vocab_size=TOKENIZER.vocab_size, embed_dim=32, mlp_dim=64,
                num_layers=2, num_heads=4, init_std=0.3, max_len=64)
PARAMS = init_params(CONFIG, jax.random.key(0))
PROMPTS = ["1 little", "12 pigs went to market; 3 ca", "7", "40 little pigs w", "home.\n2 l",
           "9 came", "33 little pigs went to ", "5 l"]


def ids(text):
    return TOKENIZER.encode(text)


def generate(prompt_ids, max_new_tokens, seed=0, **sampling):
    out = sample_lib.generate(PARAMS, CONFIG, [prompt_ids], SamplingConfig(
        max_new_tokens=max_new_tokens, **sampling), rng=seed)
    return np.asarray(out.tokens)[0].tolist(), np.asarray(out.logprobs)[0].tolist()


def make_engine(**kw):
    engine = serve.Engine(PARAMS, CONFIG, TOKENIZER, **{"slots": 4, **kw})
    engine.start()
    return engine


def run_all(engine, seqs):
    """Submits sequences and waits until every one has finished: {seq: its chunks}."""
    chunks = {id(s): [] for s in seqs}
    for s in seqs:
        s.emit = chunks[id(s)].append
    engine.submit(seqs)
    assert engine.wait_until(lambda e: all(s.finish_reason for s in seqs), 120)
    return chunks


# ------------------------------------------------------------------------------ the engine


def test_warp_rows_equals_transformers_warpers_per_row():
    from transformers import generation as hf_gen
    import torch
    logits = np.asarray(jax.random.normal(jax.random.key(1), (4, 50))) * 3
    settings = [(0.7, 0, 0.9), (1.0, 5, 1.0), (1.3, 8, 0.6), (0.5, 0, 1.0)]
    warped = np.asarray(sample_lib.lp_lib.warp_rows(
        logits, *(np.array(col) for col in zip(*settings))))
    for row, (t, k, p) in enumerate(settings):
        x = torch.tensor(logits[row:row + 1])
        x = hf_gen.TemperatureLogitsWarper(t)(None, x)
        if k:
            x = hf_gen.TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = hf_gen.TopPLogitsWarper(p)(None, x)
        np.testing.assert_allclose(warped[row], x.numpy()[0], rtol=1e-6)


def test_process_rows_equals_transformers_processors_per_row():
    """Each row's repetition penalty and min-new-tokens ban, as transformers' processors."""
    from transformers import generation as hf_gen
    import torch
    V = 40
    logits = np.asarray(jax.random.normal(jax.random.key(2), (3, V))) * 3
    history = [[3, 5, 5, 9], [1, 2], [7, 7, 8]]  # prompt + generated tokens of each row
    penalty, min_new, steps, ends = [1.3, 1.0, 0.7], [0, 4, 2], [2, 1, 2], [[4, -1], [0, 6], [7, -1]]
    seen = np.zeros((3, V), bool)
    for row, ids in enumerate(history):
        seen[row, ids] = True
    out = np.asarray(sample_lib.lp_lib.process_rows(
        logits, seen, np.array(penalty, np.float32), np.array(ends, np.int32),
        np.array(min_new), np.array(steps)))
    for row, ids in enumerate(history):
        x = torch.tensor(logits[row:row + 1])
        x = hf_gen.RepetitionPenaltyLogitsProcessor(penalty[row])(torch.tensor([ids]), x)
        prompt = len(ids) - steps[row]  # HF counts the new tokens from the prompt length
        x = hf_gen.MinNewTokensLengthLogitsProcessor(
            prompt, min_new[row], [e for e in ends[row] if e >= 0])(torch.tensor([ids]), x)
        np.testing.assert_allclose(out[row], x.numpy()[0], rtol=1e-6)


def test_greedy_and_seeded_requests_equal_offline_generate():
    """Six requests through four slots: later ones are inserted while others decode, and the
    cache shifts (its write slot passes the end); each equals `generate` of its prompt alone."""
    engine = make_engine()
    short = [p for p in PROMPTS if len(p) <= 16]  # one bucket: one compile of generate
    try:
        seqs = [serve.Sequence(ids(p), 40, None, temperature=0.0) for p in short]
        seqs += [serve.Sequence(ids(p), 40, None, temperature=0.9, top_k=6, top_p=0.9, seed=7,
                                choice=1) for p in short[:2]]
        chunks = run_all(engine, seqs)
        assert engine.steps > 64 - 16  # the write slot passed the end of the cache
    finally:
        engine.stop()
    for s in seqs[:len(short)]:
        assert s.ids == generate(s.prompt_ids, 40, temperature=0.0)[0]
        assert s.finish_reason == "length"
        assert "".join(c.text for c in chunks[id(s)]) == TOKENIZER.decode(s.ids)
    for s in seqs[len(short):]:  # generate's row 1 of num_return_sequences=2, seed 7
        out = sample_lib.generate(PARAMS, CONFIG, [s.prompt_ids], SamplingConfig(
            max_new_tokens=40, temperature=0.9, top_k=6, top_p=0.9, num_return_sequences=2),
            rng=7)
        assert s.ids == np.asarray(out.tokens)[1].tolist()
        np.testing.assert_allclose(s._logprobs, np.asarray(out.logprobs)[1], atol=2e-5)


def test_seeded_request_same_alone_or_among_15_others():
    def request(emit=None):
        return serve.Sequence(ids("21 little pigs"), 20, emit, temperature=1.0, top_p=0.95,
                              seed=1234)

    engine = make_engine(slots=16)
    try:
        alone = request()
        run_all(engine, [alone])
        rng = np.random.default_rng(0)
        others = [serve.Sequence(ids(PROMPTS[i % 8]), int(rng.integers(3, 30)), None,
                                 temperature=float(rng.choice([0.0, 0.7, 1.5])),
                                 top_k=int(rng.integers(0, 10)), seed=i) for i in range(15)]
        crowded, start = request(emit=lambda chunk: None), engine.steps
        # The request arrives after the others have decoded three steps.
        engine.on_step.append(lambda e: e.steps == start + 3 and not crowded.submitted
                              and e.submit(crowded))
        run_all(engine, others)
        assert engine.wait_until(lambda e: crowded.finish_reason is not None, 120)
    finally:
        engine.stop()
    assert crowded.ids == alone.ids and len(alone.ids) == 20


def test_stop_strings_are_held_back_and_cut():
    assert serve.held_back("abc\n\n1", ("\n\n2",)) == 0
    assert serve.held_back("abc\n\n", ("\n\n2",)) == 2
    assert serve.held_back("ab\ufffd", ()) == 1
    engine = make_engine()
    try:
        free, = [serve.Sequence(ids("3 little"), 30, None, temperature=0.0)]
        run_all(engine, [free])
        text = TOKENIZER.decode(free.ids)
        stop = text[7:10]
        cut = serve.Sequence(ids("3 little"), 30, None, temperature=0.0, stop=("zzz", stop))
        chunks = run_all(engine, [cut])[id(cut)]
    finally:
        engine.stop()
    assert cut.finish_reason == "stop"
    assert "".join(c.text for c in chunks) == text[:text.find(stop)]


# ------------------------------------------------------------------------------------ HTTP


class Server:
    """The app of an engine, served by uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, engine, name="tiny"):
        self.engine = engine
        self.app = serve_http.make_app(engine, name)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.engine.stop()


@pytest.fixture(scope="module")
def server():
    s = Server(make_engine(max_queue=64))
    yield s
    s.close()


def test_openai_client_completions(server):
    client = server.client()
    prompt = PROMPTS[1]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                    logprobs=2)
    tokens, logprobs = generate(ids(prompt), 10, temperature=0.0)
    choice, = out.choices
    assert choice.text == TOKENIZER.decode(tokens) and choice.finish_reason == "length"
    np.testing.assert_allclose(choice.logprobs.token_logprobs, logprobs, atol=2e-5)
    assert [len(t) for t in choice.logprobs.top_logprobs] == [2] * 10
    assert out.usage.prompt_tokens == len(ids(prompt)) and out.usage.completion_tokens == 10
    # A list of prompts, n choices each, seeded: prompt i's choices are i * n .. i * n + n - 1.
    many = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, n=3,
                                     seed=5, temperature=1.0)
    again = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, n=3,
                                      seed=5, temperature=1.0)
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    for c in many.choices:
        out = sample_lib.generate(PARAMS, CONFIG, [ids(PROMPTS[c.index // 3])], SamplingConfig(
            max_new_tokens=8, num_return_sequences=3), rng=5)
        assert c.text == TOKENIZER.decode(np.asarray(out.tokens)[c.index % 3])
    # Streaming: the chunks add up to the same text; a stop string never reaches a chunk.
    text = TOKENIZER.decode(tokens)
    stop = text[4:7]
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                       temperature=0, stream=True, stop=[stop])
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
    assert "".join(t for t, _ in pieces) == text[:text.find(stop)]
    assert pieces[-1][1] == "stop"


def test_echo_logprobs_are_the_full_forward_pass(server):
    prompt = ids(PROMPTS[3])
    out = httpx.post(server.url + "/v1/completions", json={
        "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
        timeout=60).json()
    logits = Transformer(CONFIG).apply({"params": PARAMS}, np.array([prompt]))[0]
    reference = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(prompt) + 1
    expected = reference[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(prompt)], expected, atol=2e-5)
    assert out["choices"][0]["text"].startswith(PROMPTS[3])
    assert lp["text_offset"][:3] == [0, 1, 2]


def test_vllm_extensions_equal_offline_generate(server, monkeypatch):
    """repetition_penalty, min_tokens, stop_token_ids and ignore_eos (vLLM's request fields)
    against `generate`'s repetition_penalty, min_new_tokens and eos_ids (tested against
    transformers); the extensions go through the openai client's extra_body."""
    client, prompt = server.client(), PROMPTS[0]

    def served(**extra):
        choice, = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                            temperature=extra.pop("temperature", 0),
                                            seed=3, extra_body=extra).choices
        return choice.text, choice.finish_reason

    def offline(**sampling):
        out = sample_lib.generate(PARAMS, CONFIG, [ids(prompt)], SamplingConfig(
            max_new_tokens=16, **{"temperature": 0.0, **sampling}), rng=3)
        return TOKENIZER.decode(np.asarray(out.tokens)[0, :int(out.lengths[0])].tolist())

    assert served(repetition_penalty=1.5)[0] == offline(repetition_penalty=1.5)
    assert served(repetition_penalty=1.5)[0] != offline()  # the penalty changes this text
    assert served(repetition_penalty=0.8, temperature=1.0)[0] == offline(
        repetition_penalty=0.8, temperature=1.0)
    free = ids(offline())
    first = next(i for i in range(2, 16) if free[i] not in free[:i])
    end = free[first]  # a token greedy first emits after two others, as an end token
    assert served(stop_token_ids=[end]) == (offline(eos_ids=(end,)), "stop")
    assert len(offline(eos_ids=(end,))) == first + 1
    with_min = served(stop_token_ids=[end], min_tokens=6)
    assert with_min[0] == offline(eos_ids=(end,), min_new_tokens=6) != offline(eos_ids=(end,))
    monkeypatch.setattr(server.engine, "_eos", (end,))  # as if it were the tokenizer's eos
    assert served() == (offline(eos_ids=(end,)), "stop")
    assert served(ignore_eos=True) == (offline(), "length")


def test_sse_framing_and_endpoints(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "4 little", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 64
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("lmjax:num_requests_running", "lmjax:num_requests_waiting",
                 "lmjax:request_success_total", "lmjax:generation_tokens_per_second",
                 "lmjax:time_to_first_token_seconds_bucket",
                 "lmjax:time_per_output_token_seconds_bucket"):
        assert name in metrics


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 64}, 400, "max_tokens"),  # 1 + 64 > the context of 64
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": "a", "seed": -3}, 400, "seed"),
    ({"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "a", "max_tokens": 3, "min_tokens": 5}, 400, "min_tokens"),
    ({"prompt": "a", "stop_token_ids": [999]}, 400, "stop_token_ids"),
    ({"prompt": "a", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"prompt": "a", "no_repeat_ngram_size": 2}, 400, "no_repeat_ngram_size"),
    ({"prompt": [[1, 2], "x", 3]}, 400, "prompt"),
    ({"prompt": [999]}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-5"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),  # no chat template
])
def test_bad_requests_get_openai_errors_before_any_compute(server, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    steps = server.engine.steps
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] or param == "messages"
    assert error["type"] and server.engine.steps == steps and not server.engine.queue_depth()


def test_errors_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="tiny", prompt="a", max_tokens=80)
    assert "maximum context length is 64" in e.value.message
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_load_200_requests_at_concurrency_32(server):
    async def main():
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def one(i):
                async with limit:
                    body = {"prompt": PROMPTS[i % 8], "max_tokens": 1 + i % 7, "seed": i,
                            "stream": i % 2 == 1}
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    if i % 2:
                        events = r.text.split("\n\n")
                        assert events[-2] == "data: [DONE]"
                        return [json.loads(e[6:]) for e in events[:-2]]
                    return [r.json()]
            return await asyncio.gather(*(one(i) for i in range(200)))

    before = server.engine.generated_tokens
    answers = asyncio.run(main())
    for i, chunks in enumerate(answers):
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len({c["id"] for c in chunks}) == 1
    assert len({chunks[0]["id"] for chunks in answers}) == 200  # none lost or duplicated
    assert server.engine.generated_tokens - before == sum(1 + i % 7 for i in range(200))
    assert server.engine.wait_until(lambda e: e.active() == 0 and e.queue_depth() == 0, 10)


def test_client_disconnect_frees_its_slot(server):
    engine, finished = server.engine, []
    engine.on_finish.append(finished.append)
    paused = []

    def pause_after_first_token(e):
        if not paused and any(r is not None and r.ids for r in e._rows):
            paused.append(e.steps)
            e.pause()
    engine.on_step.append(pause_after_first_token)
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json={
                "prompt": "8 little", "max_tokens": 50, "stream": True}, timeout=60) as r:
            next(r.iter_lines())  # the first chunk; then the client goes away
        # Paused as well: the client can go (and be cancelled) before the step that pauses, and
        # a resume before that pause would let the hook hold the loop for good.
        assert engine.wait_until(lambda e: e.paused and any(r is not None and r.cancelled
                                                            for r in e._rows), 30)
        engine.resume()
        assert engine.wait_until(lambda e: e.active() == 0, 30)
    finally:
        engine.on_step.remove(pause_after_first_token)
        engine.on_finish.remove(finished.append)
        engine.resume()
    seq, = finished
    assert seq.finish_reason == "cancelled" and len(seq.ids) < 50
    assert engine.steps == paused[0]  # freed before the next step


def test_full_queue_answers_503_with_retry_after():
    s = Server(make_engine(max_queue=3))  # 4 slots, as the module server: no new compile
    try:
        s.engine.pause()
        with httpx.Client(base_url=s.url, timeout=60) as client:
            done = []
            threads = [threading.Thread(target=lambda: done.append(client.post(
                "/v1/completions", json={"prompt": "1", "max_tokens": 3}))) for _ in range(3)]
            for t in threads:
                t.start()
            assert s.engine.wait_until(lambda e: e.queue_depth() == 3, 30)
            r = client.post("/v1/completions", json={"prompt": "1", "max_tokens": 3})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_overloaded"
            s.engine.resume()
            for t in threads:
                t.join()
        assert [r.status_code for r in done] == [200] * 3
    finally:
        s.close()


# ------------------------------------------------------------------------------------- chat


def test_chat_completions_with_the_tokenizers_chat_template(tmp_path):
    import transformers
    folder = str(tmp_path / "gpt2")
    write_random_gpt2(folder, TEXT * 4, vocab_size=300, n_positions=128)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}bot:{% endif %}")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "chat_template": template}, f)
    config, params, tokenizer = hf.load_hf(folder)
    messages = [{"role": "user", "content": "7 pigs"}]
    reference = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert serve_http.render_chat(tokenizer, messages) == reference
    engine = serve.Engine(params, config, tokenizer, slots=2, cache_len=32)
    engine.start()
    s = Server(engine, "gpt2")
    try:
        client = s.client()
        out = client.chat.completions.create(model="gpt2", messages=messages, max_tokens=6,
                                             temperature=0)
        tokens, _ = sample_lib.generate(params, config, [tokenizer.encode(reference)],
                                        SamplingConfig(max_new_tokens=6, temperature=0.0,
                                                       eos_ids=(tokenizer.eos_id,)))[:2]
        row = np.asarray(tokens)[0].tolist()
        assert out.choices[0].message.content == tokenizer.decode(row)
        assert out.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model="gpt2", messages=messages, max_tokens=6,
                                                temperature=0, stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
            out.choices[0].message.content
    finally:
        s.close()


# --------------------------------------------------------------------- processes and meshes


def test_sigterm_drains_the_request_in_flight_then_exits_0(tmp_path):
    folder = str(tmp_path / "tiny")
    hf.save_hf(folder, CONFIG, PARAMS, TOKENIZER)
    server = subprocess.Popen(
        [sys.executable, "-m", "lmjax", "serve", f"--hf_model={folder}", "--port=0",
         "--slots=1", "--cache_len=32"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = server.stdout.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), server.stderr.read()
        url = line.split()[3]
        with httpx.stream("POST", url + "/v1/completions", json={
                "prompt": "2 little", "max_tokens": 20, "temperature": 0, "stream": True},
                timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            server.send_signal(signal.SIGTERM)
            events = [first] + [e for e in lines if e]
        assert server.wait(timeout=60) == 0, server.stderr.read()
    finally:
        server.kill()
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert text == TOKENIZER.decode(generate(ids("2 little"), 20, temperature=0.0)[0])
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_a_mesh_with_tensor_2_serves_the_tokens_of_one_device():
    worker = os.path.join(os.path.dirname(__file__), "serve_worker.py")
    done = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep
                                   + os.path.dirname(__file__) + os.pathsep
                                   + os.environ.get("PYTHONPATH", ""),
                                   XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["devices"] == 8 and result["cache_sharded"]
    assert result["mesh"] == result["single"]


# ----------------------------------------------------------------------------- lm_eval client


@pytest.mark.slow  # two lm_eval runs and a fresh engine's compiles
def test_lm_eval_local_completions_scores_equal_lmjax_model(tmp_path, pigs_text):
    """lm-evaluation-harness's `local-completions` model (its OpenAI-completions client: token
    ids as prompts, loglikelihoods from `echo` + `logprobs=1`, generation with `stop`) pointed at
    the server gives the accuracy, loglikelihoods and texts of lmjax's own lm_eval model on the
    same weights. Its tokenizer is the folder's, through transformers (`tokenizer_backend=
    huggingface`: the server has no /tokenize endpoint, so lm_eval's `auto` would pick it too)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_lm_eval import write_tasks  # the tasks test_lm_eval checks lmjax's model on
    folder = tmp_path / "gpt2"
    write_random_gpt2(str(folder), pigs_text, vocab_size=300, n_positions=64)
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", pigs_text.splitlines())
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    tasks = ["lmjax_test_mc", "lmjax_test_gen"]
    config, params, tokenizer = hf.load_hf(str(folder))
    engine = serve.Engine(params, config, tokenizer, slots=2)
    engine.start()
    server = Server(engine, "gpt2")
    try:
        served = lm_eval.simple_evaluate(
            model="local-completions", model_args=(
                f"model=gpt2,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={folder},tokenized_requests=True,max_length=64,max_retries=1"),
            tasks=tasks, task_manager=manager, batch_size=8, log_samples=True)
    finally:
        server.close()
    ours = lm_eval.simple_evaluate(model="lmjax", model_args=f"hf_model={folder}", tasks=tasks,
                                   task_manager=manager, batch_size=16, log_samples=True)
    for out in (served, ours):
        assert out["results"]["lmjax_test_mc"]["acc,none"] == \
            ours["results"]["lmjax_test_mc"]["acc,none"]
    lls, our_lls = ([r[0][0] for s in out["samples"]["lmjax_test_mc"] for r in s["resps"]]
                    for out in (served, ours))
    assert len(lls) == 40
    np.testing.assert_allclose(lls, our_lls, atol=1e-4)
    texts, our_texts = ([s["resps"][0][0] for s in out["samples"]["lmjax_test_gen"]]
                        for out in (served, ours))
    assert texts == our_texts and any(texts)
