r"""`lmjax eval`: perplexity, multiple choice and generation metrics of a run or a Hugging Face folder.

  lmjax eval --workdir=workdirs/demo --task=perplexity --data=val
  lmjax eval --hf_model=models/gpt2 --task=perplexity --data=wiki.test.txt --stride=512
  lmjax eval --hf_model=models/gpt2 --adapter=my_peft_adapter --task=perplexity --data=val.txt
  lmjax eval --workdir=W --task=multiple_choice --data=questions.jsonl
  lmjax eval --workdir=workdirs/demo --task=next_line --data=val --limit=200
  lmjax eval --workdir=W --task=generate --data=prompts.jsonl --greedy --stop="\n"
  lmjax eval --task=generate --data=predictions.jsonl     # scores given predictions, no model
  lmjax eval --workdir=workdirs/genre --task=classification --data=genre:test
  lmjax eval --hf_model=models/bert-sst2 --task=classification --data=dev.tsv --text_fields=sentence

--data: perplexity and next_line: text files (comma-separated globs; each file one document),
`val` (the workdir's validation documents, from its saved config), `tfds:NAME:SPLIT[:TEXT_KEY]`
or `store:PATH[:SPLIT]` (perplexity only: a `lmjax prepare` token store's split, default val,
prepared with the model's tokenizer; bits per byte from its manifest, no word perplexity);
multiple_choice: JSONL of {"context", "choices", "label"};
generate: JSONL of {"prompt", "reference"} (a string or a list of strings), or of
{"prediction", "reference"}; classification (an encoder with model.head='classifier', or a
BertForSequenceClassification folder): labelled .tsv/.csv/.jsonl files (--text_fields, one column
or two for pairs, and --label_field; default the run's data.text_fields / data.label_field, else
'text' and 'label') or `genre:train|val|test` (the Shakespeare genre task's plays).
next_line is a toy 4-way multiple choice made from text: after 3 lines, the true next line or 3
other lines of the same document (`evaluate.next_line_docs`).
--limit takes the first N documents (next_line: makes N questions; classification: N examples
evenly spaced through the data, which is often ordered by label); --max_chars cuts each text
document to its first N characters.
Prints a Markdown table and the JSON result (model, data, settings, lmjax version) and writes
it to --output; --tensorboard_dir adds the metrics as TensorBoard scalars `eval/TASK/METRIC`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

import ml_collections
from absl import app, flags

import lmjax
from lmjax import (checkpoint, classify, data, eval_metrics, evaluate, labelled, sample,
                   token_store)
from lmjax.commands import common

TASKS = ("perplexity", "multiple_choice", "next_line", "generate", "classification")

_MODEL = common.define_model_flags()
_TASK = flags.DEFINE_enum("task", None, list(TASKS), "What to evaluate.")
_DATA = flags.DEFINE_string("data", None, "The documents (see the module docstring).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Perplexity window (default model.max_len).")
_STRIDE = flags.DEFINE_integer("stride", None, "Perplexity stride (default max_len // 2).")
_PREFIX = flags.DEFINE_bool("prefix", True, "Perplexity: start documents with bos/eos.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows, questions or prompts per batch.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N documents (next_line: N questions; "
                             "classification: N evenly spaced examples).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", None, "Cut each text document to N characters.")
_DELIMITER = flags.DEFINE_string("target_delimiter", " ", "multiple_choice: before each choice.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "generate: tokens to generate.")
_GREEDY = flags.DEFINE_bool("greedy", False, "generate: greedy decoding.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "generate: softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus mass in (0, 1] (1 = off).")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "generate: beam search with this many beams.")
_STOP = flags.DEFINE_multi_string("stop", [], "generate: cut the text at this string.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: random seed.")
_TEXT_FIELDS = flags.DEFINE_string("text_fields", None, "classification: the text column (two, "
                                   "comma-separated, for pairs); default the run's, else 'text'.")
_LABEL_FIELD = flags.DEFINE_string("label_field", None, "classification: the label column; "
                                   "default the run's, else 'label'.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON result to this file.")
_TENSORBOARD_DIR = flags.DEFINE_string("tensorboard_dir", None, "Also write TensorBoard scalars.")


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-empty line (the first --limit)."""
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise app.UsageError(f"--data={path}: needs one JSON object per line")
    return docs[:_LIMIT.value]


