"""The BERT-style encoder against `transformers`' BERT: logits of random tiny models with
padding masks and token types, folders in and out (safetensors and .bin), the WordPiece
tokenizer against `transformers`' BertTokenizerFast, and config errors.

Every Hugging Face model is a tiny randomly initialised `transformers` model saved with
`save_pretrained` (nothing is downloaded), its weights re-drawn with a larger spread (norm
scales around 1), so that a wrong conversion shows far above the 1e-4 tolerance.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmjax import encoder as encoder_lib
from lmjax import hf_bert
from lmjax import attention as attention_lib
from lmjax import model as model_lib
from lmjax import objectives
from lmjax import tokenizers as tokenizers_lib
from lmjax import wordpiece
from lmjax.config import ModelConfig

V = 96
BERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=24, type_vocab_size=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CLASSES = {"lm": transformers.BertForMaskedLM, "classifier":
           transformers.BertForSequenceClassification, "none": transformers.BertModel}
# Three rows right-padded to 10 (lengths 10, 6, 3); the first two are sentence pairs.
TOKENS = np.array([[2, 17, 50, 3, 64, 8, 90, 42, 11, 3],
                   [2, 9, 33, 3, 88, 3, 0, 0, 0, 0],
                   [2, 40, 3, 0, 0, 0, 0, 0, 0, 0]])
TYPES = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0], [0] * 10])
LENGTHS = [10, 6, 3]
MASK = (np.arange(10)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)


def make_bert(head, **overrides):
    config = transformers.BertConfig(**{**BERT, **overrides})
    if head == "classifier":
        config.num_labels = overrides.get("num_labels", 3)
    torch.manual_seed(0)
    return randomized(CLASSES[head](config))


def randomized(model):
    """`model` with seeded random weights well away from transformers' init (norm scales
    around 1), in eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if "LayerNorm.weight" in name or "layer_norm.weight" in name
                    else 0.15 * noise)
    return model.eval()


def torch_out(model, head):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK),
                    token_type_ids=torch.tensor(TYPES))
    if head == "none":
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()
    return out.logits.numpy()


def lmjax_out(config, params):
    apply = jax.jit(encoder_lib.Encoder(config).apply)
    out = apply({"params": params}, jnp.asarray(TOKENS), attention_mask=jnp.asarray(MASK),
                token_types_BxL=jnp.asarray(TYPES))
    return jax.tree.map(np.asarray, out)


def max_diff(a, b, head):
    """Largest difference over the real tokens (padding's outputs are meaningless)."""
    if head == "classifier":
        return float(np.abs(a - b).max())
    if head == "none":
        return max(max_diff(a[0], b[0], "lm"), float(np.abs(a[1] - b[1]).max()))
    return max(float(np.abs(a[r, :n] - b[r, :n]).max()) for r, n in enumerate(LENGTHS))


@pytest.mark.parametrize("head,overrides,weights", [
    ("lm", {}, "safetensors"), ("classifier", {}, "bin"), ("none", {"hidden_act": "gelu_new"},
                                                           "safetensors"),
    ("classifier", {"num_labels": 1}, "safetensors")])
def test_imported_bert_matches_transformers(head, overrides, weights, tmp_path):
    model = make_bert(head, **overrides)
    if weights == "safetensors":
        model.save_pretrained(str(tmp_path))
    else:  # transformers 5 writes safetensors only: a .bin as older versions wrote it
        model.config.architectures = [type(model).__name__]
        model.config.to_json_file(str(tmp_path / "config.json"))
        torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
    config, params, tokenizer, labels = hf_bert.load_hf_bert(str(tmp_path))
    assert config.head == head and tokenizer is None
    reference = torch_out(model, head)
    assert max_diff(lmjax_out(config, params), reference, head) <= 1e-4
    assert np.abs(jax.tree.leaves(reference)[0]).max() > 0.5  # not trivially small

    # Out again: transformers loads lmjax's export and computes the same outputs.
    hf_bert.save_hf_bert(str(tmp_path / "export"), config, params, label_names=labels)
    reloaded = CLASSES[head].from_pretrained(str(tmp_path / "export")).eval()
    assert max_diff(torch_out(reloaded, head), reference, head) <= 1e-5
    if head == "classifier":
        assert reloaded.config.id2label == model.config.id2label


