"""Evaluation of outputs: generated text against references, and encoder classifiers.

* `generation_metrics`: corpus BLEU and chrF by `sacrebleu` (with their signatures) and mean
  ROUGE-1/2/L/Lsum F-measures by `rouge-score`; nothing here re-implements a metric.
* `generate_texts`: the completions to score (`sample.sample_text`), cut at stop strings as
  lm-evaluation-harness cuts them (`sample.cut_at_stop`).
* `classification`: accuracy, macro-F1 and the confusion matrix of an encoder classifier
  (`classify.predict`'s labels, scored by `objectives.confusion_metrics`, what the
  classification training's evaluation reports).

Log-likelihood evaluation (perplexity, multiple choice) is evaluate.py's.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lmjax import classify, objectives, sample
from lmjax.config import ModelConfig

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ------------------------------------------------------------------------- generation metrics


def _reference_lists(references: Sequence) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r or not all(isinstance(x, str) for x in r) for r in refs):
        raise ValueError("each reference must be a string or a non-empty list of strings")
    return refs


def generation_metrics(predictions: Sequence[str], references: Sequence) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu, default settings, with their signatures) and mean
    ROUGE-1/2/L/Lsum F-measures (rouge-score with Porter stemming; the best reference per
    prediction; x 100 like BLEU and chrF; Lsum splits summaries into sentences at newlines).

    references: one string, or a list of strings (several references), per prediction.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: "
                         "give one (non-empty) list of each, of equal length")
    refs = _reference_lists(references)
    most = max(len(r) for r in refs)
    # sacrebleu takes reference streams; a missing reference in a stream is None.
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(most)]
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(list(predictions), streams)
    chrf_score = chrf.corpus_score(list(predictions), streams)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rouge = {t: [] for t in ROUGE_TYPES}
    for prediction, ref in zip(predictions, refs):
        scores = scorer.score_multi(ref, prediction)
        for t in ROUGE_TYPES:
            rouge[t].append(scores[t].fmeasure)
    return {"bleu": bleu_score.score, "bleu_signature": str(bleu.get_signature()),
            "chrf": chrf_score.score, "chrf_signature": str(chrf.get_signature()),
            **{t: 100 * float(np.mean(v)) for t, v in rouge.items()},
            "rouge_settings": "rouge-score, use_stemmer=True, F-measure x 100, best reference",
            "predictions": len(predictions)}


def generate_texts(params, model_config: ModelConfig, tokenizer, prompts: Sequence[str],
                   sampling: sample.SamplingConfig, stop: Sequence[str] = (), seed: int = 0,
                   batch_size: int = 8) -> list[str]:
    """Completions of `prompts` by `sample.sample_text` (batches of `batch_size`), each cut at
    the first stop string. (The sampler stops at the end token or max_new_tokens; stop strings
    are applied afterwards.)"""
    out = []
    for start in range(0, len(prompts), batch_size):
        out += sample.sample_text(params, model_config, tokenizer,
                                  list(prompts[start:start + batch_size]), sampling,
                                  seed + start)
    return [sample.cut_at_stop(text, stop) for text in out]


# ----------------------------------------------------------------------------- classification


def classification(classifier: classify.Classifier,
                   examples: Sequence[tuple[tuple[str, ...], str]], batch_size: int = 32,
                   max_len: int | None = None) -> dict[str, Any]:
    """accuracy, macro-F1 and confusion matrix (rows: true labels, columns: predictions, in the
    order of `label_names`) of a classifier (`classify.load_classifier`) on labelled examples
    [((text,) or (text, pair), label name)] (`labelled.read_examples`, `shakespeare_genre`).
    Each example is cut to max_len tokens (default the model's), as `classify.predict` does."""
    names = classifier.label_names
    if classifier.config.num_labels < 2:
        raise ValueError("classification needs a model with num_labels >= 2 (this one is a "
                         "regression model, num_labels=1)")
    if not examples:
        raise ValueError("classification: no examples")
    unknown = sorted({label for _, label in examples if label not in names})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the model's labels {names}")
    widths = {len(texts) for texts, _ in examples}
    if widths - {1, 2} or len(widths) > 1:
        raise ValueError("examples must all be single texts or all sentence pairs")
    pairs = [texts[1] for texts, _ in examples] if widths == {2} else None
    predicted = [p["label"] for p in classify.predict(
        classifier, [texts[0] for texts, _ in examples], pairs, batch_size, max_len)]
    index = {name: i for i, name in enumerate(names)}
    confusion_NxN = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion_NxN, ([index[y] for _, y in examples], [index[p] for p in predicted]), 1)
    return {**objectives.confusion_metrics(confusion_NxN), "label_names": list(names),
            "examples": len(examples), "predictions": predicted}
