"""Hugging Face interop: GPT-2 and LLaMA-family (LLaMA, Mistral, Qwen2) checkpoints in and out.

    model_config, params, tokenizer = load_hf("path/to/folder")       # float32 or bfloat16
    save_hf("path/to/export", model_config, params, tokenizer)        # transformers loads it

A folder is what `transformers`' `save_pretrained` writes: `config.json`, the weights as
`model.safetensors`, sharded safetensors (`model.safetensors.index.json` + shards) or
`pytorch_model.bin` (sharded or not), and optionally the tokenizer files (`tokenizer.json` or
`tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`).

The architectures' config.json fields and tensor names are hf_layout.py's; this module reads
and writes the folders.

Weights are read one tensor at a time (memory-mapped safetensors; a .bin shard at a time), and each
is converted to its lmjax layout and dtype before the next is read, so two full copies of a model
never coexist. Only the `.bin` path imports torch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Iterable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from lmjax import quantize
from lmjax import tokenizers as tokenizers_lib
from lmjax.config import ModelConfig
from lmjax.hf_layout import (DTYPES, Path, Rule, config_from_hf, hf_config, param_shapes,
                             tensor_rules)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Tensors a checkpoint may hold that are not parameters (GPT-2's causal-mask buffers, old LLaMA's
# RoPE frequencies): skipped on import.
_BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$|(^|\.)rotary_emb\.inv_freq$")

# -------------------------------------------------------------------------------- reading files


def _read_json(path: str) -> dict:
    """A JSON file's object; ValueError naming the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the folder is damaged or incomplete "
                         "(re-download or re-export it)") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(content).__name__}")
    return content


@contextlib.contextmanager
def _weights_file(path: str):
    """Errors while reading a weights file name the file (a truncated download otherwise
    surfaces as a bare deserialisation message)."""
    try:
        yield
    except Exception as e:  # SafetensorError, or torch.load's RuntimeError and pickle errors
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read the weights file {path}: {type(e).__name__}: {e} "
                         "(is it truncated or damaged? re-download or re-export the folder)"
                         ) from None


