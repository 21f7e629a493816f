"""Model configuration: one frozen dataclass, presets, and validation with named-field errors.

`ModelConfig` is plain, hashable and JSON-serialisable: it is a static argument of jitted
functions, it is written next to every checkpoint, and it is what Hugging Face export reads.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

_CHOICES = {
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "gelu_exact", "swiglu"),
    "rope_scaling": ("none", "linear", "llama3"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots"),
    "quantization": ("none", "int8"),
    "kv_cache_dtype": ("auto", "int8"),
    "architecture": ("decoder", "encoder"),
    "norm_position": ("pre", "post"),
    "head": ("lm", "classifier", "none"),
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
    num_kv_heads: int = 0  # 0: as many as num_heads (multi-head attention)
    head_dim: int = 0  # 0: embed_dim // num_heads
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    # RoPE context extension, as Hugging Face's rope_type: linear divides every frequency by the
    # factor; llama3 divides the low ones, keeps the high ones, and interpolates in between.
    rope_scaling: str = "none"  # none | linear | llama3
    rope_scaling_factor: float = 1.0  # linear, llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_len: int = 8192  # llama3: the context length the model was pretrained with
    # Mistral's sliding-window attention (what its config.json has and LLaMA's lacks): a token
    # sees the last `sliding_window` tokens. lmjax attends to every token, which is the same for
    # sequences up to the window, so a window needs max_len <= sliding_window. 0 = no window.
    sliding_window: int = 0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (tanh approximation, GPT-2) | gelu_exact (erf, nanoGPT) | swiglu
    bias: bool = True  # biases in every Dense and LayerNorm
    qkv_bias: bool = False  # biases on query, key and value even when bias=False (Qwen2)
    out_bias: bool = False  # bias on the attention output even when bias=False (LLaMA)
    tie_embeddings: bool = True  # output projection = token embedding transposed
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.02
    remat: str = "none"  # none | full | dots: rematerialise each block in the backward pass
    # LoRA adapters (lmjax/lora.py; the experiment config's `lora` section): rank 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with lora_use_rslora)
    lora_targets: str = "query,value"  # comma-separated LORA_TARGETS names
    lora_dropout: float = 0.0  # on the adapter's input, in training only
    lora_use_rslora: bool = False
    # Inference only (lmjax/quantize.py): int8 stores every projection kernel and the embedding
    # as int8 with float32 scales per output channel (per vocabulary row for the embedding).
    quantization: str = "none"  # none | int8
    # int8: 0 = a scale per output channel; g > 0 = per block of g input channels too (llama.cpp
    # Q8_0's 32), along the kernel's last input axis (the embedding's D).
    quant_group_size: int = 0
    kv_cache_dtype: str = "auto"  # auto (= dtype) | int8: int8 keys/values, a scale per token/head
    # Encoders (BERT, lmjax/encoder.py): bidirectional attention with a padding mask.
    architecture: str = "decoder"  # decoder (causal LM, model.Transformer) | encoder (BERT)
    norm_position: str = "pre"  # pre: x + f(norm(x)) (GPT-2, LLaMA) | post: norm(x + f(x)) (BERT)
    type_vocab_size: int = 0  # encoder: token-type (sentence A/B) embeddings; 0 = none
    # encoder: lm (masked-LM head, BertForMaskedLM) | classifier (pooler + classifier,
    # BertForSequenceClassification) | none (pooler only: hidden states and pooled, BertModel)
    head: str = "lm"
    num_labels: int = 0  # head='classifier': classes (1 = regression); 0 otherwise

    def __post_init__(self):
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def lora_scale(self) -> float:
        """What a LoRA adapter's output is multiplied by (PEFT's `scaling`)."""
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_use_rslora
                                  else self.lora_rank)

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
        for name in ("num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be >= 0 (0 = default)")
        if not self.head_dim and self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim} "
                "(or set model.head_dim)")
        if self.quant_group_size < 0 or self.quant_group_size and any(
                n % self.quant_group_size for n in (self.embed_dim, self.head_size, self.mlp_dim)):
            raise ValueError(f"model.quant_group_size={self.quant_group_size!r} must be 0 or "
                             f"divide embed_dim, the head size and mlp_dim ({self.embed_dim}, "
                             f"{self.head_size}, {self.mlp_dim}): the kernels' input axes")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.kv_heads} must divide model.num_heads={self.num_heads}")
        if self.position == "rope" and self.head_size % 2:
            source = (f"model.head_dim={self.head_dim}" if self.head_dim else
                      f"model.embed_dim={self.embed_dim} / model.num_heads={self.num_heads}")
            raise ValueError(f"model.position='rope' needs an even head size, got {source} = "
                             f"{self.head_size}: set model.head_dim to an even number or change "
                             "embed_dim/num_heads")
        if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
            raise ValueError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be > 0")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_len > 0):
            raise ValueError(
                f"model.rope_scaling='llama3' needs 0 < model.rope_low_freq_factor="
                f"{self.rope_low_freq_factor} < model.rope_high_freq_factor="
                f"{self.rope_high_freq_factor} and model.rope_original_max_len="
                f"{self.rope_original_max_len} > 0")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ValueError(f"model.sliding_window={self.sliding_window!r} must be an integer "
                             ">= 0 (0 = no window)")
        if self.sliding_window and (self.position != "rope" or self.max_len > self.sliding_window):
            raise ValueError(
                f"model.sliding_window={self.sliding_window} needs model.position='rope' and "
                f"model.max_len={self.max_len} <= the window: lmjax has no sliding-window "
                "attention, only full attention, which is the same up to the window's length")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps"):
            if not (isinstance(getattr(self, name), (int, float))
                    and math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} must be a finite number > 0")
        self._validate_encoder()
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"model.init_std={self.init_std!r} must be a finite number >= 0")
        self._validate_lora()

    def _validate_lora(self) -> None:
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora.rank={self.lora_rank!r} must be an integer >= 0 (0 = off)")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha)
                and self.lora_alpha > 0):
            raise ValueError(f"lora.alpha={self.lora_alpha!r} must be a finite number > 0")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora.dropout={self.lora_dropout!r} must be in [0, 1)")
        if not self.lora_rank:
            return
        mlp = ("gate", "up", "down") if self.mlp == "swiglu" else ("up", "down")
        allowed = ("query", "key", "value", "out") + mlp
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else None
        if not targets or any(t not in allowed for t in targets):
            raise ValueError(f"lora.targets={self.lora_targets!r} must be comma-separated names "
                             f"of {', '.join(allowed)} (model.mlp={self.mlp!r})")

    def _validate_encoder(self) -> None:
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"model.type_vocab_size={self.type_vocab_size!r} must be an integer "
                             ">= 0 (0 = no token-type embeddings)")
        if self.architecture == "decoder":
            for name, default in (("head", "lm"), ("type_vocab_size", 0), ("num_labels", 0)):
                if getattr(self, name) != default:
                    raise ValueError(f"model.{name}={getattr(self, name)!r} is for "
                                     f"model.architecture='encoder'; a decoder has {name}="
                                     f"{default!r}")
        if self.head == "classifier" and not (isinstance(self.num_labels, int)
                                              and self.num_labels >= 1):
            raise ValueError(f"model.num_labels={self.num_labels!r} must be an integer >= 1 with "
                             "model.head='classifier' (1 = regression)")
        if self.head != "classifier" and self.num_labels != 0:
            raise ValueError(f"model.num_labels={self.num_labels!r} needs model.head="
                             f"'classifier' (model.head={self.head!r} has num_labels=0)")

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


# The device mesh's axes: data, FSDP and tensor parallelism (see lmjax/sharding.py).
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes ('' = replicated, 'data,fsdp' = both), the default of
# `config.mesh.rules`. Parameters use the plain names, activations the `activation_` ones, so that
# FSDP splits weights along `embed` while activations stay split along the batch.
DEFAULT_RULES: dict[str, str] = {
    "activation_batch": "data,fsdp",
    "activation_length": "",
    "activation_embed": "",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
    "cache_heads": "tensor",  # KV cache rows [B * G]: KV-head groups (as kv_heads), then
    "cache_batch": "data,fsdp",  # sequences (as activation_batch); see sample.py
    "cache_len": "",
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": "",
    "length": "",
    "norm": "",
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named preset as a ModelConfig, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def preset_fields(name: str, **overrides: Any) -> dict[str, Any]:
    """Every ModelConfig field of a preset as a dict (for `config.model.update(...)`), but the
    LoRA ones (the experiment config's `lora` section sets those, see `lora_fields`)."""
    fields = {k: v for k, v in dataclasses.asdict(preset(name)).items()
              if not k.startswith("lora_")}
    return {**fields, **overrides}


def lora_fields(config) -> dict[str, Any]:
    """The ModelConfig fields (`lora_rank`, ...) of an experiment config's `lora` section."""
    lora = config.get("lora", None)
    if lora is None:
        return {}
    return dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=lora.targets,
                lora_dropout=lora.dropout, lora_use_rslora=lora.use_rslora)


