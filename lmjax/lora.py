"""LoRA adapters (Hu et al. 2021): merge, a LoRA run's base, PEFT folders in and out.

    config.lora.rank = 8                                   # train: only the adapters learn
    params, cfg, tok = load_params(workdir)                # a LoRA run's base + adapters
    params, cfg = merge(params, cfg)                       # folded in: a plain model again
    export_peft("adapter", params, cfg)                    # PeftModel.from_pretrained reads it
    adapters, cfg = import_peft("adapter", base_cfg)       # a PEFT folder made in PyTorch

An adapter lives in the parameter tree next to the kernel it adapts: a targeted `Projection`
(`model.LORA_TARGETS`) has `lora_a` [in.., r] and `lora_b` [r, out..] besides its kernel, and
adds `config.lora_scale * x @ lora_a @ lora_b` (model.py). `model.split_adapters` separates them
from the base; `combine` puts them back. A LoRA run's TrainState keeps the base in `frozen` and the
adapters in `params` (lmjax/train.py), so gradients, optimizer moments and checkpoints cover the
adapters alone; the checkpoint's config names the base (`init_from`: a step folder or
`hf:FOLDER`, pinned when the run starts; '' = fresh from `seed`).

A PEFT folder is `adapter_config.json` + `adapter_model.safetensors` with tensors
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], the modules named
as in the Hugging Face checkpoint (`hf_layout.tensor_rules`). GPT-2's `c_attn` holds query, key and
value in one Conv1D (`fan_in_fan_out`): lmjax's separate adapters export as one of rank n * r
(A side by side, B block-diagonal; `rank_pattern`/`alpha_pattern` keep the scale), and a PEFT
`c_attn` adapter imports as the same A on each of the three with its slice of B.
Where this is silent it does what PEFT does.

QLoRA-style training (`model.quantization='int8'` with `lora.rank > 0`): `load_base` quantizes the
float base to int8 once, the adapters stay float32, and `int8.int8_matmul`'s straight-through
gradient reaches every layer's adapters. Training and `combine` never look inside the base;
`merge` needs float kernels (it says so otherwise).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lmjax import checkpoint, config_diff, hf, hf_layout, quantize
from lmjax import model as model_lib
from lmjax.config import ModelConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."
_LORA_FIELDS = tuple(f for f in ModelConfig.__dataclass_fields__ if f.startswith("lora_"))


def combine(base: dict | None, adapters: dict) -> dict:
    """The parameter tree of `base` with the `adapters` tree's leaves added (None: adapters)."""
    if base is None:
        return adapters
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(base[key], value) if isinstance(value, dict) and key in base else value
    return out


def base_config(config: ModelConfig) -> ModelConfig:
    """`config` without adapters (every lora_* field at its default)."""
    return dataclasses.replace(config, **{name: ModelConfig.__dataclass_fields__[name].default
                                          for name in _LORA_FIELDS})


def _adapted(params: dict):
    """(kernel path, a, b) of every adapted projection of a flat-able tree."""
    flat = traverse_util.flatten_dict(params)
    return [(path[:-1] + ("kernel",), flat[path], flat[path[:-1] + ("lora_b",)])
            for path in flat if path[-1] == "lora_a"]


def merge(params: dict, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """(params, config) with every adapter folded into its kernel, kernel + scale * a @ b (in
    float32, then the kernel's dtype): the plain model, for sampling at full speed and export."""
    base, adapters = model_lib.split_adapters(params)
    flat = traverse_util.flatten_dict(base)
    for kernel_path, a, b in _adapted(adapters):
        kernel = flat[kernel_path]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):  # e.g. an int8 base (QLoRA)
            raise ValueError(f"cannot merge into the {kernel.dtype} kernel "
                             f"{'/'.join(kernel_path)}: merge needs float kernels (dequantize "
                             "the base first, or apply the adapters unmerged)")
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        flat[kernel_path] = (kernel.astype(jnp.float32) + config.lora_scale * delta).astype(
            kernel.dtype)
    return traverse_util.unflatten_dict(flat), base_config(config)


