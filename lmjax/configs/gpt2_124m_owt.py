"""GPT-2 124M on OpenWebText with nanoGPT's hyperparameters (reference validation loss ~2.85).

nanoGPT's `config/train_gpt2.py`: 12 x 1024 tokens x 40 accumulation steps = 491,520 tokens per
step, AdamW lr 6e-4 -> 6e-5 (cosine over 600k steps, 2000 warmup), weight decay 0.1, beta2 0.95,
grad clip 1.0, no dropout, GPT-2's BPE with <|endoftext|> after each document, and 0.05% of the
documents held out. Here 24 x 1024 x 20 (the same tokens per step; data.batch_size is the global
batch of a micro-step: on 8 devices use --config.data.batch_size=96 --config.optim.grad_accum=5),
and the last 0.05% of the tokens validate. The ARG is the OpenWebText text files, one document
each (nanoGPT's prepare.py reads the same corpus through Hugging Face datasets):

  lmjax prepare --config=gpt2_124m_owt:'data/openwebtext/*.txt' \
      --config.tokenizer.path=models/gpt2       # once: ~9B tokens, a ~17 GB uint16 store
  lmjax train --config=gpt2_124m_owt:'data/openwebtext/*.txt' \
      --config.tokenizer.path=models/gpt2 --workdir=workdirs/owt
"""
from lmjax.config import default_config, preset_fields


def get_config(train_files: str = "data/openwebtext/*.txt"):
    config = default_config()
    config.data.source = "files"
    config.data.train_files = train_files
    config.data.val_fraction = 0.0005
    # nanoGPT trains on one stream of documents separated by <|endoftext|>; with
    # --config.data.packing=documents attention stops at document boundaries instead.
    config.data.packing = "stream"
    config.tokenizer.kind = "hf"  # GPT-2's BPE: a Hugging Face folder with tokenizer.json
    config.tokenizer.path = "models/gpt2"
    config.model.update(preset_fields("gpt2_124m", vocab_size=50304, dtype="bfloat16"))
    config.data.seq_len, config.data.batch_size = 1024, 24
    config.optim.grad_accum = 20
    config.optim.learning_rate, config.optim.min_learning_rate = 6e-4, 6e-5
    config.optim.warmup_steps, config.optim.decay_steps = 2000, 600_000
    config.optim.b1, config.optim.b2 = 0.9, 0.95
    config.optim.weight_decay, config.optim.grad_clip = 0.1, 1.0
    config.train.num_steps = 600_000
    config.train.eval_every = 1000
    config.train.eval_batches = 200 * 12 // 24  # nanoGPT: 200 batches of 12
    config.train.checkpoint_every = 1000
    config.train.log_every = 10
    config.train.sample_prompt = "\n"
    return config
