"""Whether a saved run's config fits this one: what a resume, an `init_from` or a LoRA base may
change, and the errors that name what it may not (`model.num_layers: checkpoint 6, config 4`).

Pure dictionaries and dataclasses: checkpoint.py reads the saved configs, train.py and lora.py
ask these questions of them.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from lmjax.config import ModelConfig, lora_fields

# Model fields a resume may change: they alter neither the parameter tree nor the function
# computed at inference (dropout is training-only; dtype/remat change precision/memory only).
SAFE_MODEL_FIELDS = ("dropout", "dtype", "remat", "init_std", "lora_dropout", "kv_cache_dtype")
# Fields that fix the parameter shapes: `init_from` (fine-tuning) needs these to match.
SHAPE_MODEL_FIELDS = ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len",
                      "num_kv_heads", "head_dim", "position", "norm", "mlp", "bias",
                      "tie_embeddings")
# Non-model fields a resume may not change: they change the optimizer-state tree.
UNSAFE_CONFIG_FIELDS = ("optim.grad_accum", "tokenizer.kind")


class IncompatibleCheckpointError(ValueError):
    """The config asks for a model (or optimizer state) that the checkpoint cannot provide."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def model_differences(saved: dict, current: ModelConfig,
                      fields: tuple[str, ...] | None = None) -> list[str]:
    """['model.num_layers: checkpoint 6, config 4', ...] for `fields` (default: all unsafe)."""
    current_dict = dataclasses.asdict(current)
    if fields is None:
        fields = tuple(k for k in current_dict if k not in SAFE_MODEL_FIELDS)
    # A field newer than the checkpoint (e.g. `architecture`) has its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING}
    saved = {**defaults, **saved}
    return [f"model.{k}: checkpoint {saved.get(k)!r}, config {current_dict[k]!r}"
            for k in fields if saved.get(k) != current_dict[k]]


def check_resume_config(saved_config: dict, saved_model: dict,
                        config: ml_collections.ConfigDict) -> list[str]:
    """Checks that `config` may resume a checkpoint; returns the safe changes, for logging.

    Raises IncompatibleCheckpointError naming every field that changes the model or the
    optimizer-state tree (`model.num_layers: checkpoint 6, config 4`).
    """
    fields = {k: v for k, v in config.model.to_dict().items() if not k.startswith("lora_")}
    fields.update(lora_fields(config))
    if not fields.get("vocab_size"):  # 0 = the tokenizer's: the checkpoint's tokenizer
        fields["vocab_size"] = saved_model.get("vocab_size")
    try:
        current = ModelConfig.from_dict(fields)
    except ValueError as e:
        raise IncompatibleCheckpointError(f"config.model is invalid: {e}") from e
    errors = model_differences(saved_model, current)
    old, new = _flatten(saved_config), _flatten(config.to_dict())
    for key in UNSAFE_CONFIG_FIELDS:
        if key in old and old[key] != new.get(key):
            errors.append(f"{key}: checkpoint {old[key]!r}, config {new.get(key)!r}")
    if errors:
        raise IncompatibleCheckpointError(
            "the config does not match the checkpoint it would resume: " + "; ".join(errors)
            + ". Use a new --workdir (or --config.init_from=OLD_WORKDIR to start from its "
            "params), or undo these changes.")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if not k.startswith("model.") and k != "init_from" and old.get(k) != new.get(k)]
