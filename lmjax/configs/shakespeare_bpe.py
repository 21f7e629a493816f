"""Subword model on the embedded Shakespeare corpus with a SentencePiece BPE tokenizer trained on it."""
from lmjax.config import default_config, preset_fields


def get_config(size: str = ""):
    config = default_config()
    config.data.source = "shakespeare"
    config.tokenizer.kind = "sentencepiece"
    config.tokenizer.model_type = "bpe"
    config.tokenizer.vocab_size = 4096
    config.model.update(preset_fields("nanogpt_char", vocab_size=0, dropout=0.1))
    config.data.seq_len, config.data.batch_size = 128, 32
    config.train.num_steps = 5000
    if size == "demo":
        config.tokenizer.vocab_size = 1024
        config.model.update(preset_fields("nanogpt_baby", vocab_size=0, max_len=128))
        config.data.seq_len, config.data.batch_size = 128, 12
        config.train.num_steps = 600
    config.train.sample_prompt = "\n"
    return config