ROBERTA_CLASSES = {"lm": transformers.RobertaForMaskedLM,
                   "classifier": transformers.RobertaForSequenceClassification,
                   "none": transformers.RobertaModel}


@pytest.mark.parametrize("head", ["lm", "classifier", "none"])
def test_imported_roberta_matches_transformers(head, tmp_path):
    """RoBERTa: positions from padding_idx + 1, one token type, RobertaClassificationHead, no
    pooler in RobertaForMaskedLM; lmjax's logits are transformers' (right-padded rows, padding
    id 1 as RoBERTa's), and the export loads back in transformers with the same outputs."""
    config = transformers.RobertaConfig(**{**BERT, "type_vocab_size": 1,
                                           "max_position_embeddings": 10 + 2, "pad_token_id": 1,
                                           "layer_norm_eps": 1e-5, "num_labels": 3})
    torch.manual_seed(0)
    model = randomized(ROBERTA_CLASSES[head](config))
    model.save_pretrained(str(tmp_path))
    tokens = np.where(MASK > 0, TOKENS, 1)

    def outputs(m):
        with torch.no_grad():
            out = m(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK))
        return ((out.last_hidden_state.numpy(), out.pooler_output.numpy()) if head == "none"
                else out.logits.numpy())

    reference = outputs(model)
    lmjax_config, params, _, _ = hf_bert.load_hf_bert(str(tmp_path))
    assert lmjax_config.max_len == 10 and lmjax_config.type_vocab_size == 1
    assert lmjax_config.head == head and ("pooler" in params) == (head != "lm")
    out = jax.tree.map(np.asarray, jax.jit(encoder_lib.Encoder(lmjax_config).apply)(
        {"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(MASK)))
    assert max_diff(out, reference, head) <= 1e-4
    assert np.abs(jax.tree.leaves(reference)[0]).max() > 0.2  # 1e-4 is small beside it
    hf_bert.save_hf_bert(str(tmp_path / "export"), lmjax_config, params, model_type="roberta")
    reloaded = ROBERTA_CLASSES[head].from_pretrained(str(tmp_path / "export")).eval()
    assert type(reloaded).__name__ == type(model).__name__
    assert max_diff(outputs(reloaded), reference, head) <= 1e-5


def test_roberta_tokenizer_from_tokenizer_json(tmp_path):
    """A RoBERTa folder's byte-level BPE tokenizer.json: <s> A </s></s> B </s> ids, <pad> 1 and
    <mask> as transformers' RobertaTokenizerFast gives them, for texts and pairs."""
    import tokenizers
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, special_tokens=[
        "<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe._tokenizer.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2),
                                                                             ("<s>", 0))
    reference = transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer)
    reference.save_pretrained(str(tmp_path))
    tokenizer = hf_bert.bert_tokenizer(str(tmp_path))
    assert tokenizer.pad_id == 1 and wordpiece.token_id(tokenizer, "mask") == 4
    for text, pair in [("The lazy fox, in time!", None), ("To be or not", "that is Nine."),
                       ("quick " * 30, "brown " * 5)]:
        expected = reference(text, pair, truncation=True, max_length=16)
        assert wordpiece.encode(tokenizer, text, pair, max_len=16)[0] == expected["input_ids"]


def random_params(config, seed=1):
    shapes = encoder_lib.param_shapes(config)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(
        ("scale" in jax.tree_util.keystr(path)) + 0.15 * rng.standard_normal(s.shape), s.dtype),
        shapes)


def test_lmjax_encoder_exports_to_transformers(tmp_path):
    """A from-scratch lmjax encoder (untied MLM decoder, tanh GELU) in transformers."""
    config = ModelConfig(vocab_size=V, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64,
                         max_len=16, mlp="gelu", norm_eps=1e-12, tie_embeddings=False,
                         architecture="encoder", norm_position="post", type_vocab_size=2)
    params = random_params(config)
    hf_bert.save_hf_bert(str(tmp_path), config, params)
    reloaded = transformers.BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert max_diff(lmjax_out(config, params), torch_out(reloaded, "lm"), "lm") <= 1e-4
    config2, params2, _, _ = hf_bert.load_hf_bert(str(tmp_path))
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bidirectional_attention_and_padding():
    """The blocked CPU kernel and jax.nn.dot_product_attention agree without the causal triangle,
    against a NumPy softmax over the keys of the query's own segment."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 6, 4, 8)).astype(np.float32) for _ in range(3))
    segments = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]])
    scores = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(8)
    same = segments[:, None, :, None] == segments[:, None, None, :]
    scores = np.where(same, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    reference = np.einsum("bhls,bshk->blhk", weights / weights.sum(-1, keepdims=True), v)
    for blocked in (True, False):
        out = attention_lib.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         jnp.asarray(segments), blocked=blocked, causal=False)
        np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5)


@pytest.mark.parametrize("fields,message", [
    (dict(architecture="bidirectional"), "model.architecture='bidirectional' is not one of"),
    (dict(head="classifier"), "model.head='classifier' is for model.architecture='encoder'"),
    (dict(architecture="encoder", head="classifier"), "model.num_labels=0 must be an integer"),
    (dict(architecture="encoder", num_labels=2), "needs model.head='classifier'"),
    (dict(norm_position="middle"), "model.norm_position='middle' is not one of pre, post"),
    (dict(architecture="encoder", type_vocab_size=-1), "model.type_vocab_size=-1"),
])
def test_config_errors(fields, message):
    base = dict(vocab_size=V, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=8, max_len=8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**base, **fields)


def test_export_errors(tmp_path):
    config = ModelConfig(vocab_size=V, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=8,
                         max_len=8, architecture="encoder", norm_position="pre",
                         mlp="swiglu")
    with pytest.raises(ValueError, match="norm_position='pre' \\(BERT: 'post'\\).*mlp='swiglu'"):
        hf_bert.save_hf_bert(str(tmp_path), config, jax.tree.map(
            lambda s: np.zeros(s.shape, s.dtype), encoder_lib.param_shapes(config)))


CORPUS = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine!",
          "To be, or not to be: that is the question."] * 20


@functools.lru_cache
def trained_tokenizer():
    return tokenizers_lib.WordPieceTokenizer.train(CORPUS, vocab_size=120)


def test_wordpiece_matches_transformers(tmp_path):
    """Trained here, saved, and read back by transformers' BertTokenizerFast and from vocab.txt:
    the same ids, token types and special tokens, for single texts and pairs."""
    tokenizer = trained_tokenizer()
    assert [wordpiece.token_id(tokenizer, n) for n in ("pad", "unk", "cls", "sep", "mask")] == [
        0, 1, 2, 3, 4]
    assert wordpiece.special_ids(tokenizer) == [0, 1, 2, 3, 4] and tokenizer.pad_id == 0
    tokenizer.save(str(tmp_path))
    reference = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    vocab = sorted(reference.get_vocab().items(), key=lambda kv: kv[1])
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab))
    from_vocab = hf_bert.bert_tokenizer(str(tmp_path / "vocab"))
    for text, pair in [("The lazy fox, in time!", None), ("To be or not", "that is Nine."),
                       ("quick " * 30, "brown " * 5)]:
        expected = reference(text, pair, truncation=True, max_length=16)
        for tok in (tokenizer, from_vocab):
            assert wordpiece.encode(tok, text, pair, max_len=16) == (
                expected["input_ids"], expected["token_type_ids"])


# ------------------------------------------------------------------------------ masked LM


def test_masking_follows_bert():
    """15% of the maskable tokens selected, of those 80% [MASK], 10% random, 10% kept; special
    tokens and padding never; the same keys give the same masks (binomial bounds, 5 sigma)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, V, (32, 512)).astype(np.int32)
    tokens[:, 0] = 2  # [CLS]
    maskable = (tokens != 2) & (np.arange(512)[None] < 480)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(3), r))(jnp.arange(32))
    masking = jax.jit(functools.partial(objectives.mask_tokens, mask_id=4, vocab_size=V))
    inputs, selected = masking(keys, tokens, maskable)
    inputs, selected = np.asarray(inputs), np.asarray(selected)
    n = maskable.sum()
    assert not selected[~maskable].any() and (inputs[~selected] == tokens[~selected]).all()
    assert abs(selected.sum() - 0.15 * n) < 5 * np.sqrt(n * 0.15 * 0.85)
    k = selected.sum()
    masked, kept = (inputs[selected] == 4).sum(), (inputs[selected] == tokens[selected]).sum()
    random_other = k - masked - kept  # a random draw can equal the token: ~1/V of the 10%
    for count, p in ((masked, 0.8), (kept, 0.1 + 0.1 / V), (random_other, 0.1 - 0.1 / V)):
        assert abs(count - p * k) < 5 * np.sqrt(k * p * (1 - p))
    # Each row's mask depends on its own key only: row 5 alone gets the same mask.
    alone = masking(keys[5:6], tokens[5:6], maskable[5:6])
    np.testing.assert_array_equal(np.asarray(alone[0])[0], inputs[5])


