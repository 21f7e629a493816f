"""Hugging Face BERT and RoBERTa folders in and out: `BertModel`, `BertForMaskedLM`,
`BertForSequenceClassification` and the `Roberta*` three (safetensors or pytorch_model.bin), as
lmjax encoders.

    model_config, params, tokenizer, labels = load_hf_bert("path/to/folder")  # BERT or RoBERTa
    save_hf_bert("path/to/export", model_config, params, tokenizer, label_names=["neg", "pos"])
    save_hf_bert("path/to/export", ..., model_type="roberta")

RoBERTa is BERT with other tensor names and three differences: its positions start at
padding_idx + 1 (lmjax keeps rows padding_idx + 1 .. of the table: position p is RoBERTa's
p + padding_idx + 1, exact for right-padded rows; an export writes zeros below); one token type;
its classifier head is dense + tanh on the first token, then the output layer, i.e. lmjax's
pooler and classifier (RoBERTa also drops out before the dense: the same in evaluation), and no
pooler otherwise (RobertaForMaskedLM). The tokenizer is the folder's tokenizer.json (byte-level
BPE, <s> A </s></s> B </s>).

The folder reading (safetensors, shards, .bin) and writing are hf.py's (`read_tensors`,
`write_tensors`); this module holds BERT's config mapping and its tensor table only. torch
`nn.Linear` weights [out, in] are transposed; the attention kernels keep their heads as axes.
The config decides the head: architectures[0] BertForMaskedLM -> head 'lm', ...ForSequence-
Classification -> 'classifier' (num_labels from id2label), anything else -> 'none' (BertModel).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from lmjax import encoder as encoder_lib
from lmjax import hf, hf_layout
from lmjax import tokenizers as tokenizers_lib
from lmjax import wordpiece
from lmjax.config import ModelConfig

_ARCHITECTURES = {"lm": "ForMaskedLM", "classifier": "ForSequenceClassification", "none": "Model"}
_FAMILIES = {"bert": "Bert", "roberta": "Roberta"}  # model_type -> class name prefix
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
# Buffers older checkpoints hold, and the MLM decoder tied to the embeddings / its bias.
_IGNORED = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$"
                      r"|^cls\.predictions\.decoder\.bias$|^lm_head\.decoder\.bias$")


def position_offset(hf_cfg: dict) -> int:
    """Rows of the position table before position 0: RoBERTa's padding_idx + 1, BERT's 0."""
    return hf_cfg.get("pad_token_id", 1) + 1 if hf_cfg.get("model_type") == "roberta" else 0


def config_from_hf_bert(hf_cfg: dict, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a BERT config.json (as a dict); ValueError for what lmjax lacks."""
    model_type = hf_cfg.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(_FAMILIES)}")
    act = hf_cfg.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"bert config.json: hidden_act={act!r} is not supported "
                         f"(supported: {', '.join(_ACTIVATIONS)})")
    if hf_cfg.get("position_embedding_type", "absolute") != "absolute" or hf_cfg.get("is_decoder"):
        raise ValueError("bert config.json: only absolute position embeddings and is_decoder="
                         "false are supported by lmjax")
    family = _FAMILIES[model_type]
    arch = (hf_cfg.get("architectures") or [family + "Model"])[0]
    head = {family + _ARCHITECTURES["lm"]: "lm",
            family + _ARCHITECTURES["classifier"]: "classifier"}.get(arch, "none")
    num_labels = 0
    if head == "classifier":
        num_labels = len(hf_cfg.get("id2label") or {}) or int(hf_cfg.get("num_labels", 2))
    return ModelConfig(
        vocab_size=hf_cfg.get("vocab_size", 30522), num_layers=hf_cfg.get("num_hidden_layers", 12),
        num_heads=hf_cfg.get("num_attention_heads", 12), embed_dim=hf_cfg.get("hidden_size", 768),
        mlp_dim=hf_cfg.get("intermediate_size", 3072),
        max_len=hf_cfg.get("max_position_embeddings", 512) - position_offset(hf_cfg),
        position="learned", norm="layernorm",
        norm_eps=float(hf_cfg.get("layer_norm_eps", 1e-12)), mlp=_ACTIVATIONS[act], bias=True,
        tie_embeddings=hf_cfg.get("tie_word_embeddings", True), dropout=0.0, dtype=dtype,
        param_dtype=dtype, init_std=float(hf_cfg.get("initializer_range", 0.02)),
        architecture="encoder", norm_position="post",
        type_vocab_size=hf_cfg.get("type_vocab_size", 2), head=head, num_labels=num_labels)


