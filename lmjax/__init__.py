"""lmjax: Transformer language models in JAX/Flax.

Importing `lmjax` imports nothing heavy; the modules (`lmjax.train`, `lmjax.sample`, ...) are
imported by name. The command line is `lmjax COMMAND` or `python -m lmjax COMMAND`.
`lmjax.pipeline("text-generation", model=FOLDER)` is Hugging Face's one-call API
(lmjax/pipelines.py).
"""
__version__ = "0.2.0"


def pipeline(task: str, model: str, **kwargs):
    """`lmjax.pipelines.pipeline`: imported on first use, so that `import lmjax` stays light."""
    from lmjax import pipelines
    return pipelines.pipeline(task, model, **kwargs)
