"""lmjax: Transformer language models in JAX/Flax.

Importing `lmjax` imports nothing heavy; the modules (`lmjax.train`, `lmjax.sample`, ...) are
imported by name. The command line is `lmjax COMMAND` or `python -m lmjax COMMAND`.
"""
__version__ = "0.2.0"
