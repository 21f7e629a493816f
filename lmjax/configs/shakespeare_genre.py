"""Genre classification (comedy / history / tragedy) of Shakespeare passages, whole plays held out.

    lmjax train --config=shakespeare_genre:demo --workdir=workdirs/genre \
        --config.init_from=workdirs/mlm          # fine-tune a shakespeare_mlm run (optional)

The encoder of shakespeare_mlm with model.head='classifier' (pooled [CLS] -> dropout ->
classifier) on passages of 8 lines of the embedded corpus's plays, labelled with the First
Folio's genre (lmjax/labelled.py: 2 plays of each genre validate, 2 others are the test split
of benchmarks/encoder_quality.py). Evaluation reports accuracy, macro-F1 and the confusion
matrix. `init_from` must be a run of the same model shape and tokenizer kind (WordPiece).
"""
from lmjax.configs import shakespeare_mlm


def get_config(size: str = ""):
    config = shakespeare_mlm.get_config(size)
    config.model.update(head="classifier", num_labels=3)
    config.data.seq_len = 128 if size != "demo" else 64
    config.optim.learning_rate, config.optim.min_learning_rate = 1e-4, 1e-5
    config.optim.warmup_steps = 100
    config.train.update(num_steps=2000, eval_every=250, eval_batches=-1)
    if size == "demo":
        config.optim.learning_rate, config.optim.warmup_steps = 3e-4, 20
        config.train.update(num_steps=200, eval_every=100)
    return config
