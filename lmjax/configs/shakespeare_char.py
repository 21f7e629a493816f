"""Character-level model on the embedded complete works of Shakespeare (42 works, 5.1M chars).

  --config=shakespeare_char       nanoGPT's shakespeare_char model
  --config=shakespeare_char:demo  a small model that trains on a CPU in minutes
"""
from lmjax.config import default_config, preset_fields


def get_config(size: str = ""):
    config = default_config()
    config.data.source = "shakespeare"  # whole plays are held out for validation
    config.tokenizer.kind = "char"
    if size == "demo":
        config.model.update(preset_fields("nanogpt_baby", vocab_size=0, max_len=128,
                                          position="rope"))
        config.data.seq_len, config.data.batch_size = 128, 12
        config.train.num_steps = 800
        config.train.eval_every = 200
        config.train.checkpoint_every = 200
    else:  # nanoGPT config/train_shakespeare_char.py
        config.model.update(preset_fields("nanogpt_char", vocab_size=0))
        config.data.seq_len, config.data.batch_size = 256, 64
        config.train.num_steps = 5000
        config.optim.warmup_steps = 100
    config.train.sample_prompt = "\n"
    return config