# ----------------------------------------------------------------------------- a LoRA run's base


def load_base(reference: str, config: ModelConfig, seed: int = 0, sharding=None) -> dict:
    """The frozen base of a LoRA run: `reference` is a run's step folder or workdir, `hf:FOLDER`,
    or '' (fresh parameters from `seed`, as `steps.create_train_state` draws them). With
    `config.quantization == 'int8'` (QLoRA-style) the float base is quantized once, here
    (`quantize.quantize`: int8 kernels and embedding, a float32 scale per output channel)."""
    if config.quantization != "int8":
        return _load_stored_base(reference, config, seed, sharding)[0]
    params, loaded_config = _load_stored_base(reference, config, seed)
    params, _ = quantize.quantize(params, loaded_config)
    return jax.device_put(params, sharding) if sharding is not None else params


def _load_stored_base(reference: str, config: ModelConfig, seed: int,
                      sharding=None) -> tuple[dict, ModelConfig]:
    """(params, their config) of `load_base`'s reference as stored (float unless it is an int8
    export), placed with `sharding` (None: as loaded)."""
    place = lambda params: jax.device_put(params, sharding) if sharding is not None else params
    base_cfg = dataclasses.replace(base_config(config), quantization="none")
    if reference.startswith("hf:"):
        folder = reference[len("hf:"):]
        return place(hf.load_hf_params(folder, base_cfg,
                                       hf.read_hf_config(folder)["model_type"])), base_cfg
    if reference:
        info = checkpoint.read_checkpoint_info(reference)
        errors = config_diff.model_differences(info["model_config"], base_cfg,
                                               config_diff.SHAPE_MODEL_FIELDS)
        if errors:
            raise config_diff.IncompatibleCheckpointError(
                f"the base {reference!r} has parameters of another shape: " + "; ".join(errors))
        if info["model_config"].get("lora_rank"):  # a LoRA run: its adapters merged in (into
            # its base dequantized if that was int8: a QLoRA run)
            params, merged_config = merge(*quantize.dequantize(*load_params(info["step_dir"])[:2]))
            return place(params), merged_config
        return checkpoint.load_params(info["step_dir"], sharding=sharding)[:2]
    init_rng, _ = jax.random.split(jax.random.key(seed))
    float_cfg = dataclasses.replace(config, quantization="none")
    init = jax.jit(lambda rng: model_lib.split_adapters(model_lib.init_params(float_cfg, rng))[0],
                   out_shardings=sharding)
    return init(init_rng), base_cfg


def load_params(path: str, step: int | None = None):
    """`checkpoint.load_params`, and for a LoRA run's checkpoint (adapters alone) its base
    added: (params with adapters, model_config with lora_rank > 0, tokenizer)."""
    params, config, tokenizer = checkpoint.load_params(path, step=step)
    if not config.lora_rank:
        return params, config, tokenizer
    run = checkpoint.read_checkpoint_info(path, step).get("config") or {}
    base = load_base(run.get("init_from", ""), config, run.get("seed", 0))
    return combine(base, params), config, tokenizer


def apply_adapter(params: dict, config: ModelConfig, adapter: str) -> tuple[dict, ModelConfig]:
    """`params` of a plain model with the adapter at `adapter` added: a PEFT folder, or a LoRA
    run's workdir / step folder (its base must have `config`'s shape). Returns (params,
    config with its lora fields); `merge` folds it in."""
    if os.path.isfile(os.path.join(adapter, PEFT_CONFIG)):
        adapters, lora_config = import_peft(adapter, config)
    else:
        adapters, lora_config, _ = checkpoint.load_params(adapter)
        if not lora_config.lora_rank:
            raise ValueError(f"--adapter={adapter}: neither a PEFT folder ({PEFT_CONFIG}) nor a "
                             "LoRA run's checkpoint (its lora.rank is 0)")
        errors = config_diff.model_differences(dataclasses.asdict(base_config(lora_config)),
                                               config, config_diff.SHAPE_MODEL_FIELDS)
        if errors:
            raise config_diff.IncompatibleCheckpointError(
                f"--adapter={adapter} was trained on a base of another shape: " + "; ".join(errors))
    # The base's config with the adapter's lora fields (a QLoRA run's adapter on a float base
    # stays float).
    lora_fields = {name: getattr(lora_config, name) for name in _LORA_FIELDS}
    return combine(params, adapters), dataclasses.replace(config, **lora_fields)