@functools.lru_cache
def shakespeare_tokenizer():
    """WordPiece with a small vocabulary trained on two plays: many words of several pieces."""
    from lmjax import data as data_lib
    works = data_lib.shakespeare_works()
    return tokenizers_lib.WordPieceTokenizer.train([works["macbeth"], works["tempest"]], 400)


def mlm_objective(tokenizer, **fields):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=1, num_heads=2,
                         embed_dim=8, mlp_dim=8, max_len=128, architecture="encoder",
                         norm_position="post", type_vocab_size=2, head="lm")
    return objectives.for_run(config, tokenizer, **fields)


def test_whole_word_masking_selects_whole_words():
    """data.whole_word_mask: on BERT rows of Shakespeare, every piece of a word (the words of
    `tokenizers`' own Encoding.word_ids) shares its word's decision, special tokens and padding
    never; about 15% of the words are selected and 80% of their tokens become [MASK]."""
    tokenizer = shakespeare_tokenizer()
    objective = mlm_objective(tokenizer, whole_word_mask=True)
    vocab = tokenizer.backend.get_vocab()
    assert objective.whole_word and sorted(objective.continuation_ids) == sorted(
        i for t, i in vocab.items() if t.startswith("##"))
    from lmjax import data as data_lib
    lines = [l for l in data_lib.shakespeare_works()["hamlet"].splitlines() if l.strip()]
    B, L = 48, 64
    tokens, words = np.zeros((B, L), np.int32), np.full((B, L), -1)
    for r in range(B):  # 6 lines a row: [CLS] ... [SEP] cut to L, padded
        encoding = tokenizer.backend.encode(" ".join(lines[6 * r:6 * r + 6]))
        ids, word_ids = encoding.ids[:L - 1] + [3], encoding.word_ids[:L - 1] + [None]
        tokens[r, :len(ids)] = ids
        words[r, :len(ids)] = [-1 if w is None else w for w in word_ids]
    segments = (np.arange(L)[None] < (tokens > 0).sum(1)[:, None]).astype(np.int32)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(7), r))(jnp.arange(B))
    inputs, selected = jax.jit(objective.mask, static_argnums=3)(
        jnp.asarray(tokens), jnp.asarray(segments), keys, tokenizer.vocab_size)
    inputs, selected = np.asarray(inputs), np.asarray(selected)
    assert not selected[words < 0].any()  # [CLS], [SEP], padding
    num_words = num_selected = multi_piece = 0
    for r in range(B):
        for w in set(words[r][words[r] >= 0]):
            decisions = selected[r][words[r] == w]
            assert decisions.all() or not decisions.any(), (r, w, decisions)
            num_words, num_selected = num_words + 1, num_selected + bool(decisions[0])
            multi_piece += len(decisions) > 1
    assert multi_piece > 0.2 * num_words  # the test sees many words of several pieces
    assert abs(num_selected - 0.15 * num_words) < 5 * np.sqrt(num_words * 0.15 * 0.85)
    k = selected.sum()
    assert abs((inputs[selected] == 4).sum() - 0.8 * k) < 5 * np.sqrt(k * 0.8 * 0.2)
    # Token-level masking (the default) does split words.
    _, token_level = jax.jit(mlm_objective(tokenizer).mask, static_argnums=3)(
        jnp.asarray(tokens), jnp.asarray(segments), keys, tokenizer.vocab_size)
    token_level = np.asarray(token_level)
    assert any(0 < token_level[r][words[r] == w].sum() < (words[r] == w).sum()
               for r in range(B) for w in set(words[r][words[r] >= 0]))


