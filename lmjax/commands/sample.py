r"""`lmjax sample`: text from a trained run or a Hugging Face folder, with the KV-cache sampler.

  lmjax sample --workdir=workdirs/demo --prompt="ROMEO." --num_samples=3 --temperature=0.8
  lmjax sample --hf_model=models/gpt2 --prompt="Hello" --greedy
  lmjax sample --workdir=DIR --num_beams=4 --length_penalty=0.8

Loads parameters only (no optimizer state) from the newest checkpoint of --workdir (or --step).
--max_new_tokens is capped to what fits the model's context after the prompt (with a notice).
"""
from __future__ import annotations

import sys

from absl import app, flags

from lmjax import checkpoint, hf, sample
from lmjax.commands import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, step folder or params export.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_HF_MODEL = flags.DEFINE_string("hf_model", None, "A Hugging Face model folder instead.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Prompt(s); repeat the flag for several.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding (same as --temperature=0).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0 to sample).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1 = off).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam score: logprob / len**this.")
_EARLY_STOPPING = flags.DEFINE_bool("early_stopping", False, "Beam: stop when beams have ended.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (a batch is reproducible given it).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--hf_model dtype.")


def load_model():
    """(params, model_config, tokenizer) from --workdir or --hf_model."""
    if (_WORKDIR.value is None) == (_HF_MODEL.value is None):
        raise app.UsageError("give exactly one of --workdir and --hf_model")
    if _HF_MODEL.value:
        model_config, params, tokenizer = hf.load_hf(_HF_MODEL.value, _DTYPE.value)
        if tokenizer is None:
            raise app.UsageError(f"{_HF_MODEL.value} has no tokenizer.json or tokenizer.model")
        return params, model_config, tokenizer
    return checkpoint.load_params(_WORKDIR.value, step=_STEP.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.setup_logging()
    try:  # validated here, before anything is loaded or compiled
        sampling = sample.SamplingConfig(
            max_new_tokens=_MAX_NEW_TOKENS.value, greedy=_GREEDY.value,
            temperature=0.0 if _GREEDY.value else _TEMPERATURE.value, top_k=_TOP_K.value,
            top_p=_TOP_P.value, num_beams=_NUM_BEAMS.value,
            length_penalty=_LENGTH_PENALTY.value, early_stopping=_EARLY_STOPPING.value)
    except ValueError as e:
        common.fail("lmjax sample", e, 2)
    if _NUM_SAMPLES.value < 1:
        common.fail("lmjax sample", ValueError(
            f"--num_samples={_NUM_SAMPLES.value} must be an integer >= 1 (samples per prompt)"), 2)
    try:
        params, model_config, tokenizer = load_model()
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        common.fail("lmjax sample", e, 1)
    prompts = [p for p in _PROMPT.value for _ in range(_NUM_SAMPLES.value)]
    completions = sample.sample_text(params, model_config, tokenizer, prompts, sampling,
                                     _SEED.value)
    for prompt, completion in zip(prompts, completions):
        print("-" * 40 + "\n" + prompt + completion)


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)`: the `lmjax sample` command."""
    common.run(main, sys.argv if argv is None else argv)