# ----------------------------------------------------------------------------- PEFT folders


def _modules(config: ModelConfig):
    """(Hugging Face module name, its lmjax kernel paths, in_dims, transposed) of every weight
    matrix a LoRA target can adapt, from hf_layout.py's tensor table (GPT-2's c_attn: three
    paths)."""
    rules = hf_layout.tensor_rules(config, hf_layout.default_model_type(config))  # one table
    return [(rule.name[:-len(".weight")], rule.paths, rule.in_dims)
            for rule in rules if rule.paths[0][-1] == "kernel"
            and rule.paths[0][-2] in model_lib.LORA_TARGETS]


def export_peft(folder: str, params: dict, config: ModelConfig,
                base_model_name_or_path: str | None = None) -> str:
    """Writes the adapters of `params` (a LoRA model's tree, or its adapters alone) as a PEFT
    folder that `peft.PeftModel.from_pretrained(transformers_model, folder)` loads."""
    from safetensors.numpy import save_file
    if not config.lora_rank:
        raise ValueError("export_peft: the model has no adapters (lora_rank is 0)")
    _, adapters = model_lib.split_adapters(params)
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(adapters).items()}
    # the kernels' shapes, in_shape + out_shape (an int8 base stores them output-major)
    shapes = hf_layout.param_shapes(dataclasses.replace(config, quantization="none"))
    r, tensors, targets, rank_pattern, alpha_pattern = config.lora_rank, {}, set(), {}, {}
    for module, paths, in_dims in _modules(config):
        targeted = [j for j, p in enumerate(paths) if p[:-1] + ("lora_a",) in flat]
        if not targeted:
            continue
        n_in = math.prod(shapes[paths[0]][:in_dims])
        outs = [math.prod(shapes[p][in_dims:]) for p in paths]
        a_hf = np.concatenate([flat[paths[j][:-1] + ("lora_a",)].reshape(n_in, r)
                               for j in targeted], axis=1).T  # [n * r, in]
        b_hf = np.zeros((sum(outs), len(targeted) * r), np.float32)  # block-diagonal
        for k, j in enumerate(targeted):
            start = sum(outs[:j])
            b_hf[start:start + outs[j], k * r:(k + 1) * r] = flat[
                paths[j][:-1] + ("lora_b",)].reshape(r, outs[j]).T
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_hf)
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b_hf
        suffix = ".".join(module.split(".")[-2:])  # attn.c_attn, self_attn.q_proj, mlp.c_proj
        targets.add(suffix)
        n = len(targeted)
        if n > 1:  # rank n * r with the same scale alpha / r (or alpha / sqrt(r))
            rank_pattern[suffix] = n * r
            alpha_pattern[suffix] = config.lora_alpha * (math.sqrt(n) if config.lora_use_rslora
                                                         else n)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, PEFT_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "r": r,
        "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": sorted(targets),
        # Conv1D: [in, out] weights
        "fan_in_fan_out": hf_layout.default_model_type(config) == "gpt2",
        "bias": "none", "use_rslora": config.lora_use_rslora, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_dora": False}
    with open(os.path.join(folder, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)
    return folder


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (`peft.utils.other.get_pattern_key`)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft_tensors(folder: str) -> dict[str, np.ndarray]:
    path = os.path.join(folder, PEFT_WEIGHTS)
    if os.path.isfile(path):
        from safetensors.numpy import load_file
        return {k: v.astype(np.float32) for k, v in load_file(path).items()}
    path = os.path.join(folder, PEFT_BIN)
    if os.path.isfile(path):
        import torch  # only this path needs torch
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(f"no adapter weights in {folder!r}: expected {PEFT_WEIGHTS} or "
                            f"{PEFT_BIN}")


def import_peft(folder: str, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """A PEFT LoRA folder as lmjax adapters for the base `config`: (adapters tree, config with
    its lora fields). Per-module ranks and alphas (rank_pattern, alpha_pattern) become one rank
    (the largest, zero-padded) with each B rescaled to keep its module's scale; projections of a
    target that the folder leaves out (layers_to_transform) get zero adapters."""
    with open(os.path.join(folder, PEFT_CONFIG), encoding="utf-8") as f:
        peft = json.load(f)
    unsupported = {"peft_type": peft.get("peft_type") not in ("LORA", None),
                   "bias": peft.get("bias", "none") != "none", "use_dora": peft.get("use_dora"),
                   "modules_to_save": bool(peft.get("modules_to_save")),
                   "target_parameters": bool(peft.get("target_parameters"))}
    bad = [f"{k}={peft.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{folder}/{PEFT_CONFIG}: {', '.join(bad)} is not supported (lmjax "
                         "loads plain LoRA: peft_type LORA, bias 'none', no DoRA, no "
                         "modules_to_save)")
    tensors = _read_peft_tensors(folder)
    config = base_config(config)
    # the kernels' shapes, in_shape + out_shape (an int8 base stores them output-major)
    shapes = hf_layout.param_shapes(dataclasses.replace(config, quantization="none"))
    rslora, alpha = bool(peft.get("use_rslora", False)), float(peft["lora_alpha"])
    found, used = {}, set()  # kernel path -> (a [in.., R], b [R, out..], the module's scale)
    for module, paths, in_dims in _modules(config):
        names = [f"{_PREFIX}{module}.lora_{x}.weight" for x in "AB"]
        if names[0] not in tensors:
            continue
        used.update(names)
        a_hf, b_hf = tensors[names[0]], tensors[names[1]]
        rank = a_hf.shape[0]
        module_alpha = float(_pattern_value(peft.get("alpha_pattern") or {}, module, alpha))
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        outs = [math.prod(shapes[p][in_dims:]) for p in paths]
        for path, b_part in zip(paths, np.split(b_hf, np.cumsum(outs)[:-1], axis=0)):
            found[path] = (a_hf.T.reshape(shapes[path][:in_dims] + (rank,)),
                           b_part.T.reshape((rank,) + shapes[path][in_dims:]), scale)
    unknown = sorted(set(tensors) - used)
    if unknown or not found:
        raise ValueError(f"{folder}: " + (f"adapter tensors for modules lmjax cannot adapt: "
                                          f"{unknown[:4]}" if unknown else "no LoRA tensors for "
                                          "this model's modules"))
    targets = sorted({model_lib.LORA_TARGETS[p[-2]] for p in found})
    lora_config = dataclasses.replace(
        config, lora_rank=max(a.shape[-1] for a, _, _ in found.values()), lora_alpha=alpha,
        lora_targets=",".join(targets), lora_dropout=float(peft.get("lora_dropout", 0.0)),
        lora_use_rslora=rslora)
    dtype = hf_layout.DTYPES[config.param_dtype]
    flat = {}
    for path, shape in hf_layout.param_shapes(lora_config).items():
        if path[-1] not in model_lib.LORA_PARAMS:
            continue
        value = np.zeros(shape, np.float32)
        a, b, scale = found.get(path[:-1] + ("kernel",), (None, None, None))
        if a is not None and path[-1] == "lora_a":  # a smaller rank is zero-padded
            value[..., :a.shape[-1]] = a
        elif a is not None:  # 1.0 (exact) where the module's scale is lmjax's
            value[:b.shape[0]] = b * (scale / lora_config.lora_scale)
        flat[path] = jnp.asarray(value.astype(dtype))
    return traverse_util.unflatten_dict(flat), lora_config
