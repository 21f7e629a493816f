"""lmjax: Transformer language models in JAX/Flax."""