def test_whole_word_masking_needs_wordpiece():
    """A BPE tokenizer has no '##' pieces: whole-word masking says so, before any compute."""
    import tokenizers
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
        vocab_size=80, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False))
    tokenizer = tokenizers_lib.HFTokenizer({"tokenizer.json": backend.to_str().encode()})
    assert mlm_objective(tokenizer).mask_id == 4  # token-level masking works with it
    with pytest.raises(ValueError, match="data.whole_word_mask=True needs a WordPiece tokenizer"):
        mlm_objective(tokenizer, whole_word_mask=True)


def test_mlm_rows_are_bert_rows(tmp_path):
    """Masked LM sees BERT's rows: each document piece of a token-store row as [CLS] piece
    [SEP] (transformers' BertTokenizerFast's ids for a whole document), positions restarting
    at each [CLS]; a stream row is [CLS] W tokens [SEP]."""
    from lmjax import data as data_lib
    tokenizer = shakespeare_tokenizer()
    tokenizer.save(str(tmp_path))
    reference = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))
    lines = [l.strip() for l in data_lib.shakespeare_works()["macbeth"].splitlines()
             if l.strip()][:60]
    docs = [" ".join(lines[i:i + 1 + i % 3]) for i in range(0, 60, 3)]  # 1 to 3 lines each
    encoded = [tokenizer.encode(d) for d in docs]  # as the token store holds them: no specials
    starts = np.cumsum([0] + [len(e) for e in encoded])[:-1]
    split = data_lib.ArraySplit(np.concatenate(encoded), starts)
    objective = mlm_objective(tokenizer)
    W = 30
    for packing in (True, False):
        batches = data_lib.Batches(split, batch_size=split.num_tokens // W + 1, seq_len=W,
                                   shuffle=False, packing=packing)
        batch = next(batches.eval_batches())
        rows, segments = jax.jit(objective.rows)({k: jnp.asarray(v) for k, v in batch.items()})
        rows, segments = np.asarray(rows), np.asarray(segments)
        assert rows.shape == (batches.batch_size, W + 2)
        positions = np.asarray(attention_lib.positions_from_segments(jnp.asarray(segments)))
        whole = 0
        for r in range(rows.shape[0]):
            if not packing:  # the row's n store tokens, between [CLS] and [SEP]
                n = int((batch["mask"][r] > 0).sum())
                if n:
                    expected = [2] + batch["inputs"][r, :n].tolist() + [3]
                    assert rows[r, :n + 2].tolist() == expected and not segments[r, n + 2:].any()
                continue
            for s in set(segments[r][segments[r] > 0]):
                piece = rows[r][segments[r] == s].tolist()
                assert piece[0] == 2 and piece[-1] == 3
                assert 2 not in piece[1:] and 3 not in piece[:-1]
                assert positions[r][segments[r] == s].tolist() == list(range(len(piece)))
                if piece[1:-1] in encoded:  # a whole document: BERT's ids for it
                    assert piece == reference(docs[encoded.index(piece[1:-1])])["input_ids"]
                    whole += 1
        assert whole >= 3 or not packing


