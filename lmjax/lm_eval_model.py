"""lmjax as a model of EleutherAI's lm-evaluation-harness (`pip install ".[eval]"`).

lm_eval finds models in its own registry only, so this module registers `lmjax` when imported;
running it imports it, then hands over to lm_eval's command line:

  python -m lmjax.lm_eval_model --model lmjax --model_args workdir=workdirs/demo \\
      --tasks my_task --include_path my_tasks/

and in Python: `import lmjax.lm_eval_model` before `lm_eval.simple_evaluate(model="lmjax",
model_args="workdir=...")`, or pass `LmjaxLM(workdir=...)` itself as the model.

Model arguments: `workdir=` (a run, a step folder or a params export; `step=`) or `hf_model=` (a
Hugging Face folder; `dtype=float32|bfloat16`), `batch_size=`, `max_length=` (default the
model's max_len), `max_gen_toks=` (256, as lm_eval's `hf`), `seed=`.

* `loglikelihood`: lm_eval's TemplateLM splits each (context, continuation) into tokens; requests
  with the same context tokens (a multiple-choice question's choices) share one prefilled KV
  cache (`evaluate.score_pairs`); others are scored one full sequence each, left-truncated to
  max_length + 1 tokens as lm_eval's `hf` does.
* `loglikelihood_rolling`: lm_eval's own rolling windows (prefix token, disjoint windows of
  max_length predictions), scored as full sequences.
* `generate_until`: `sample.generate` on contexts left-truncated to max_length - max_gen_toks,
  greedy unless `do_sample` (temperature, top_k, top_p passed on), the text cut at the first
  `until` string or the eos token. The sampler stops at the end token or max_gen_toks only;
  stop strings are applied to the text afterwards (same text, more tokens generated).
"""
from __future__ import annotations

import dataclasses
import json

import lm_eval.models  # noqa: F401 - lm_eval's own models first: it loads them only into an
import numpy as np     # empty registry, and `lmjax` would otherwise be its only model
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lmjax import evaluate, hf, lora, sample


@register_model("lmjax")
class LmjaxLM(TemplateLM):
    """An lmjax model for lm_eval (see the module docstring for the arguments)."""

    def __init__(self, workdir: str | None = None, hf_model: str | None = None,
                 step: int | None = None, dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                 **unused):
        super().__init__()
        if (workdir is None) == (hf_model is None):
            raise ValueError("lmjax model_args: give exactly one of workdir= and hf_model=")
        if hf_model is not None:
            self.model_config, self.params, self.lmjax_tokenizer = hf.load_hf(hf_model, dtype)
            if self.lmjax_tokenizer is None:
                raise ValueError(f"hf_model={hf_model} has no tokenizer.json or tokenizer.model")
        else:
            self.params, self.model_config, self.lmjax_tokenizer = lora.load_params(
                workdir, step=None if step is None else int(step))
            if self.model_config.lora_rank:  # a LoRA run: its adapters folded into its base
                self.params, self.model_config = lora.merge(self.params, self.model_config)
        self.source = workdir or hf_model
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no memory probing: a fixed batch
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model_config.max_len)
        if not 1 <= self.max_length <= self.model_config.max_len:
            raise ValueError(f"max_length={self.max_length} must be in "
                             f"[1, model.max_len={self.model_config.max_len}]")
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        eos = self.lmjax_tokenizer.eos_id
        self._eot = eos if eos is not None else self.lmjax_tokenizer.bos_id
        if self._eot is None:
            raise ValueError(f"{self.source}: the tokenizer has no eos or bos token, which "
                             "lm_eval needs as end-of-text and prefix token")

    # --- tokens
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return evaluate.prefix_token(self.lmjax_tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return self.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        """The tokenizer's ids; a Hugging Face tokenizer adds what `transformers` adds by
        default (e.g. LLaMA's bos), as lm_eval's `hf` model does."""
        if self.lmjax_tokenizer.kind == "hf":
            return list(self.lmjax_tokenizer.encode(
                string, add_special_tokens=add_special_tokens is not False))
        return list(self.lmjax_tokenizer.encode(string))

    def tok_decode(self, ids) -> str:
        return self.lmjax_tokenizer.decode(list(ids))

    # --- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return evaluate.score_pairs(self.params, self.model_config, pairs, self.batch_size,
                                    self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for r, request in enumerate(requests):
            (string,) = request.args
            windows = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for window in map(lm_eval_utils.make_disjoint_window, windows):
                pairs.append(window)
                owners.append(r)
        scores = evaluate.score_sequences(self.params, self.model_config, pairs,
                                          self.batch_size, self.max_length)
        totals = np.zeros(len(requests))
        for r, (ll, _) in zip(owners, scores):
            totals[r] += ll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(t) for t in totals]

    def _sampling(self, gen_kwargs: dict) -> tuple[sample.SamplingConfig, list[str]]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        # lm_eval's aliases, first given first (normalize_gen_kwargs' order).
        lengths = [kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                   if k in kwargs]
        max_new = int(lengths[0] if lengths else self.max_gen_toks)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        greedy = not do_sample or temperature == 0.0
        sampling = sample.SamplingConfig(
            max_new_tokens=max_new, greedy=greedy, temperature=0.0 if greedy else temperature,
            top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0)),
            eos_ids=(self.eot_token_id,))
        if kwargs:
            raise ValueError(f"generation_kwargs {sorted(kwargs)} are not supported by lmjax's "
                             "model; it takes until, max_gen_toks (or max_new_tokens), "
                             "do_sample, temperature, top_k and top_p")
        return sampling, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_kwargs.setdefault(json.dumps(request.args[1], sort_keys=True), []).append(i)
        for key, indices in by_kwargs.items():
            sampling, until = self._sampling(json.loads(key))
            max_context = self.max_length - sampling.max_new_tokens
            if max_context < 1:
                raise ValueError(f"max_gen_toks={sampling.max_new_tokens} leaves no room for a "
                                 f"context in max_length={self.max_length}")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max_context:] or
                           [self.prefix_token_id] for i in chunk]
                tokens, _, lengths = sample.generate(self.params, self.model_config, prompts,
                                                     sampling, self.seed + start)
                tokens, lengths = np.asarray(tokens), np.asarray(lengths)
                for b, i in enumerate(chunk):
                    ids = [t for t in tokens[b, :lengths[b]].tolist() if t != self.eot_token_id]
                    text = sample.cut_at_stop(self.tok_decode(ids), until)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "lmjax_model_config": dataclasses.asdict(self.model_config)}


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