def read_hf_config(folder: str) -> dict:
    """The folder's config.json as a dict; FileNotFoundError if it has none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder!r} is not a Hugging Face model folder: it has no {CONFIG_FILE}")
    return _read_json(path)


# GenerationConfig fields that lmjax's SamplingConfig reads (logits_process.hf_generation_fields).
GENERATION_FIELDS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_k", "top_p",
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "num_beams",
    "length_penalty", "early_stopping", "num_return_sequences", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "stop_strings")


def generation_defaults(folder: str) -> dict:
    """The generation defaults of a Hugging Face model folder, as `GenerationConfig` fields:
    the bos/eos/pad token ids of config.json, overridden by generation_config.json's fields
    (those in GENERATION_FIELDS that are set). `SamplingConfig.from_hf` turns them into lmjax's.
    """
    hf = read_hf_config(folder)
    defaults = {name: hf[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf.get(name) is not None}
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if os.path.isfile(path):
        defaults.update({name: value for name, value in _read_json(path).items()
                         if name in GENERATION_FIELDS and value is not None})
    return defaults


class _Checkpoint:
    """The tensors of a folder's weight files, read one file (shard) at a time."""

    def __init__(self, folder: str):
        self.folder = folder

        def files_of(index):
            weight_map = _read_json(os.path.join(folder, index))["weight_map"]
            return {name: os.path.join(folder, file) for name, file in weight_map.items()}

        if os.path.isfile(os.path.join(folder, SAFETENSORS_FILE)):
            from safetensors import safe_open
            path = os.path.join(folder, SAFETENSORS_FILE)
            with _weights_file(path), safe_open(path, "np") as f:
                self.file_of = {name: path for name in f.keys()}
        elif os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
            self.file_of = files_of(SAFETENSORS_INDEX)
        elif os.path.isfile(os.path.join(folder, BIN_FILE)):
            self.file_of = None  # names known once the file is loaded
            self.bin_file = os.path.join(folder, BIN_FILE)
        elif os.path.isfile(os.path.join(folder, BIN_INDEX)):
            self.file_of = files_of(BIN_INDEX)
        else:
            raise FileNotFoundError(
                f"no weights in {folder!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                f"{BIN_FILE} or {BIN_INDEX}")
        if self.file_of is None:
            state = self._load_bin(self.bin_file)
            self.file_of = {name: self.bin_file for name in state}
            del state

    @staticmethod
    def _load_bin(path: str) -> dict:
        import torch  # only this path needs torch
        with _weights_file(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, tensor as NumPy) for `names`, grouped by file, one tensor at a time."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        for path, file_names in by_file.items():
            if path.endswith(".safetensors"):
                from safetensors import safe_open
                with _weights_file(path), safe_open(path, "np") as f:
                    for name in file_names:
                        yield name, f.get_tensor(name)
            else:
                state = self._load_bin(path)
                for name in file_names:
                    yield name, _torch_to_numpy(state.pop(name))
                del state


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _detect_prefix(model_type: str, names: set[str]) -> str:
    """'transformer.' / 'model.' (a ...LMHeadModel / ...ForCausalLM checkpoint) or '' (bare)."""
    first = "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"
    for prefix in ("transformer." if model_type == "gpt2" else "model.", ""):
        if prefix + first in names:
            return prefix
    return "transformer." if model_type == "gpt2" else "model."


def load_hf_params(folder: str, config: ModelConfig, model_type: str) -> dict:
    """The folder's weights as an lmjax parameter tree for `config`, in `config.param_dtype`.

    Raises ValueError naming the tensor for a missing tensor, a shape mismatch (both shapes), or
    tensors that this architecture does not have.
    """
    checkpoint = _Checkpoint(folder)
    rules = tensor_rules(config, model_type, _detect_prefix(model_type, checkpoint.names()))
    return read_tensors(checkpoint, rules, param_shapes(config), config.param_dtype,
                        ignore=lambda name: bool(_BUFFERS.search(name)) or (
                            name == "lm_head.weight" and config.tie_embeddings),
                        what=f"{model_type} with this config.json")


def read_tensors(checkpoint: "_Checkpoint", rules: list[Rule], shapes: dict[Path, tuple],
                 param_dtype: str, ignore=lambda name: False, what: str = "") -> dict:
    """The parameter tree that `rules` read from `checkpoint` (any architecture's rules), one
    tensor at a time, in `param_dtype`. Tensors for which `ignore(name)` is true may be in the
    checkpoint without a rule; any other extra, missing or misshapen tensor is a ValueError
    naming it."""
    folder, names = checkpoint.folder, checkpoint.names()
    expected = {rule.name: rule.hf_shape(shapes) for rule in rules}
    missing = [name for name in expected if name not in names]
    if missing:
        raise ValueError(
            f"missing tensor {missing[0]!r} (expected shape {expected[missing[0]]}) in {folder}"
            + (f", and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else ""))
    unexpected = sorted(name for name in names - set(expected) if not ignore(name))
    if unexpected:
        raise ValueError(f"unexpected tensors in {folder} for {what}: "
                         f"{unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))

    dtype = DTYPES[param_dtype]
    rule_of = {rule.name: rule for rule in rules}
    flat = {}
    for name, tensor in checkpoint.read(expected):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"but the config needs shape {expected[name]}")
        for path, array in rule_of[name].to_lmjax(tensor, shapes):
            flat[path] = jnp.asarray(array.astype(dtype, copy=False))
        del tensor
    return traverse_util.unflatten_dict(flat)


def load_hf(folder: str, dtype: str = "float32"
            ) -> tuple[ModelConfig, dict, tokenizers_lib.Tokenizer | None]:
    """Imports a Hugging Face GPT-2 / LLaMA / Mistral / Qwen2 folder.

    Returns (ModelConfig, params, tokenizer): params in `dtype` ('float32' or 'bfloat16', also
    the compute dtype of the config); the tokenizer is an `HFTokenizer` when the folder has
    tokenizer.json or tokenizer.model (an lmjax tokenizer if `save_hf` wrote one), else None.
    """
    hf = read_hf_config(folder)
    config = config_from_hf(hf, dtype)
    params = load_hf_params(folder, config, hf["model_type"])
    return config, params, load_hf_tokenizer(folder)


def load_hf_tokenizer(folder: str) -> tokenizers_lib.Tokenizer | None:
    """The tokenizer saved in a model folder, or None if it has none."""
    if tokenizers_lib.has_saved_tokenizer(folder):
        return tokenizers_lib.load_tokenizer(folder)
    if tokenizers_lib.HFTokenizer.in_folder(folder):
        return tokenizers_lib.HFTokenizer.from_folder(folder)
    return None


# ------------------------------------------------------------------------------------- writing


def write_tensors(folder: str, rules: list[Rule], shapes: dict[Path, tuple], flat: dict,
                  param_dtype: str, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Writes the tensors of `rules` (any architecture's) built from the flat parameter dict
    `flat` as model.safetensors, or shards of at most `max_shard_bytes` and
    model.safetensors.index.json, in `param_dtype`; a parameter missing from `flat` is
    written as zeros of its shape in `shapes`."""
    from safetensors.numpy import save_file

    dtype = DTYPES[param_dtype]

    def hf_tensor(rule: Rule) -> np.ndarray:
        arrays = [np.asarray(flat[p]).astype(dtype) if p in flat else np.zeros(shapes[p], dtype)
                  for p in rule.paths]
        return rule.to_hf(arrays)

    # Plan the shards from sizes alone, then build and write one shard at a time.
    itemsize = np.dtype(dtype).itemsize
    shards: list[list[Rule]] = [[]]
    size = 0
    for rule in rules:
        nbytes = math.prod(rule.hf_shape(shapes)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(rule)
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = (SAFETENSORS_FILE if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({rule.name: hf_tensor(rule) for rule in shard}, os.path.join(folder, file),
                  metadata={"format": "pt"})
        weight_map.update({rule.name: file for rule in shard})
    if len(shards) > 1:
        total = sum(math.prod(r.hf_shape(shapes)) * itemsize for r in rules)
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(folder: str, model_config: ModelConfig, params: dict,
            tokenizer: tokenizers_lib.Tokenizer | None = None, model_type: str | None = None,
            max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Exports lmjax params as a Hugging Face folder that `transformers` `from_pretrained` loads.

    Writes config.json and model.safetensors (or shards of at most `max_shard_bytes` and
    model.safetensors.index.json), in the params' dtype. `model_type` defaults to
    `default_model_type(model_config)`; ValueError if the config cannot be expressed in it.
    With a tokenizer, its files are written too (Hugging Face ones for an `HFTokenizer`; other
    lmjax tokenizers in lmjax's own format, which `load_hf` reads but `transformers` does not).
    """
    params, model_config = quantize.dequantize(params, model_config)  # int8: float32 out
    hf = hf_config(model_config, model_type, tokenizer)
    model_type = hf["model_type"]
    # The HF side's config may have more biases than lmjax's (exported as zeros).
    hf_side = config_from_hf(hf, model_config.param_dtype)
    rules = tensor_rules(hf_side, model_type)
    shapes = param_shapes(hf_side)
    flat = traverse_util.flatten_dict(params)
    own = param_shapes(model_config)
    if set(own) != set(flat) or any(tuple(flat[p].shape) != own[p] for p in own):
        bad = sorted(set(own) ^ set(flat)) or [p for p in own if tuple(flat[p].shape) != own[p]]
        raise ValueError(f"params do not match model_config: check parameter {'/'.join(bad[0])}")
    write_tensors(folder, rules, shapes, flat, model_config.param_dtype, max_shard_bytes)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save(folder)
