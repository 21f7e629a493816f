"""GPT-2 124M (Radford et al. 2019) shapes with a byte-level tokenizer by default.

GPT-2's own BPE: --config.tokenizer.kind=hf --config.tokenizer.path=models/gpt2 (a Hugging Face
folder); on a CPU use --config.data.batch_size=4 --config.data.seq_len=256.
"""
from lmjax.config import default_config, preset_fields


def get_config():
    config = default_config()
    config.data.source = "shakespeare"
    config.tokenizer.kind = "byte"
    config.model.update(preset_fields("gpt2_124m", vocab_size=50304))  # a multiple of 64: faster
    config.data.seq_len, config.data.batch_size = 1024, 8
    config.optim.learning_rate, config.optim.min_learning_rate = 6e-4, 6e-5
    config.optim.warmup_steps, config.optim.b2 = 2000, 0.95
    config.optim.grad_accum = 4
    config.train.num_steps = 100000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    return config
