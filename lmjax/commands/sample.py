r"""`lmjax sample`: text from a trained run or a Hugging Face folder, with the KV-cache sampler.

  lmjax sample --workdir=workdirs/demo --prompt="ROMEO." --num_samples=3 --temperature=0.8
  lmjax sample --hf_model=models/gpt2 --prompt="Hello" --greedy
  lmjax sample --hf_model=models/gpt2 --adapter=my_peft_adapter --prompt="Hello"   # + LoRA
  lmjax sample --workdir=DIR --num_beams=4 --length_penalty=0.8 --no_repeat_ngram_size=3 \
      --num_return_sequences=2 --stop=$'\n\n'

The generation flags are Hugging Face `generate`'s options (lmjax.sample.SamplingConfig). With
--hf_model, the folder's generation defaults (config.json, generation_config.json) apply to the
flags not given. Loads parameters only (no optimizer state) from the newest checkpoint of
--workdir (or --step). --max_new_tokens is capped to what fits the model's context after the
prompt (with a notice).
"""
from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from lmjax import checkpoint, hf, quantize, sample
from lmjax.commands import common
from lmjax.logits_process import hf_generation_fields

_MODEL = common.define_model_flags()
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Prompt(s); repeat the flag for several.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Runs of each prompt (rows of the batch).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (a batch is reproducible given it).")
_KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"],
                                    "KV cache: the compute dtype (auto) or int8.")
_BAD_WORDS = flags.DEFINE_multi_string("bad_words", [], "Text never generated (encoded with the "
                                       "model's tokenizer into bad_words_ids); repeatable.")
# SamplingConfig fields, by name.
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate (wins over --max_length).")
flags.DEFINE_integer("max_length", None, "Prompt + new tokens (if --max_new_tokens not given).")
flags.DEFINE_integer("min_new_tokens", 0, "No end token before this many new tokens.")
flags.DEFINE_integer("min_length", 0, "No end token before prompt + new tokens reach this.")
flags.DEFINE_bool("greedy", False, "Greedy decoding (same as --temperature=0).")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0 to sample).")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
flags.DEFINE_float("repetition_penalty", 1.0, "> 1 discourages tokens already in the text.")
flags.DEFINE_integer("no_repeat_ngram_size", 0, "No n-gram of this size occurs twice (0 = off).")
flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1 = off).")
flags.DEFINE_float("length_penalty", 1.0, "Beam score: logprob / len**this.")
flags.DEFINE_enum("early_stopping", "false", ["true", "false", "never"],
                  "Beam: stop when num_beams hypotheses ended (true), when no alive beam can "
                  "beat them (false, HF's heuristic), or only when it cannot at max length.")
flags.DEFINE_integer("num_return_sequences", 1, "Outputs per prompt: samples or best beams.")
flags.DEFINE_multi_string("stop", [], "Stop string: ends a sample, not printed; repeatable.")
_FIELDS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "greedy",
           "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size",
           "num_beams", "length_penalty", "early_stopping", "num_return_sequences", "stop")
FLAGS = flags.FLAGS


def sampling_config() -> sample.SamplingConfig:
    """The SamplingConfig of the flags (with --hf_model: the folder's defaults for the flags
    not given), validated before anything is loaded or compiled."""
    def value(name):
        v = FLAGS[name].value
        return {"true": True, "false": False}.get(v, v) if name == "early_stopping" else v

    fields = {name: value(name) for name in _FIELDS}
    fields["stop"] = tuple(fields["stop"])
    if FLAGS["max_length"].present and not FLAGS["max_new_tokens"].present:
        fields["max_new_tokens"] = None
    if _MODEL.hf_model.value:
        folder = hf_generation_fields(hf.generation_defaults(_MODEL.hf_model.value))
        if "max_length" in folder and not FLAGS["max_new_tokens"].present:
            fields["max_new_tokens"] = None
        given = {name: fields[name] for name in fields if FLAGS[name].present}
        if not FLAGS["greedy"].present and any(FLAGS[n].present for n in ("temperature",
                                                                          "top_k", "top_p")):
            given["greedy"] = False  # a sampling flag asks for sampling
        fields = {**fields, **folder, **given}
    if fields["greedy"]:
        fields["temperature"] = 0.0
    return sample.SamplingConfig(**fields)


def load_model():
    """(params, model_config, tokenizer) from --workdir or --hf_model."""
    params, model_config, tokenizer = _MODEL.load()
    model_config = quantize.with_int8_kv_cache(model_config, _KV_CACHE_DTYPE.value == "int8")
    return params, model_config, tokenizer


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.setup_logging()
    _MODEL.check()
    try:  # validated here, before anything is loaded or compiled
        sampling = sampling_config()
    except ValueError as e:
        common.fail("lmjax sample", e, 2)
    if _NUM_SAMPLES.value < 1:
        common.fail("lmjax sample", ValueError(
            f"--num_samples={_NUM_SAMPLES.value} must be an integer >= 1 (samples per prompt)"), 2)
    try:
        params, model_config, tokenizer = load_model()
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        common.fail("lmjax sample", e, 1)
    if _BAD_WORDS.value:
        sampling = dataclasses.replace(sampling, bad_words_ids=sampling.bad_words_ids + tuple(
            tuple(tokenizer.encode(w)) for w in _BAD_WORDS.value))
    prompts = [p for p in _PROMPT.value for _ in range(_NUM_SAMPLES.value)]
    completions = sample.sample_text(params, model_config, tokenizer, prompts, sampling,
                                     _SEED.value)
    R = sampling.num_return_sequences
    for i, completion in enumerate(completions):
        print("-" * 40 + "\n" + prompts[i // R] + completion)


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)`: the `lmjax sample` command."""
    common.run(main, sys.argv if argv is None else argv)
