"""`lmjax.pipeline("text-generation", model=...)`: Hugging Face's pipeline call, on lmjax.

    import lmjax
    generator = lmjax.pipeline("text-generation", model="workdirs/demo")   # or an HF folder
    generator("ROMEO.", max_new_tokens=50, num_return_sequences=3, temperature=0.8)
    # -> [{"generated_text": "ROMEO. ..."}, {...}, {...}]
    generator(["To be", "or not"], num_beams=4, stop="\\n")   # -> one list per prompt

`model` is a training workdir (or step folder / params export: `checkpoint.load_params`) or a
Hugging Face model folder (`hf.load_hf`, which needs its tokenizer files); an HF folder's
generation defaults (config.json, generation_config.json: `SamplingConfig.from_hf`) apply unless
overridden. Keyword options are SamplingConfig fields (HF `generate`'s names), plus
`return_full_text` (default True: the prompt and its continuation, as HF) and `do_sample`
(HF's name for `greedy=False`). The pipeline's own options are defaults for every call; a
call's options override them. (The module is `lmjax.pipelines`: `lmjax.pipeline` is the function.)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from lmjax import checkpoint, hf, quantize, sample
from lmjax.logits_process import SamplingConfig

TASKS = ("text-generation",)


def _sampling_fields(options: dict[str, Any]) -> dict[str, Any]:
    """SamplingConfig fields of call options, with HF's do_sample accepted; unknown names are an
    error listing the allowed ones."""
    options = dict(options)
    if "do_sample" in options:
        options["greedy"] = not options.pop("do_sample")
    allowed = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown generation options {unknown}; allowed: "
                         f"{', '.join(sorted(allowed | {'do_sample', 'return_full_text'}))}")
    return options


class TextGenerationPipeline:
    """Continues prompt strings with a model, tokenizer and default SamplingConfig."""

    def __init__(self, params, model_config, tokenizer, sampling: SamplingConfig,
                 return_full_text: bool = True):
        self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
        self.sampling, self.return_full_text = sampling, return_full_text

    def __call__(self, prompts: str | Sequence[str], return_full_text: bool | None = None,
                 **options) -> list:
        """[{"generated_text": ...}] (num_return_sequences of them) for one prompt string; a
        list of those for a list of prompts, generated as one batch."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        sampling = dataclasses.replace(self.sampling, **_sampling_fields(options))
        full = self.return_full_text if return_full_text is None else return_full_text
        texts = sample.sample_text(self.params, self.model_config, self.tokenizer, prompts,
                                   sampling, seed=0 if sampling.seed is None else sampling.seed)
        R = sampling.num_return_sequences
        out = [[{"generated_text": (prompt if full else "") + text}
                for text in texts[b * R:(b + 1) * R]] for b, prompt in enumerate(prompts)]
        return out[0] if single else out


def pipeline(task: str, model: str, dtype: str = "float32", step: int | None = None,
             return_full_text: bool = True, weights_dtype: str | None = None,
             **options) -> TextGenerationPipeline:
    """A text-generation pipeline over a workdir or a Hugging Face folder (see the module
    docstring); `options` are default SamplingConfig fields for its calls. `weights_dtype`:
    'float32', 'bfloat16' or 'int8' (`quantize.convert` at load; None: as stored)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported: lmjax.pipeline does {', '.join(TASKS)}")
    quantize.check_weights_dtype(weights_dtype)
    fields = _sampling_fields(options)
    # A run's workdir also holds a config.json (its experiment config): its checkpoints decide.
    is_workdir = os.path.isdir(os.path.join(model, checkpoint.CHECKPOINT_DIR))
    if not is_workdir and os.path.isfile(os.path.join(model, hf.CONFIG_FILE)):
        model_config, params, tokenizer = hf.load_hf(model, dtype)
        if tokenizer is None:
            raise ValueError(f"model={model!r} has no tokenizer.json or tokenizer.model: the "
                             "pipeline needs one to read and write text")
        sampling = SamplingConfig.from_hf(model, **fields)
    else:
        params, model_config, tokenizer = checkpoint.load_params(model, step=step)
        sampling = SamplingConfig(**fields)
    params, model_config = quantize.convert(params, model_config, weights_dtype)
    return TextGenerationPipeline(params, model_config, tokenizer, sampling, return_full_text)
