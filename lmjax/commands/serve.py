r"""`lmjax-serve` (also `lmjax serve`): an OpenAI-compatible HTTP server for a trained run or a
Hugging Face folder, with continuous batching (lmjax/serve.py) and streaming.

  lmjax-serve --workdir=workdirs/demo --port=8000
  lmjax-serve --hf_model=models/gpt2 --slots=16 --weights_dtype=bfloat16 --host=0.0.0.0
  lmjax-serve --hf_model=models/gpt2 --tensor=2          # the model on a mesh of every device

Loads the model once, compiles the decode step and every prefill bucket (it logs how long),
prints `serving MODEL on http://HOST:PORT`, then answers until SIGTERM / Ctrl-C, after which it
drains (no new connections; requests in flight finish for up to --drain_seconds) and exits 0.
"""
from __future__ import annotations

import os
import socket
import sys

from absl import app, flags, logging

from lmjax import checkpoint, serve, serve_batch, serve_http
from lmjax.commands import common

_MODEL = common.define_model_flags()
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free one, printed).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name in /v1/models (default: the "
                                  "folder's name).")
_SLOTS = flags.DEFINE_integer("slots", 16, "Decode slots: sequences decoded at once.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", None, "KV-cache slots per row (default: the "
                                  "model's max_len); bounds prompt + max_tokens.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Queued sequences beyond which requests "
                                  "get 503.")
_MAX_QUEUED_TOKENS = flags.DEFINE_integer("max_queued_tokens", 1 << 20, "Queued prompt + "
                                          "max_tokens beyond which requests get 503.")
_DRAIN = flags.DEFINE_float("drain_seconds", 30.0, "On SIGTERM: how long requests in flight may "
                            "take to finish.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel ways (a mesh of every device).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "FSDP ways of the mesh.")

PROGRAM = "lmjax-serve"


def load_model():
    """(params, model_config, tokenizer): common.load_model, with --weights_dtype and --adapter."""
    return _MODEL.load()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.setup_logging()
    _MODEL.check()
    for flag, low in ((_SLOTS, 1), (_MAX_QUEUE, 1), (_MAX_QUEUED_TOKENS, 1), (_TENSOR, 1),
                      (_FSDP, 1), (_PORT, 0)):
        if flag.value < low:
            common.fail(PROGRAM, ValueError(f"--{flag.name}={flag.value} must be an integer "
                                            f">= {low}"), 2)
    if _CACHE_LEN.value is not None and _CACHE_LEN.value < 2:
        common.fail(PROGRAM, ValueError(f"--cache_len={_CACHE_LEN.value} must be >= 2"), 2)
    try:
        sock = socket.create_server((_HOST.value, _PORT.value))  # fails early if taken
    except OSError as e:
        common.fail(PROGRAM, ValueError(f"--host={_HOST.value} --port={_PORT.value}: {e}"), 2)
    try:
        params, model_config, tokenizer = load_model()
        mesh = rules = None
        if _TENSOR.value > 1 or _FSDP.value > 1:
            params, mesh, rules = serve_batch.place_on_mesh(params, model_config, _TENSOR.value,
                                                      _FSDP.value)
        engine = serve.Engine(params, model_config, tokenizer, slots=_SLOTS.value,
                              cache_len=_CACHE_LEN.value, max_queue=_MAX_QUEUE.value,
                              max_queued_tokens=_MAX_QUEUED_TOKENS.value, mesh=mesh, rules=rules)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        common.fail(PROGRAM, e, 1)
    seconds = engine.start()
    name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_MODEL.hf_model.value
                                                                  or _MODEL.workdir.value))
    host, port = sock.getsockname()[:2]
    logging.info("serve: %d slots, %d cache slots, compiled in %.1f s", engine.slots,
                 engine.cache_len, seconds)
    print(f"serving {name} on http://{host}:{port} (compiled in {seconds:.1f} s)", flush=True)
    serve_http.run_server(serve_http.make_app(engine, name), drain_seconds=_DRAIN.value,
                          sock=sock)
    print("drained; bye", flush=True)


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)`: the `lmjax-serve` command."""
    common.run(main, sys.argv if argv is None else argv)


def console() -> None:
    """The `lmjax-serve` console script."""
    run([PROGRAM] + sys.argv[1:])