def hf_bert_config(config: ModelConfig, tokenizer=None,
                   label_names: list[str] | None = None, model_type: str = "bert") -> dict:
    """The config.json of `config` as BERT (or RoBERTa); ValueError naming the fields BERT
    cannot express."""
    cfg = config
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(_FAMILIES)}")
    wanted = dict(architecture="encoder", norm_position="post", position="learned",
                  norm="layernorm", bias=True, kv_heads=cfg.num_heads,
                  head_size=cfg.embed_dim // cfg.num_heads)
    bad = [f"model.{name}={getattr(cfg, name)!r} (BERT: {value!r})"
           for name, value in wanted.items() if getattr(cfg, name) != value]
    if cfg.mlp not in ("gelu", "gelu_exact"):
        bad.append(f"model.mlp={cfg.mlp!r} (BERT: gelu_exact or gelu)")
    if cfg.param_dtype not in hf_layout.DTYPES:
        bad.append(f"model.param_dtype={cfg.param_dtype!r}")
    if bad:
        raise ValueError("cannot export as Hugging Face BERT: " + ", ".join(bad))
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = (pad_id or 0) if model_type == "bert" else (1 if pad_id is None else pad_id)
    out: dict[str, Any] = dict(
        architectures=[_FAMILIES[model_type] + _ARCHITECTURES[cfg.head]], model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
        hidden_act="gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.max_len + (pad_id + 1 if model_type == "roberta" else 0),
        type_vocab_size=max(cfg.type_vocab_size, 1),
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype,
        torch_dtype=cfg.param_dtype, pad_token_id=pad_id)
    if cfg.head == "classifier":
        names = list(label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)])
        if len(names) != cfg.num_labels:
            raise ValueError(f"label_names has {len(names)} names for model.num_labels="
                             f"{cfg.num_labels}")
        out.update(id2label={str(i): n for i, n in enumerate(names)},
                   label2id={n: i for i, n in enumerate(names)},
                   problem_type="regression" if cfg.num_labels == 1 else
                   "single_label_classification")
    return out


def _tensor_rules(config: ModelConfig, prefix: str,
                  mlm_bias: tuple[str, ...] = ("cls.predictions.bias",),
                  model_type: str = "bert") -> list[hf_layout.Rule]:
    """Every tensor of a BERT (or RoBERTa) checkpoint for `config` ('bert.' / 'roberta.' prefix
    for the heads' models); `mlm_bias`: the names of the MLM output bias (transformers ties the
    decoder's bias to cls.predictions.bias, RoBERTa's to lm_head.bias; an export writes both, an
    import reads whichever the file has)."""
    cfg, rules = config, []
    roberta = model_type == "roberta"

    def add(name, *paths, in_dims=1, transpose=False):
        rules.append(hf_layout.Rule(name, tuple(tuple(p.split("/")) for p in paths), in_dims,
                              transpose))

    def dense(hf_name, path, in_dims=1):
        add(f"{hf_name}.weight", f"{path}/kernel", in_dims=in_dims, transpose=True)
        add(f"{hf_name}.bias", f"{path}/bias", in_dims=0)

    def norm(hf_name, path):
        add(f"{hf_name}.weight", f"{path}/scale", in_dims=0)
        add(f"{hf_name}.bias", f"{path}/bias", in_dims=0)

    p = f"{prefix}embeddings."
    add(f"{p}word_embeddings.weight", "embed/embedding")
    add(f"{p}position_embeddings.weight", "pos_embed")
    add(f"{p}token_type_embeddings.weight", "type_embed")
    norm(f"{p}LayerNorm", "embed_norm")
    for i in range(cfg.num_layers):
        h, b = f"{prefix}encoder.layer.{i}.", f"blocks_{i}/"
        for name in ("query", "key", "value"):
            dense(f"{h}attention.self.{name}", f"{b}attn/{name}")
        dense(f"{h}attention.output.dense", f"{b}attn/out", in_dims=2)
        norm(f"{h}attention.output.LayerNorm", f"{b}attn_norm")
        dense(f"{h}intermediate.dense", f"{b}mlp/fc")
        dense(f"{h}output.dense", f"{b}mlp/proj")
        norm(f"{h}output.LayerNorm", f"{b}mlp_norm")
    head = "lm_head." if roberta else "cls.predictions."
    if cfg.head == "lm":
        dense(f"{head}dense" if roberta else f"{head}transform.dense", "mlm_transform")
        norm(f"{head}layer_norm" if roberta else f"{head}transform.LayerNorm", "mlm_norm")
        for name in mlm_bias:
            add(name, "mlm_bias", in_dims=0)
        if not cfg.tie_embeddings:
            add(f"{head}decoder.weight", "lm_head/kernel", transpose=True)
    elif roberta and cfg.head == "classifier":  # RobertaClassificationHead
        dense("classifier.dense", "pooler")
        dense("classifier.out_proj", "classifier")
    else:
        dense(f"{prefix}pooler.dense", "pooler")
    if cfg.head == "classifier" and not roberta:
        dense("classifier", "classifier")
    return rules