def default_config():
    """The full experiment config with every field and its default (an `ml_collections.ConfigDict`).

    Config files in `lmjax/configs/` start from this and override fields; any field can be
    overridden on the command line (`--config.model.num_layers=4`). Unknown keys are an error.
    """
    import ml_collections  # imported here so that ModelConfig alone needs no ml_collections

    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.init_from = ""  # '' | workdir or step folder of another run: its params, fresh optimizer

    # Model: the fields of ModelConfig. vocab_size 0 means "the tokenizer's vocab size".
    c.model = ml_collections.ConfigDict(preset_fields("nanogpt_baby", vocab_size=0))

    c.tokenizer = ml_collections.ConfigDict()
    # char | byte | sentencepiece | wordpiece (BERT's, trained) | hf (a Hugging Face model folder)
    c.tokenizer.kind = "char"
    c.tokenizer.vocab_size = 8000  # sentencepiece and wordpiece only
    c.tokenizer.model_type = "bpe"  # sentencepiece only: bpe | unigram
    c.tokenizer.path = ""  # existing SentencePiece .model or saved tokenizer folder ('' = train)
    # (kind hf: the folder with tokenizer.json or tokenizer.model, e.g. a Hugging Face model)

    c.data = ml_collections.ConfigDict()
    c.data.source = "shakespeare"  # shakespeare (embedded corpus) | files | jsonl | tfds
    c.data.train_files = ""  # files (one document each) / jsonl: glob(s), comma-separated
    c.data.val_files = ""  # files / jsonl: '' = the last val_fraction of the train tokens
    c.data.val_fraction = 0.1
    c.data.jsonl_field = "text"  # jsonl: the field holding each line's document
    c.data.encoding_errors = "strict"  # bytes that are not UTF-8: strict (error) | replace | ignore
    # Labelled data (model.head='classifier', lmjax/labelled.py): .tsv/.csv/.jsonl train_files
    c.data.text_fields = "text"  # the text column, or two for sentence pairs: 'sentence1,sentence2'
    c.data.label_field = "label"
    c.data.class_weights = ""  # '' | comma-separated weight per label id (weighted cross-entropy)
    # Masked LM (model.head='lm' of an encoder, lmjax/objectives.py): the share of tokens selected,
    # and whole-word masking (google-research/bert: a word's '##' WordPiece pieces go with it)
    c.data.mlm_probability = 0.15
    c.data.whole_word_mask = False
    c.data.tfds_name = ""  # tfds: dataset name, e.g. 'lm1b'
    c.data.tfds_train_split = "train"
    c.data.tfds_val_split = "validation"
    c.data.tfds_text_key = "text"
    c.data.tfds_data_dir = ""
    c.data.seq_len = 64  # tokens per training sequence (<= model.max_len)
    c.data.batch_size = 12  # global batch, in sequences
    c.data.seed = 0  # batch order: batch k is a pure function of (seed, k)
    # Rows: documents (segment ids, positions restart per document) | stream (nanoGPT: one
    # text) | auto (documents when the source has several). See lmjax/data.py.
    c.data.packing = "auto"
    # The token store (lmjax/token_store.py, `lmjax prepare`): '' = $LMJAX_TOKEN_STORES or
    # ~/.cache/lmjax/token_stores/<source>-<tokenizer>-<hash>; prepared on first use.
    c.data.store_dir = ""
    c.data.shard_mb = 64  # text per shard (and per unit of work of a prepare worker)
    c.data.prepare_workers = 0  # processes that tokenize; 0 = one per CPU

    # LoRA fine-tuning (lmjax/lora.py, Hu et al. 2021): rank > 0 trains low-rank adapters on the
    # targeted projections only; the base (init_from's params, else fresh from seed) is frozen.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (every weight trains)
    c.lora.alpha = 16.0  # the adapters' scale is alpha / rank (PEFT's lora_alpha)
    c.lora.dropout = 0.0  # on each adapter's input (PEFT's lora_dropout)
    c.lora.targets = "query,value"  # comma-separated: query, key, value, out, up, gate, down
    c.lora.use_rslora = False  # scale alpha / sqrt(rank) (Kalajdzievski 2023)
    # AdamW's decay of the adapters in place of optim.weight_decay (which is for pretraining):
    # 0 as PEFT users get by default (Hugging Face Trainer's weight_decay=0.0).
    c.lora.weight_decay = 0.0
    # QLoRA-style: model.quantization='int8' with rank > 0 quantizes the frozen base to int8
    # once at load (lmjax/quantize.py); the adapters stay float32 (lmjax/int8.py's gradient).

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3  # peak, after linear warmup from 0
    c.optim.min_learning_rate = 1e-4  # floor of the cosine decay
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0  # cosine decay length including warmup; 0 = train.num_steps
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1  # on matrices only (ndim >= 2), not on biases and norms
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 = off
    c.optim.grad_accum = 1  # micro-batches per optimizer step (optax.MultiSteps)
    # A NaN/inf loss or gradient norm stops the run (naming the step and the last good
    # checkpoint); True passes over such steps instead (no update; counted in metrics.jsonl).
    c.optim.skip_nonfinite = False

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000  # optimizer steps
    c.train.log_every = 50
    c.train.steps_per_call = 1  # micro-steps per jitted call (lax.scan): less dispatch, same result
    c.train.eval_every = 250  # 0 = only at the end
    c.train.eval_batches = 20  # validation batches per eval; -1 = the whole validation set
    # The last evaluation's batches: 0 = train.eval_batches, -1 = the whole validation set (quick
    # estimates during the run, the exact figure at its end).
    c.train.final_eval_batches = 0
    c.train.checkpoint_every = 500  # 0 = only at the end
    c.train.keep_checkpoints = 3
    c.train.keep_best = False  # also keep the checkpoint with the lowest validation loss
    c.train.async_checkpoints = True  # write checkpoints in a background thread (Orbax async)
    c.train.num_samples = 3  # samples printed at the end of training
    c.train.sample_prompt = "\n"
    c.train.sample_len = 200
    c.train.sample_temperature = 0.8
    c.train.sample_top_k = 0
    c.train.progress_bar = True

    # Parallelism: a (data, fsdp, tensor) device mesh over all devices of all processes; one
    # size may be -1 (= the remaining devices). See lmjax/sharding.py and the README.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # batch split, parameters replicated
    c.mesh.fsdp = 1  # batch split, parameters split along `embed` (fully sharded data parallel)
    c.mesh.tensor = 1  # heads, MLP and vocab split (tensor parallel)
    c.mesh.dcn_data = 1  # slices/hosts joined by the data-centre network (multi-slice TPU)
    # Logical axis -> mesh axes ('' = replicated, 'data,fsdp' = both), e.g. --config.mesh.rules.embed=
    c.mesh.rules = ml_collections.ConfigDict(DEFAULT_RULES)
    return c


