"""A training run's experiment config, checked before anything is read or computed.

`prepare_config` is what `train.train_and_evaluate` calls first: for `init_from='hf:FOLDER'` the
model shape and tokenizer become the folder's, then `validate_config` names the field and the
allowed values of any bad setting. `model_config` turns the `model` (and `lora`) sections into
the frozen `ModelConfig` that the layers, checkpoints and HF export share.
"""
from __future__ import annotations

import dataclasses
import difflib
import os

import jax
import ml_collections

from lmjax import config as config_lib
from lmjax import hf, hf_layout
from lmjax import hf_bert
from lmjax import sample as sample_lib
from lmjax import sharding as sharding_lib
from lmjax import sources
from lmjax import tokenizers as tokenizers_lib
from lmjax.config import ModelConfig, default_config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (FileNotFoundError for a missing file) naming the field and what is
    allowed, for unknown keys or bad values of any field, before anything is read or computed:
    ranges (`config.validate`), the model, the mesh over this run's devices, the tokenizer, the
    data files and the end-of-run sampling settings."""
    default = default_config()

    def check_keys(section, reference, prefix):
        unknown = sorted(set(section.keys()) - set(reference.keys()))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(reference.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}{hint}; "
                             f"allowed: {sorted(prefix + k for k in reference.keys())}")
        for key, value in reference.items():
            if isinstance(value, ml_collections.ConfigDict) and key not in ("model", "rules"):
                check_keys(section[key], value, f"{prefix}{key}.")

    check_keys(config, default, "")
    config_lib.validate(config, jax.device_count())
    mcfg = model_config(config, vocab_size=max(config.model.vocab_size, 1))  # named-field errors
    mesh_shape = sharding_lib.mesh_shape(config.mesh, jax.device_count())
    sharding_lib.check_divisibility(mcfg, mesh_shape, config.data.batch_size,
                                    sharding_lib.rules(config.mesh))
    if config.model.dtype == "float16":
        raise ValueError(
            "model.dtype='float16' is for inference only: training in float16 needs loss scaling, "
            "which lmjax does not do (gradients underflow). Train with model.dtype='bfloat16' "
            "(same memory, float32's range) or 'float32'")
    if config.model.quantization != "none" and not config.lora.rank:
        raise ValueError(f"model.quantization={config.model.quantization!r} trains only LoRA "
                         "adapters on a frozen int8 base (QLoRA-style: set lora.rank > 0); "
                         "full training needs 'none' (then --weights_dtype=int8 at inference)")
    tokenizers_lib.check_config(config.tokenizer)
    check_data_files(config.data)
    if config.train.num_samples > 0:
        try:
            sample_lib.SamplingConfig(max_new_tokens=config.train.sample_len,
                                      temperature=config.train.sample_temperature,
                                      top_k=config.train.sample_top_k)
        except ValueError as e:  # name the train.* field the sampling field comes from
            raise ValueError(str(e).replace("sampling.max_new_tokens", "train.sample_len")
                             .replace("sampling.temperature", "train.sample_temperature")
                             .replace("sampling.top_k", "train.sample_top_k")) from e


def check_data_files(data_config: ml_collections.ConfigDict) -> None:
    """The source is well formed (`sources.source_spec`, the one check of data.source and its
    fields); for source='files'/'jsonl' every file named by data.train_files / data.val_files
    exists, is a regular file, can be read and is not empty."""
    sources.source_spec(data_config)
    if data_config.source not in ("files", "jsonl"):
        return
    for field in ("train_files", "val_files"):
        if field == "val_files" and not data_config.val_files:
            continue
        for path in sources.expand_globs(data_config[field], field):
            if not os.path.isfile(path):
                raise ValueError(f"data.{field}: {path} is not a file")
            if not os.access(path, os.R_OK):
                raise ValueError(f"data.{field}: {path} cannot be read (permissions)")
            if os.path.getsize(path) == 0:
                raise ValueError(f"data.{field}: {path} is empty (0 bytes)")


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The ModelConfig of an experiment; `model.vocab_size=0` takes the tokenizer's vocab size;
    the lora_* fields come from the `lora` section."""
    fields = {k: v for k, v in config.model.to_dict().items() if not k.startswith("lora_")}
    fields.update(config_lib.lora_fields(config))
    if not fields.get("vocab_size"):
        fields["vocab_size"] = vocab_size
    elif fields["vocab_size"] < vocab_size:
        raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the "
                         f"tokenizer's vocabulary ({vocab_size})")
    return ModelConfig.from_dict(fields)


def class_weights(data_config) -> tuple[float, ...]:
    """`data.class_weights` ('' or comma-separated numbers) as a tuple."""
    try:
        return tuple(float(w) for w in str(data_config.class_weights).split(",") if w.strip())
    except ValueError:
        raise ValueError(f"data.class_weights={data_config.class_weights!r} must be '' or "
                         "comma-separated numbers, one per label id") from None


def check_sample_prompt(config: ml_collections.ConfigDict, tokenizer) -> None:
    """The end-of-run samples' prompt must encode with the run's tokenizer (checked once the
    tokenizer exists, before anything is compiled)."""
    if config.train.num_samples <= 0:
        return
    try:
        tokenizer.encode(config.train.sample_prompt)
    except (ValueError, KeyError) as e:
        raise ValueError(f"train.sample_prompt={config.train.sample_prompt!r} cannot be encoded "
                         f"by the {tokenizer.kind} tokenizer: {e}. Use characters of the "
                         "training text, or train.num_samples=0") from e


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a run trains with, checked: for `init_from='hf:FOLDER'` the model shape and
    tokenizer become the folder's (dropout, dtypes and remat stay as configured). Raises
    ValueError naming the field for a bad value, before anything is read or computed."""
    if config.init_from.startswith("hf:"):
        folder = config.init_from[len("hf:"):]
        hf_cfg = hf.read_hf_config(folder)
        encoder = hf_cfg.get("model_type") in ("bert", "roberta")
        hf_model = dataclasses.asdict(hf_bert.config_from_hf_bert(hf_cfg) if encoder
                                      else hf_layout.config_from_hf(hf_cfg))
        config = config.copy_and_resolve_references()
        # An encoder keeps the configured head (e.g. a classifier on a BertForMaskedLM).
        keep = {"dropout", "dtype", "param_dtype", "remat", "quantization", "quant_group_size"} | (
            {"head", "num_labels"} if encoder else set())
        config.model.update({k: v for k, v in hf_model.items()
                             if k not in keep and not k.startswith("lora_")})
        config.tokenizer.kind, config.tokenizer.path = "hf", folder
    validate_config(config)
    return config

