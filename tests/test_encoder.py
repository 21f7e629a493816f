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
    model = CLASSES[head](config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if "LayerNorm.weight" in name else 0.15 * noise)
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
        out = model_lib.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
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
    """Masked-LM pretraining through train_and_evaluate lowers the MLM loss and reports masked
    accuracy; a run stopped at step 12 and resumed gives the uninterrupted run's losses and
    parameters bit for bit (masks and dropout are functions of (seed, step, row))."""
    from lmjax import train
    config = mlm_config(tmp_path, pigs_text, num_steps=24, eval_every=12, checkpoint_every=12)
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    losses = full["train_loss"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:3]) - 0.4
    assert [e["step"] for e in full["eval"]] == [12, 24]
    assert full["eval"][-1]["loss"] < full["eval"][0]["loss"]
    assert 0.05 < full["eval"][-1]["mlm_accuracy"] < 1.0
    assert full["tokenizer"].kind == "wordpiece"

    half = train.train_and_evaluate(mlm_config(tmp_path, pigs_text, num_steps=12, eval_every=12),
                                    str(tmp_path / "resumed"))
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
    # lmjax.evaluate's classification task on the workdir reports the run's own metrics.
    from lmjax import evaluate
    scored = evaluate.classification(classifier, val, batch_size=8)
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