# ----------------------------------------------------------------------------- experiment checks


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(config, num_devices: int | None = None) -> None:
    """Checks the ranges of an experiment config's fields (`default_config()`'s schema) before
    anything is read or computed; raises ValueError naming the field and what is allowed.

    `num_devices`: the devices the mesh spans (None: the mesh sizes are checked for sign only).
    Files, the tokenizer and the model's shape are checked by their modules (see
    `lmjax.run_config.validate_config`, which calls this first).
    """
    optim, train, data, mesh = config.optim, config.train, config.data, config.mesh
    _check(isinstance(config.seed, int) and config.seed >= 0, "seed", config.seed,
           "an integer >= 0")
    # optim
    _check(_is_number(optim.learning_rate) and optim.learning_rate >= 0, "optim.learning_rate",
           optim.learning_rate, "a finite number >= 0 (the peak learning rate)")
    _check(_is_number(optim.min_learning_rate)
           and 0 <= optim.min_learning_rate <= optim.learning_rate, "optim.min_learning_rate",
           optim.min_learning_rate, f"a finite number in [0, optim.learning_rate="
           f"{optim.learning_rate}] (the floor of the cosine decay)")
    for name in ("b1", "b2"):
        _check(_is_number(optim[name]) and 0 <= optim[name] < 1, f"optim.{name}", optim[name],
               "a number in [0, 1) (Adam's moment decay)")
    _check(_is_number(optim.eps) and optim.eps > 0, "optim.eps", optim.eps,
           "a finite number > 0")
    for name, meaning in (("weight_decay", "0 = off"), ("grad_clip", "0 = off")):
        _check(_is_number(optim[name]) and optim[name] >= 0, f"optim.{name}", optim[name],
               f"a finite number >= 0 ({meaning})")
    if "lora" in config:
        _check(_is_number(config.lora.weight_decay) and config.lora.weight_decay >= 0,
               "lora.weight_decay", config.lora.weight_decay, "a finite number >= 0 (0 = off)")
    for name, meaning in (("warmup_steps", "steps"), ("decay_steps", "0 = train.num_steps")):
        _check(isinstance(optim[name], int) and optim[name] >= 0, f"optim.{name}", optim[name],
               f"an integer >= 0 ({meaning})")
    _check(isinstance(optim.grad_accum, int) and optim.grad_accum >= 1, "optim.grad_accum",
           optim.grad_accum, "an integer >= 1")
    # train
    for name, minimum in (("num_steps", 1), ("log_every", 1), ("steps_per_call", 1),
                          ("eval_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 1),
                          ("num_samples", 0), ("sample_len", 1), ("sample_top_k", 0)):
        note = " (0 = only at the end)" if name in ("eval_every", "checkpoint_every") else ""
        _check(isinstance(train[name], int) and train[name] >= minimum, f"train.{name}",
               train[name], f"an integer >= {minimum}{note}")
    _check(optim.warmup_steps <= max(train.num_steps, 1), "optim.warmup_steps",
           optim.warmup_steps, f"at most train.num_steps={train.num_steps}")
    _check(isinstance(train.eval_batches, int) and (train.eval_batches >= 1
                                                    or train.eval_batches == -1),
           "train.eval_batches", train.eval_batches,
           "an integer >= 1, or -1 (the whole validation set)")
    _check(isinstance(train.final_eval_batches, int) and train.final_eval_batches >= -1,
           "train.final_eval_batches", train.final_eval_batches,
           "an integer >= 1, 0 (= train.eval_batches) or -1 (the whole validation set)")
    _check(_is_number(train.sample_temperature) and train.sample_temperature >= 0,
           "train.sample_temperature", train.sample_temperature,
           "a finite number >= 0 (0 = greedy)")
    # data
    for name in ("seq_len", "batch_size"):
        _check(isinstance(data[name], int) and data[name] >= 1, f"data.{name}", data[name],
               "an integer >= 1")
    _check(isinstance(data.seed, int) and data.seed >= 0, "data.seed", data.seed,
           "an integer >= 0")
    _check(_is_number(data.val_fraction) and 0 < data.val_fraction < 1, "data.val_fraction",
           data.val_fraction, "a number in (0, 1)")
    _check(data.encoding_errors in ("strict", "replace", "ignore"), "data.encoding_errors",
           data.encoding_errors, "one of strict, replace, ignore")
    _check(data.packing in ("auto", "documents", "stream"), "data.packing", data.packing,
           "one of auto, documents, stream")
    _check(_is_number(data.mlm_probability) and 0 < data.mlm_probability < 1,
           "data.mlm_probability", data.mlm_probability,
           "a number in (0, 1) (the share of tokens masked LM selects)")
    _check(isinstance(data.whole_word_mask, bool), "data.whole_word_mask", data.whole_word_mask,
           "True or False")
    _check(_is_number(data.shard_mb) and data.shard_mb > 0, "data.shard_mb", data.shard_mb,
           "a number > 0 (MB of text per shard)")
    _check(isinstance(data.prepare_workers, int) and data.prepare_workers >= 0,
           "data.prepare_workers", data.prepare_workers, "an integer >= 0 (0 = one per CPU)")
    _check(data.seq_len <= config.model.max_len, "data.seq_len", data.seq_len,
           f"at most the model's maximum length model.max_len={config.model.max_len}")
    # mesh
    sizes = {axis: mesh[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        allowed = f"-1 (the remaining devices) or a divisor of the {num_devices} devices: " + (
            ", ".join(map(str, _divisors(num_devices))) if num_devices else "an integer >= 1")
        _check(isinstance(size, int) and (size == -1 or (size >= 1 and (
            not num_devices or num_devices % size == 0))), f"mesh.{axis}", size, allowed)
    _check(list(sizes.values()).count(-1) <= 1, "mesh", sizes, "at most one size -1")
    if num_devices:
        fixed = math.prod(s for s in sizes.values() if s != -1)
        total = fixed * (num_devices // fixed if -1 in sizes.values() else 1)
        _check(total == num_devices and num_devices % fixed == 0, "mesh", sizes,
               f"sizes whose product is the {num_devices} devices (each a divisor: "
               f"{', '.join(map(str, _divisors(num_devices)))}; one may be -1)")
    _check(isinstance(mesh.dcn_data, int) and mesh.dcn_data >= 1, "mesh.dcn_data",
           mesh.dcn_data, "an integer >= 1 that divides mesh.data")
    rules = mesh.get("rules", None) or {}
    for name in rules.keys():
        _check(name in DEFAULT_RULES, f"mesh.rules.{name}", rules[name],
               f"rules for the logical axes {', '.join(DEFAULT_RULES)} only")
        axes = [a.strip() for a in str(rules[name]).split(",") if a.strip()]
        _check(all(a in MESH_AXES for a in axes), f"mesh.rules.{name}", rules[name],
               f"'' (replicated) or comma-separated mesh axes of {', '.join(MESH_AXES)}")
