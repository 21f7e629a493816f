"""Sequence classification with a fine-tuned encoder: texts in, labels and probabilities out.

    classifier = load_classifier(workdir="workdirs/genre")        # or hf_folder="models/bert"
    predict(classifier, ["O Romeo, Romeo!", "Once more unto the breach"])
    # [{'label': 'tragedy', 'probabilities': {'comedy': 0.1, 'history': 0.2, ...}}, ...]

The same steps as `BertForSequenceClassification.from_pretrained(...)`, the tokenizer and an
argmax: [CLS] text [SEP] (pair [SEP]) ids, padded per batch to a bucket length, one jitted
forward pass, softmax. A workdir's label names are its labels.json; an HF folder's its
config.json id2label. Regression models (num_labels=1) return {'score': value}.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from lmjax import checkpoint as checkpoint_lib
from lmjax import encoder as encoder_lib
from lmjax import hf_bert
from lmjax import labelled
from lmjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Classifier:
    config: ModelConfig
    params: dict
    tokenizer: object
    label_names: list[str]


def load_classifier(workdir: str | None = None, hf_folder: str | None = None,
                    step: int | None = None) -> Classifier:
    """A fine-tuned classifier from exactly one of a training workdir (newest verified
    checkpoint, or `step`) or a Hugging Face BertForSequenceClassification folder."""
    if (workdir is None) == (hf_folder is None):
        raise ValueError("give exactly one of workdir or hf_folder")
    if hf_folder is not None:
        config, params, tokenizer, names = hf_bert.load_hf_bert(hf_folder)
    else:
        params, config, tokenizer = checkpoint_lib.load_params(workdir, step)
        names = labelled.load_label_names(workdir)
    if config.head != "classifier":
        raise ValueError(f"{workdir or hf_folder} holds a model with head={config.head!r}, not "
                         "a sequence classifier (model.head='classifier')")
    if tokenizer is None:
        raise ValueError(f"{workdir or hf_folder} has no tokenizer")
    names = list(names or [f"LABEL_{i}" for i in range(config.num_labels)])
    return Classifier(config, params, tokenizer, names)


@functools.lru_cache(maxsize=8)
def _forward(config: ModelConfig):
    def apply(params, batch):
        logits_BxN = encoder_lib.Encoder(config).apply(
            {"params": params}, batch["inputs"], attention_mask=batch["mask"] > 0,
            token_types_BxL=batch["token_types"])
        return logits_BxN if config.num_labels == 1 else jax.nn.softmax(logits_BxN, -1)
    return jax.jit(apply)


def predict(classifier: Classifier, texts: Sequence[str], pairs: Sequence[str] | None = None,
            batch_size: int = 32, max_len: int | None = None) -> list[dict]:
    """One dict per text: {'label', 'probabilities': {name: p}} ({'score'} for regression).
    `pairs`: second sentences (sentence-pair tasks); max_len defaults to the model's."""
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(pairs)} pairs for {len(texts)} texts")
    max_len = max_len or classifier.config.max_len
    inputs = [(t,) if pairs is None else (t, p) for t, p in zip(texts, pairs or texts)]
    ids, types = labelled.encode_examples(classifier.tokenizer, inputs, max_len)
    forward, names, out = _forward(classifier.config), classifier.label_names, []
    for start in range(0, len(ids), batch_size):
        batch = labelled.pad_batch(ids[start:start + batch_size], types[start:start + batch_size],
                                   max_len, classifier.tokenizer.pad_id or 0, batch_size)
        n = min(batch_size, len(ids) - start)
        values = np.asarray(forward(classifier.params, {k: v for k, v in batch.items()
                                                        if k != "weight"}))[:n]
        for row in values:
            if classifier.config.num_labels == 1:
                out.append({"score": float(row[0])})
            else:
                out.append({"label": names[int(np.argmax(row))],
                            "probabilities": {name: float(p) for name, p in zip(names, row)}})
    return out