def read_texts(spec: str, workdir: str | None, step: int | None,
               max_chars: int | None = None) -> list[str]:
    """Perplexity documents of --data (see the module docstring), each cut to max_chars."""
    if spec == "val":
        if workdir is None:
            raise app.UsageError("--data=val reads the validation split of --workdir's config")
        config = checkpoint.read_saved_config(workdir, step)
        if not config or "data" not in config:
            raise app.UsageError(
                f"--data=val: {workdir} has no saved run config (a params export keeps one only "
                "when exported with it): give the text files (--data=PATTERN), a token store "
                "(--data=store:PATH[:SPLIT]) or the training run's workdir")
        docs = data.load_texts(ml_collections.ConfigDict(config["data"]))[1]
    elif spec.startswith("tfds:"):
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise app.UsageError(f"--data={spec}: expected tfds:NAME:SPLIT[:TEXT_KEY]")
        docs = data.load_tfds_split(parts[1], parts[2], *(parts[3:] or ["text"]))
    else:
        docs = []
        for path in data_files(spec):
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
    return [d[:max_chars] for d in docs]


def data_files(spec: str) -> list[str]:
    """The files of --data's comma-separated glob patterns, each pattern's sorted; a pattern
    that matches nothing is a usage error."""
    paths = []
    for pattern in spec.split(","):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise app.UsageError(f"--data: no file matches {pattern!r}")
        paths += matches
    return paths


