"""Model configuration: one frozen dataclass, presets, and validation with named-field errors.

`ModelConfig` is plain, hashable and JSON-serialisable: it is a static argument of jitted
functions, it is written next to every checkpoint, and it is what Hugging Face export reads.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

_CHOICES = {
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and flavour of a decoder-only Transformer.

    GPT-2 is `position='learned', norm='layernorm', mlp='gelu', bias=True, tie_embeddings=True`;
    LLaMA is `position='rope', norm='rmsnorm', mlp='swiglu', bias=False, tie_embeddings=False`
    with `num_kv_heads < num_heads` for grouped-query attention.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    embed_dim: int
    mlp_dim: int
    max_len: int
    num_kv_heads: int | None = None  # None: as many as num_heads (multi-head attention)
    head_dim: int | None = None  # None: embed_dim // num_heads
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (tanh approximation, as GPT-2) | swiglu
    bias: bool = True  # biases in every Dense and LayerNorm
    tie_embeddings: bool = True  # output projection = token embedding transposed
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: str = "none"  # none | full | dots: rematerialise each block in the backward pass

    def __post_init__(self):
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    def validate(self) -> None:
        """Raises ValueError naming the offending field and the allowed values."""
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim} "
                "(or set model.head_dim)")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.kv_heads} must divide model.num_heads={self.num_heads}")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a dict or ConfigDict; unknown keys are an error that names them."""
        fields = dict(fields)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; allowed keys are {sorted(allowed)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in fields)
        if missing:
            raise ValueError(f"model config is missing required keys {missing}")
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


_GPT2 = dict(vocab_size=50257, max_len=1024, position="learned", norm="layernorm", mlp="gelu",
             bias=True, tie_embeddings=True)
_LLAMA = dict(vocab_size=32000, position="rope", norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
              bias=False, tie_embeddings=False)

# Each preset is a dict of ModelConfig fields; a config file copies one and overrides fields.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 family (Radford et al. 2019), shapes of the released checkpoints.
    "gpt2_124m": dict(_GPT2, num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072),
    "gpt2_350m": dict(_GPT2, num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=4096),
    "gpt2_774m": dict(_GPT2, num_layers=36, num_heads=20, embed_dim=1280, mlp_dim=5120),
    "gpt2_1.5b": dict(_GPT2, num_layers=48, num_heads=25, embed_dim=1600, mlp_dim=6400),
    # LLaMA style: RoPE, RMSNorm, SwiGLU, grouped-query attention.
    "llama_125m": dict(_LLAMA, num_layers=12, num_heads=12, num_kv_heads=4, embed_dim=768,
                       mlp_dim=2048, max_len=2048),
    "llama_1b": dict(_LLAMA, num_layers=22, num_heads=32, num_kv_heads=4, embed_dim=2048,
                     mlp_dim=5632, max_len=2048),  # TinyLlama-1.1B shapes
    "llama_7b": dict(_LLAMA, num_layers=32, num_heads=32, embed_dim=4096, mlp_dim=11008,
                     max_len=4096),  # LLaMA-2-7B shapes
    # Small models for a CPU (vocab_size is set from the tokenizer by the config files).
    "nanogpt_baby": dict(_GPT2, vocab_size=65, max_len=64, num_layers=4, num_heads=4,
                         embed_dim=128, mlp_dim=512, bias=False),
    "nanogpt_char": dict(_GPT2, vocab_size=65, max_len=256, num_layers=6, num_heads=6,
                         embed_dim=384, mlp_dim=1536, bias=False, dropout=0.2),
    "llama_tiny": dict(_LLAMA, vocab_size=256, max_len=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, embed_dim=64, mlp_dim=176),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named preset as a ModelConfig, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
