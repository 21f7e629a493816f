r"""Samples from a trained run or a Hugging Face folder with the KV-cache sampler.

  python experiments/sample.py --workdir=workdirs/demo --prompt="ROMEO." --num_samples=3
  python experiments/sample.py --hf_model=/path/to/gpt2 --prompt="Hello" --greedy
  python experiments/sample.py --workdir=DIR --num_beams=4 --length_penalty=0.8

Loads parameters only (no optimizer state) from the newest checkpoint of --workdir (or --step).
"""
from absl import app, flags

from lmjax import checkpoint, sample

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
        from lmjax import hf
        model_config, params, tokenizer = hf.load_hf(_HF_MODEL.value, _DTYPE.value)
        if tokenizer is None:
            raise app.UsageError(f"{_HF_MODEL.value} has no tokenizer.json or tokenizer.model")
        return params, model_config, tokenizer
    return checkpoint.load_params(_WORKDIR.value, step=_STEP.value)


def main(argv):
    del argv
    sampling = sample.SamplingConfig(  # validated here, before anything is loaded or compiled
        max_new_tokens=_MAX_NEW_TOKENS.value, greedy=_GREEDY.value,
        temperature=0.0 if _GREEDY.value else _TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, num_beams=_NUM_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
        early_stopping=_EARLY_STOPPING.value)
    params, model_config, tokenizer = load_model()
    prompts = [p for p in _PROMPT.value for _ in range(_NUM_SAMPLES.value)]
    completions = sample.sample_text(params, model_config, tokenizer, prompts, sampling,
                                     _SEED.value)
    for prompt, completion in zip(prompts, completions):
        print("-" * 40 + "\n" + prompt + completion)


if __name__ == "__main__":
    app.run(main)
