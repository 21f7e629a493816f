"""`lmjax classify`: labels and probabilities for texts, from a fine-tuned run or an HF folder.

  lmjax classify --workdir=workdirs/genre --text="O Romeo, Romeo!" --text="Once more unto..."
  lmjax classify --hf_model=models/bert-sst2 --text="a gripping film" --json

One line per text: the label and the probabilities (--json: one JSON object per line).
"""
from __future__ import annotations

import json

from absl import app, flags

from lmjax import classify
from lmjax.commands import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (model.head='classifier').")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_HF_MODEL = flags.DEFINE_string("hf_model", None, "A Hugging Face BertForSequenceClassification "
                                "folder instead.")
_TEXT = flags.DEFINE_multi_string("text", [], "Text to classify; repeat the flag for several.")
_PAIR = flags.DEFINE_multi_string("pair", [], "Second sentence of each text (pair tasks).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per text.")


def _main(argv) -> None:
    del argv
    if not _TEXT.value:
        raise app.UsageError("give at least one --text")
    classifier = classify.load_classifier(_WORKDIR.value, _HF_MODEL.value, _STEP.value)
    results = classify.predict(classifier, _TEXT.value, _PAIR.value or None)
    for text, result in zip(_TEXT.value, results):
        if _JSON.value:
            print(json.dumps({"text": text, **result}))
        elif "score" in result:
            print(f"{result['score']:.4f}\t{text}")
        else:
            probabilities = " ".join(f"{k}={v:.3f}" for k, v in result["probabilities"].items())
            print(f"{result['label']}\t{probabilities}\t{text}")


def run(argv: list[str]) -> None:
    common.run(_main, argv)