def store_perplexity(spec: str, params, model_config, tokenizer) -> dict:
    """--task=perplexity on --data=store:PATH[:SPLIT] (a `lmjax prepare` folder; default val)."""
    path, _, split = spec[len("store:"):].partition(":")
    if _MAX_CHARS.value:
        raise app.UsageError("--max_chars cuts text; a token store holds token ids (use --limit)")
    try:
        store = token_store.TokenStore(path)
        return evaluate.store_perplexity(params, model_config, tokenizer, store, split or "val",
                                         _MAX_LEN.value, _STRIDE.value, _BATCH_SIZE.value,
                                         _PREFIX.value, _LIMIT.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--data={spec}: {e}") from e


def read_labelled(spec: str, saved_data: dict) -> tuple[list, dict]:
    """(examples, settings) of classification's --data: `genre:SPLIT` or labelled files."""
    if spec.startswith("genre:"):
        return _spread(labelled.shakespeare_genre(spec[len("genre:"):])), {}
    text_fields = _TEXT_FIELDS.value or saved_data.get("text_fields") or "text"
    label_field = _LABEL_FIELD.value or saved_data.get("label_field") or "label"
    fields = [f.strip() for f in text_fields.split(",") if f.strip()]
    if not 1 <= len(fields) <= 2:
        raise app.UsageError(f"--text_fields={text_fields!r}: one text column, or two for pairs")
    examples = []
    for path in data_files(spec):
        examples += labelled.read_examples(path, fields, label_field)
    return _spread(examples), {"text_fields": fields, "label_field": label_field}


def _spread(examples: list) -> list:
    """--limit examples evenly spaced through `examples` (labelled files and the genre split
    are often ordered by label, so the first N would be of one label)."""
    if _LIMIT.value is None or _LIMIT.value >= len(examples):
        return examples
    step = len(examples) / _LIMIT.value
    return [examples[int(i * step)] for i in range(_LIMIT.value)]


def classifier_task(spec: str) -> tuple[dict, dict, dict]:
    """(results, model description, settings) of --task=classification."""
    for name, flag in (("adapter", _MODEL.adapter), ("weights_dtype", _MODEL.weights_dtype)):
        if flag.value:
            raise app.UsageError(f"--{name} is for decoders; --task=classification takes none")
    if _MODEL.dtype.value != "float32":
        raise app.UsageError("--task=classification runs in float32 (--dtype=float32)")
    workdir, step = _MODEL.workdir.value, _MODEL.step.value
    classifier = classify.load_classifier(workdir, _MODEL.hf_model.value, step)
    # The run's data settings (a params export exported without its config has none).
    saved = ((checkpoint.read_saved_config(workdir, step) or {}).get("data", {}) if workdir
             else {})
    model = _MODEL.describe()
    examples, settings = read_labelled(spec, saved)
    max_len = _MAX_LEN.value or saved.get("seq_len")
    settings.update(batch_size=_BATCH_SIZE.value, max_len=max_len, limit=_LIMIT.value)
    results = eval_metrics.classification(classifier, examples, _BATCH_SIZE.value, max_len)
    return results, {**model, "model_config": dataclasses.asdict(classifier.config),
                     "tokenizer": classifier.tokenizer.kind}, settings


def load_model():
    """(params, model_config, tokenizer, description) of --workdir or --hf_model."""
    params, model_config, tokenizer = _MODEL.load()
    return params, model_config, tokenizer, {
        **_MODEL.describe(), "model_config": dataclasses.asdict(model_config),
        "tokenizer": tokenizer.kind}


def sampling_config() -> sample.SamplingConfig:
    return sample.SamplingConfig(
        max_new_tokens=_MAX_NEW_TOKENS.value, greedy=_GREEDY.value,
        temperature=0.0 if _GREEDY.value else _TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, num_beams=_NUM_BEAMS.value)


def markdown_table(result: dict) -> str:
    """| metric | value | rows of the numeric results (and a classification's confusion
    matrix: rows true labels, columns predictions)."""
    results = result["results"]
    rows = [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in results.items() if isinstance(v, (int, float))]
    table = [f"| {result['task']} | |", "|---|---|", *rows]
    if "confusion" in results:
        names = results["label_names"]
        table += ["", "| true label / predicted | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        table += [f"| {name} | " + " | ".join(map(str, row)) + " |"
                  for name, row in zip(names, results["confusion"])]
    return "\n".join(table)


def write_tensorboard(directory: str, result: dict, step: int) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(directory) as writer:
        for key, value in result["results"].items():
            if isinstance(value, float):
                writer.add_scalar(f"eval/{result['task']}/{key}", value, step)


def evaluate_task(task: str, spec: str) -> tuple[dict, dict, dict]:
    """(results, model description, settings) of one --task on --data."""
    if task == "classification":
        return classifier_task(spec)
    settings = {"batch_size": _BATCH_SIZE.value}
    if task == "generate":
        docs = read_jsonl(spec)
        if all("prediction" in d for d in docs):  # given predictions: no model
            references = [d.get("reference", d.get("references")) for d in docs]
            return (eval_metrics.generation_metrics([d["prediction"] for d in docs], references),
                    {"predictions": spec}, {})
    params, model_config, tokenizer, model = load_model()
    if task == "perplexity":
        settings.update(max_len=_MAX_LEN.value, stride=_STRIDE.value, prefix=_PREFIX.value,
                        limit=_LIMIT.value, max_chars=_MAX_CHARS.value)
        if spec.startswith("store:"):
            results = store_perplexity(spec, params, model_config, tokenizer)
        else:
            texts = read_texts(spec, _MODEL.workdir.value, _MODEL.step.value,
                               _MAX_CHARS.value)[:_LIMIT.value]
            results = evaluate.text_perplexity(params, model_config, tokenizer, texts,
                                               _MAX_LEN.value, _STRIDE.value, _BATCH_SIZE.value,
                                               _PREFIX.value)
    elif task == "next_line":
        settings.update(questions=_LIMIT.value or 100, max_chars=_MAX_CHARS.value, seed=_SEED.value,
                        target_delimiter="")
        docs = evaluate.next_line_docs(read_texts(spec, _MODEL.workdir.value, _MODEL.step.value,
                                                  _MAX_CHARS.value),
                                       _LIMIT.value or 100, seed=_SEED.value)
        results = evaluate.multiple_choice(params, model_config, tokenizer, docs, "",
                                           _BATCH_SIZE.value)
    elif task == "multiple_choice":
        settings["target_delimiter"] = _DELIMITER.value
        results = evaluate.multiple_choice(params, model_config, tokenizer, read_jsonl(spec),
                                           _DELIMITER.value, _BATCH_SIZE.value)
    else:
        sampling = sampling_config()
        settings.update(sampling=dataclasses.asdict(sampling), stop=_STOP.value,
                        seed=_SEED.value)
        missing = [i for i, d in enumerate(docs) if "prompt" not in d]
        if missing:
            raise app.UsageError(f"--data={spec}: line {missing[0] + 1} has no 'prompt' "
                                 "(or give every line a 'prediction')")
        predictions = eval_metrics.generate_texts(params, model_config, tokenizer,
                                              [d["prompt"] for d in docs], sampling, _STOP.value,
                                              _SEED.value, _BATCH_SIZE.value)
        results = eval_metrics.generation_metrics(
            predictions, [d.get("reference", d.get("references")) for d in docs])
        results["samples"] = predictions[:5]
    return results, model, settings


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _TASK.value is None or _DATA.value is None:
        raise app.UsageError(f"give --task (one of {', '.join(TASKS)}) and --data")
    if _TASK.value == "generate":
        sampling_config()  # validated before anything is loaded
    common.setup_logging()
    start = time.time()
    results, model, settings = evaluate_task(_TASK.value, _DATA.value)
    data_files = [p for p in _DATA.value.split(",") if os.path.isfile(p)]
    if _DATA.value.startswith("store:"):  # the manifest holds every shard's sha256
        data_files = [os.path.join(_DATA.value[len("store:"):].partition(":")[0],
                                   token_store.MANIFEST)]
    result = {
        "lmjax_version": lmjax.__version__, "task": _TASK.value, "model": model,
        "data": {"spec": _DATA.value, "sha256": {p: hashlib.sha256(open(p, "rb").read())
                                                  .hexdigest() for p in data_files}},
        "settings": settings, "results": results, "seconds": round(time.time() - start, 3)}
    print(markdown_table(result))
    print(json.dumps(result, indent=1, default=str))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    if _TENSORBOARD_DIR.value:
        write_tensorboard(_TENSORBOARD_DIR.value, result, _MODEL.step.value or 0)


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)`: the `lmjax eval` command."""
    common.run(main, sys.argv if argv is None else argv)