def _shapes(config: ModelConfig) -> dict:
    return {path: leaf.shape for path, leaf in
            traverse_util.flatten_dict(encoder_lib.param_shapes(config)).items()}


def load_hf_bert_params(folder: str, config: ModelConfig) -> dict:
    """The folder's BERT or RoBERTa weights as lmjax encoder params for `config`
    (`config_from_hf_bert`)."""
    hf_cfg = hf.read_hf_config(folder)
    model_type, offset = hf_cfg.get("model_type", "bert"), position_offset(hf_cfg)
    checkpoint = hf._Checkpoint(folder)
    names = checkpoint.names()
    prefix = "" if "embeddings.word_embeddings.weight" in names else f"{model_type}."
    tied = config.tie_embeddings or config.head != "lm"
    head = "lm_head." if model_type == "roberta" else "cls.predictions."
    bias = (f"{head}bias" if f"{head}bias" in names or config.head != "lm"
            else f"{head}decoder.bias",)

    def ignore(name):
        return bool(_IGNORED.search(name)) or (tied and name == f"{head}decoder.weight")
    shapes = _shapes(config)
    shapes[("pos_embed",)] = (config.max_len + offset, config.embed_dim)  # the whole table
    params = hf.read_tensors(checkpoint, _tensor_rules(config, prefix, bias, model_type), shapes,
                             config.param_dtype, ignore=ignore,
                             what=f"{_FAMILIES[model_type].upper()} head {config.head!r}")
    params["pos_embed"] = params["pos_embed"][offset:]  # RoBERTa's position 0 is padding_idx + 1
    return params


def load_hf_bert(folder: str, dtype: str = "float32"):
    """Imports a Hugging Face BERT or RoBERTa folder: (ModelConfig, params, tokenizer or None,
    label names (id2label in order; None unless a classifier))."""
    hf_cfg = hf.read_hf_config(folder)
    config = config_from_hf_bert(hf_cfg, dtype)
    params = load_hf_bert_params(folder, config)
    labels = None
    if config.head == "classifier" and hf_cfg.get("id2label"):
        labels = [hf_cfg["id2label"][str(i)] for i in range(config.num_labels)]
    return config, params, bert_tokenizer(folder), labels


def bert_tokenizer(folder: str):
    """The folder's tokenizer: tokenizer.json, else a WordPiece vocab.txt (BERT's lower-casing
    from tokenizer_config.json's do_lower_case, default true), else None."""
    if tokenizers_lib.has_saved_tokenizer(folder) or tokenizers_lib.HFTokenizer.in_folder(folder):
        return hf.load_hf_tokenizer(folder)
    vocab = os.path.join(folder, "vocab.txt")
    if not os.path.isfile(vocab):
        return None
    config_path = os.path.join(folder, "tokenizer_config.json")
    lower = True
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            lower = json.load(f).get("do_lower_case", True)
    return wordpiece.from_vocab(vocab, lowercase=lower)


def save_hf_bert(folder: str, config: ModelConfig, params: dict, tokenizer=None,
                 label_names: list[str] | None = None, model_type: str = "bert") -> None:
    """Exports lmjax encoder params as a BERT (model_type='roberta': RoBERTa) folder that
    `transformers` loads (config.json, model.safetensors, the tokenizer's files)."""
    hf_cfg = hf_bert_config(config, tokenizer, label_names, model_type)
    flat = traverse_util.flatten_dict(params)
    shapes = _shapes(config)
    if set(shapes) != set(flat) or any(tuple(flat[p].shape) != shapes[p] for p in shapes):
        bad = sorted(set(shapes) ^ set(flat)) or [p for p in shapes
                                                   if tuple(flat[p].shape) != shapes[p]]
        raise ValueError(f"params do not match model_config: check parameter {'/'.join(bad[0])}")
    if not config.type_vocab_size:  # BERT always has a token-type table: one row of zeros
        shapes[("type_embed",)] = (1, config.embed_dim)
    offset = position_offset(hf_cfg)
    if offset:  # RoBERTa's rows before position 0 (padding_idx's among them): zeros
        flat[("pos_embed",)] = np.concatenate([np.zeros((offset, config.embed_dim),
                                                        flat[("pos_embed",)].dtype),
                                               np.asarray(flat[("pos_embed",)])])
        shapes[("pos_embed",)] = (config.max_len + offset, config.embed_dim)
    head = "lm_head." if model_type == "roberta" else "cls.predictions."
    rules = _tensor_rules(config, "" if config.head == "none" else f"{model_type}.",
                          (f"{head}bias", f"{head}decoder.bias"), model_type)
    hf.write_tensors(folder, rules, shapes, flat, config.param_dtype)
    with open(os.path.join(folder, hf.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save(folder)