def mlm_config(tmp_path, text, **train_fields):
    from lmjax.config import default_config
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    config = default_config()
    config.data.source, config.data.train_files = "files", str(corpus)
    config.data.seq_len, config.data.batch_size = 32, 8
    config.tokenizer.kind, config.tokenizer.vocab_size = "wordpiece", 60
    config.model.update(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=32,
                        architecture="encoder", norm_position="post", type_vocab_size=2,
                        mlp="gelu_exact", norm_eps=1e-12, dropout=0.1, init_std=0.1, bias=True)
    config.optim.update(warmup_steps=5, learning_rate=3e-3, decay_steps=24)
    config.train.update(num_steps=40, log_every=10, eval_every=20, eval_batches=4,
                        checkpoint_every=20, num_samples=0, progress_bar=False)
    config.train.update(train_fields)
    return config


def test_mlm_pretraining_learns_and_resumes_bit_exactly(tmp_path, pigs_text):
    """Masked-LM pretraining (whole-word masking) through train_and_evaluate lowers the MLM
    loss and reports masked accuracy; a run stopped at step 12 and resumed gives the
    uninterrupted run's losses and parameters bit for bit (masks and dropout are functions of
    (seed, step, row))."""
    from lmjax import train
    config = mlm_config(tmp_path, pigs_text, num_steps=24, eval_every=12, checkpoint_every=12)
    config.data.whole_word_mask = True
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    losses = full["train_loss"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:3]) - 0.4
    assert [e["step"] for e in full["eval"]] == [12, 24]
    assert full["eval"][-1]["loss"] < full["eval"][0]["loss"]
    assert 0.05 < full["eval"][-1]["mlm_accuracy"] < 1.0
    assert full["tokenizer"].kind == "wordpiece"

    half_config = mlm_config(tmp_path, pigs_text, num_steps=12, eval_every=12)
    half_config.data.whole_word_mask = True
    half = train.train_and_evaluate(half_config, str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    np.testing.assert_array_equal(half["train_loss"], losses[:12])
    np.testing.assert_array_equal(resumed["train_loss"], losses)
    for a, b in zip(jax.tree.leaves(resumed["state"].params), jax.tree.leaves(full["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # ~1 minute on 2 quiet cores (8 simulated devices); 4 on a loaded machine
def test_encoder_trains_alike_on_8_devices_and_one(tmp_path, pigs_text):
    """Masked-LM training on data x8 and on data x2 / fsdp x2 / tensor x2 meshes of 8 simulated
    devices gives one device's losses (a fresh process: tests/sharding_worker.py)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pigs_text)
    job = {"kind": "train", "encoder": True, "corpus": str(corpus), "num_steps": 4}
    import sharding_worker  # tests/ is on sys.path: this process has one CPU device
    assert jax.device_count() == 1
    single = sharding_worker.train(dict(job, workdir=str(tmp_path / "one")))["runs"][0]
    meshes = [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]
    multi = run_worker(dict(job, workdir=str(tmp_path / "eight"), meshes=meshes), devices=8)
    assert single["losses"][-1] < single["losses"][0]
    for run in multi["runs"]:
        np.testing.assert_allclose(run["losses"], single["losses"], rtol=1e-5, atol=0)
    split = multi["runs"][1]["shards"]["['blocks_0']['attn']['query']['kernel']"]
    assert split[2] != split[1]  # [spec, shape, shard shape]: the heads are split


WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")


def run_worker(job: dict, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, WORKER, json.dumps(job)], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------- classification


def test_confusion_metrics_match_sklearn():
    from sklearn import metrics as sk
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 3, 200)  # class 3 never predicted
    confusion = sk.confusion_matrix(truth, predicted, labels=range(4))
    out = objectives.confusion_metrics(confusion)
    assert out["confusion"] == confusion.tolist()
    assert out["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert out["macro_f1"] == pytest.approx(sk.f1_score(truth, predicted, average="macro",
                                                        labels=range(4), zero_division=0))


def test_class_weighted_loss_matches_sklearn_weights_and_numpy(tmp_path):
    """data.class_weights: scikit-learn's 'balanced' weights (compute_class_weight) give the
    weighted mean cross-entropy that NumPy computes from transformers' logits (and torch's
    CrossEntropyLoss(weight=...)); a filler row (weight 0) counts for nothing."""
    import ml_collections
    from sklearn.utils.class_weight import compute_class_weight
    from lmjax import run_config
    model = make_bert("classifier")
    model.save_pretrained(str(tmp_path))
    config, params, _, _ = hf_bert.load_hf_bert(str(tmp_path))
    labels = np.array([0, 0, 2])  # skewed: class 0 twice, class 1 absent from the batch
    all_labels = np.array([0, 0, 0, 0, 1, 2, 2, 0, 1, 0])  # the "training set" the weights fit
    weights = compute_class_weight("balanced", classes=np.arange(3), y=all_labels)
    field = ",".join(str(w) for w in weights)
    objective = objectives.for_run(config, None, run_config.class_weights(
        ml_collections.ConfigDict({"class_weights": field})))
    batch = {"inputs": np.vstack([TOKENS, TOKENS[2:]]),
             "token_types": np.vstack([TYPES, TYPES[2:]]),
             "mask": np.vstack([MASK, MASK[2:]]).astype(np.float32),
             "weight": np.array([[1.0], [1.0], [1.0], [0.0]], np.float32),
             "labels": np.array([[0.0], [0.0], [2.0], [1.0]], np.float32)}  # the last: filler
    loss, metrics = jax.jit(objective.loss, static_argnums=2)(
        params, {k: jnp.asarray(v) for k, v in batch.items()}, config, jax.random.key(0))
    logits = torch_out(model, "classifier").astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    w = weights[labels]
    expected = float(-(w * log_probs[np.arange(3), labels]).sum() / w.sum())
    torch_loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(
        torch.tensor(logits), torch.tensor(labels)).item()
    assert expected == pytest.approx(torch_loss, rel=1e-9)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    unweighted = float(-log_probs[np.arange(3), labels].mean())
    assert abs(expected - unweighted) > 0.02  # the weights matter here
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(-1) == labels))
    with pytest.raises(ValueError, match="data.class_weights has 2 weights for model.num_labels=3"):
        objectives.for_run(config, None, (1.0, 2.0))
    with pytest.raises(ValueError, match="data.class_weights='1,x' must be '' or comma-sep"):
        run_config.class_weights(ml_collections.ConfigDict({"class_weights": "1,x"}))


ANIMALS = {"pigs": "little pigs went to market", "cows": "big cows stayed at home",
           "hens": "old hens sat on the fence"}


def write_labelled(folder, name, n, offset=0):
    """A .tsv of `n` rows: the text names an animal (the label) among filler words."""
    rows = ["sentence\tlabel"]
    for i in range(offset, offset + n):
        label = list(ANIMALS)[i % 3]
        rows.append(f"{i} {ANIMALS[label]} on day {i * 7 % 13}\t{label}")
    path = folder / name
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def classify_config(tmp_path, **model_fields):
    config = mlm_config(tmp_path, "", num_steps=40, eval_every=40, checkpoint_every=0)
    config.data.train_files = write_labelled(tmp_path, "train.tsv", 120)
    config.data.val_files = write_labelled(tmp_path, "val.tsv", 30, offset=500)
    config.data.text_fields, config.data.batch_size, config.data.seq_len = "sentence", 8, 32
    config.model.update(**{"head": "classifier", "num_labels": 3, "dropout": 0.0, **model_fields})
    config.optim.update(learning_rate=3e-3, decay_steps=0)
    return config


def test_fine_tuning_from_masked_lm_then_predict(tmp_path, pigs_text):
    """A masked-LM workdir fine-tuned as a classifier (init_from) through train_and_evaluate:
    accuracy, macro-F1 and the confusion matrix at eval, label names saved, `predict` labels
    texts; exported as BertForSequenceClassification, transformers gives the same
    probabilities."""
    from lmjax import classify, labelled, train
    mlm = mlm_config(tmp_path, pigs_text + "".join(v + ".\n" for v in ANIMALS.values()) * 3,
                     num_steps=10, eval_every=0, checkpoint_every=0)
    train.train_and_evaluate(mlm, str(tmp_path / "mlm"))
    config = classify_config(tmp_path)
    config.init_from = str(tmp_path / "mlm")
    result = train.train_and_evaluate(config, str(tmp_path / "cls"))
    final = result["eval"][-1]
    assert final["accuracy"] > 0.8  # chance is 1/3: the animal gives it away
    names = labelled.load_label_names(str(tmp_path / "cls"))
    assert names == ["cows", "hens", "pigs"]

    # predict() on the validation texts: scikit-learn's metrics of its labels are the run's.
    from sklearn import metrics as sk
    classifier = classify.load_classifier(workdir=str(tmp_path / "cls"))
    val = labelled.read_examples(config.data.val_files, ["sentence"], "label")
    texts, truth = [t[0] for t, _ in val], [y for _, y in val]
    predictions = classify.predict(classifier, texts, batch_size=8)
    predicted = [p["label"] for p in predictions]
    assert final["confusion"] == sk.confusion_matrix(truth, predicted, labels=names).tolist()
    assert final["macro_f1"] == pytest.approx(sk.f1_score(truth, predicted, average="macro"))
    assert final["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    # lmjax.eval_metrics' classification task on the workdir reports the run's own metrics.
    from lmjax import eval_metrics
    scored = eval_metrics.classification(classifier, val, batch_size=8)
    assert scored["confusion"] == final["confusion"] and scored["predictions"] == predicted
    assert (scored["accuracy"], scored["macro_f1"]) == pytest.approx(
        (final["accuracy"], final["macro_f1"]))
    texts, predictions = texts[:4], predictions[:4]
    hf_bert.save_hf_bert(str(tmp_path / "hf"), classifier.config, classifier.params,
                         classifier.tokenizer, classifier.label_names)
    model = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        probs = torch.softmax(model(**hf_tokenizer(texts, padding=True, truncation=True,
                                                   max_length=32, return_tensors="pt"))
                              .logits, -1).numpy()
    assert model.config.id2label == {0: "cows", 1: "hens", 2: "pigs"}
    np.testing.assert_allclose([list(p["probabilities"].values()) for p in predictions], probs,
                               atol=1e-5)
    again = classify.predict(classify.load_classifier(hf_folder=str(tmp_path / "hf")), texts)
    assert [p["label"] for p in again] == [p["label"] for p in predictions]


def test_fine_tuning_from_an_hf_bert_folder(tmp_path):
    """init_from='hf:FOLDER' of a BertForMaskedLM with its tokenizer: the encoder's weights are
    the folder's, the classifier head is fresh, and training runs on the folder's tokenizer."""
    from lmjax import train
    tokenizer = tokenizers_lib.WordPieceTokenizer.train(
        [v for v in ANIMALS.values()] * 5 + [f"{i} on day" for i in range(600)], 60)
    tokenizer.save(str(tmp_path / "bert"))
    model = make_bert("lm", vocab_size=tokenizer.vocab_size, max_position_embeddings=32)
    model.save_pretrained(str(tmp_path / "bert"))
    config = classify_config(tmp_path)
    config.init_from = "hf:" + str(tmp_path / "bert")
    config.optim.learning_rate = 0.0  # the params stay the imported ones
    config.optim.min_learning_rate = 0.0
    config.optim.warmup_steps = 1
    config.train.update(num_steps=2, eval_every=2, eval_batches=1)
    result = train.train_and_evaluate(config, str(tmp_path / "cls"))
    params = result["state"].params
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"]),
        model.bert.embeddings.word_embeddings.weight.detach().numpy())
    assert set(params) >= {"pooler", "classifier"} and "mlm_bias" not in params
    assert result["tokenizer"].vocab_size == tokenizer.vocab_size


def test_labelled_data_errors(tmp_path):
    from lmjax import train
    config = classify_config(tmp_path)
    config.data.label_field = "class"
    with pytest.raises(ValueError, match="row 1 has no field 'class'"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    config = classify_config(tmp_path, num_labels=2)
    with pytest.raises(ValueError, match="model.num_labels=2, but the training data has 3"):
        train.train_and_evaluate(config, str(tmp_path / "b"))


def test_tfds_labelled_data_by_name(tmp_path):
    """data.source='tfds' reads a TFDS dataset by name with the real loading code (a dataset
    this test builds locally, shaped like glue/sst2): texts, ClassLabel names, both splits."""
    tfds = pytest.importorskip("tensorflow_datasets", exc_type=ModuleNotFoundError,
                               reason='pip install -e ".[tfds]"')
    from lmjax import labelled
    rows = {"train": [("a gripping film", 1), ("dull and slow", 0), ("lovely", 1)],
            "validation": [("not good", 0)]}

    class LmjaxTinySst(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "sentence": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(r) for split, r in rows.items()}

        def _generate_examples(self, split_rows):
            for i, (text, label) in enumerate(split_rows):
                yield i, {"sentence": text, "label": label}

    data_dir = str(tmp_path / "tfds")
    LmjaxTinySst(data_dir=data_dir, file_format="array_record").download_and_prepare()
    config = classify_config(tmp_path, num_labels=2)
    config.data.update(source="tfds", tfds_name="lmjax_tiny_sst", tfds_data_dir=data_dir,
                       text_fields="sentence")
    config.tokenizer.vocab_size = 40
    data = labelled.build_data(config, str(tmp_path))
    assert data.label_names == ["negative", "positive"]
    examples, _ = labelled.tfds_examples(config.data, "train")
    assert sorted(examples) == sorted(((t,), ["negative", "positive"][y])
                                      for t, y in rows["train"])
    assert data.val.labels.tolist() == [0.0] and len(data.train.ids) == 3
