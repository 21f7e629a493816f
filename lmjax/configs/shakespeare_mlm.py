"""BERT-style masked-LM pretraining on the embedded Shakespeare corpus, WordPiece trained on it.

    lmjax train --config=shakespeare_mlm:demo --workdir=workdirs/mlm

A post-LN encoder (BERT's layout: token types, exact GELU, LayerNorm eps 1e-12) with the MLM head
tied to the word embeddings; 15% of the tokens selected, 80/10/10 (lmjax/objectives.py;
--config.data.whole_word_mask=True selects whole words). Rows are BERT's: [CLS] piece [SEP] for
each document piece of a row, attention inside each piece.
"""
from lmjax.config import default_config


def get_config(size: str = ""):
    config = default_config()
    config.data.source = "shakespeare"
    config.tokenizer.kind = "wordpiece"
    config.tokenizer.vocab_size = 4096
    config.model.update(vocab_size=0, num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024,
                        max_len=128, position="learned", norm="layernorm", norm_eps=1e-12,
                        mlp="gelu_exact", bias=True, tie_embeddings=True, dropout=0.1,
                        architecture="encoder", norm_position="post", type_vocab_size=2,
                        head="lm", num_labels=0)
    config.data.seq_len, config.data.batch_size = 128, 32
    config.optim.learning_rate, config.optim.min_learning_rate = 5e-4, 5e-5
    config.optim.weight_decay = 0.01
    config.train.num_steps = 5000
    config.train.num_samples = 0  # an encoder does not sample
    if size == "demo":
        config.tokenizer.vocab_size = 1024
        config.model.update(num_layers=2, num_heads=2, embed_dim=64, mlp_dim=256)
        config.data.seq_len, config.data.batch_size = 64, 16
        config.train.num_steps = 300
        config.optim.warmup_steps = 30
    return config
