"""lmjax/evaluate.py against PyTorch (transformers' GPT-2 on the same weights), sacrebleu and
rouge-score, and the `lmjax eval` command."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_random_gpt2
from lmjax import eval_metrics, evaluate, hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 64


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, pigs_text):
    """(folder, torch model, lmjax params, config, tokenizer) of one random GPT-2."""
    folder = str(tmp_path_factory.mktemp("gpt2"))
    torch_model = write_random_gpt2(folder, pigs_text, vocab_size=300, n_positions=MAX_LEN)
    model_config, params, tokenizer = hf.load_hf(folder)
    return folder, torch_model, params, model_config, tokenizer


def torch_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, by the PyTorch model on one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def hf_recipe_nll(model, ids, max_len, stride):
    """Hugging Face's "Perplexity of fixed-length models" loop, as its documentation writes it
    (with the token count fixed): (summed NLL, tokens scored)."""
    input_ids, nll_sum, n_tokens, prev_end = torch.tensor([ids]), 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        target = window.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target).loss.double()
        # The labels are shifted inside: the loss averages the valid labels of target[:, 1:].
        # (HF's page counts valid - 1 for every window, one too few after the first.)
        num_loss_tokens = (target[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == len(ids):
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("stride", [16, 40])
def test_sliding_window_perplexity_matches_hf_recipe_in_torch(gpt2, pigs_text, stride):
    _, torch_model, params, model_config, tokenizer = gpt2
    texts = [pigs_text[:900], pigs_text[2000:2400]]
    docs = [tokenizer.encode(t) for t in texts]
    assert len(docs[0]) > 3 * MAX_LEN  # several windows
    result = evaluate.perplexity(params, model_config, docs, texts, MAX_LEN, stride,
                                 batch_size=4)
    nlls, counts = zip(*[hf_recipe_nll(torch_model, d, MAX_LEN, stride) for d in docs])
    assert result["tokens"] == sum(counts) == sum(len(d) - 1 for d in docs)  # each token once
    np.testing.assert_allclose(-result["loglikelihood"], sum(nlls), rtol=1e-5)
    np.testing.assert_allclose(result["token_perplexity"], math.exp(sum(nlls) / sum(counts)),
                               rtol=1e-5)
    # lm-evaluation-harness's word and byte normalisations.
    words = sum(len(t.split()) for t in texts)  # no leading/trailing whitespace in these texts
    num_bytes = sum(len(t.encode()) for t in texts)
    assert (result["words"], result["bytes"]) == (words, num_bytes)
    np.testing.assert_allclose(result["bits_per_byte"], sum(nlls) / num_bytes / math.log(2),
                               rtol=1e-5)
    np.testing.assert_allclose(result["word_perplexity"], math.exp(sum(nlls) / words),
                               rtol=1e-5)


def test_stride_equal_to_max_len_is_disjoint_windows(gpt2, pigs_text):
    _, torch_model, params, model_config, tokenizer = gpt2
    ids = tokenizer.encode(pigs_text[:1000])
    result = evaluate.perplexity(params, model_config, [ids], max_len=MAX_LEN, stride=MAX_LEN,
                                 prefix_id=0)
    ids = [0] + ids
    chunks = [ids[i:i + MAX_LEN] for i in range(0, len(ids), MAX_LEN)]
    expected = sum(torch_logprobs(torch_model, c).sum().item() for c in chunks if len(c) > 1)
    assert result["tokens"] == sum(len(c) - 1 for c in chunks)
    np.testing.assert_allclose(result["loglikelihood"], expected, rtol=1e-5)
    # A prefix token means every token of the document is scored (with a stride < max_len).
    assert evaluate.perplexity(params, model_config, [ids[1:]], max_len=MAX_LEN, stride=32,
                               prefix_id=0)["tokens"] == len(ids) - 1


def data_config(tmp_path, texts):
    """A `files` data config: train = val = `texts`, one file each (val files named *-val)."""
    import ml_collections
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}-val.txt").write_text(text)
    pattern = str(tmp_path / "doc*-val.txt")
    return ml_collections.ConfigDict(dict(source="files", train_files=pattern,
                                          val_files=pattern, shard_mb=64))


def data_config_run(tmp_path, texts):
    """A run config whose data is `data_config(tmp_path, texts)` (what export_params saves)."""
    import ml_collections
    return ml_collections.ConfigDict({"data": data_config(tmp_path, texts)})


@pytest.fixture(scope="module")
def store_texts(pigs_text):
    return [pigs_text[:900], pigs_text[2000:2400]]


@pytest.fixture(scope="module")
def gpt2_store(gpt2, store_texts, tmp_path_factory):
    """A token store of `store_texts` (its val split) prepared with the GPT-2 folder's tokenizer."""
    import ml_collections
    from lmjax import sources, token_store
    tmp_path = tmp_path_factory.mktemp("store")
    tokenizer_config = ml_collections.ConfigDict(dict(kind="hf", path=gpt2[0]))
    return token_store.prepare(sources.source_spec(data_config(tmp_path, store_texts)),
                               tokenizer_config, str(tmp_path / "store"), tokenizer=gpt2[4],
                               num_workers=1, progress=False)


def test_store_perplexity_equals_the_text_path_and_torch(gpt2, gpt2_store, store_texts):
    _, torch_model, params, model_config, tokenizer = gpt2
    result = evaluate.store_perplexity(params, model_config, tokenizer, gpt2_store, "val",
                                       MAX_LEN, 24, batch_size=4)
    from_text = evaluate.text_perplexity(params, model_config, tokenizer, store_texts, MAX_LEN,
                                         24, batch_size=4)
    # transformers on each document with its bos prefix (what the text path scores).
    nlls, counts = zip(*[hf_recipe_nll(torch_model, [0] + tokenizer.encode(t), MAX_LEN, 24)
                         for t in store_texts])
    assert result["tokens"] == from_text["tokens"] == sum(counts) and result["documents"] == 2
    np.testing.assert_allclose(-result["loglikelihood"], sum(nlls), rtol=1e-5)
    for key in ("loglikelihood", "token_perplexity", "bytes", "bits_per_byte",
                "byte_perplexity"):
        np.testing.assert_allclose(result[key], from_text[key], rtol=1e-9, err_msg=key)
    # The store keeps no words: word perplexity is absent, and says why.
    assert "word_perplexity" not in result and "words" in result["absent"]["word_perplexity"]
    # Part of the split: the manifest's byte count is the whole split's, so no bits per byte.
    first = evaluate.store_perplexity(params, model_config, tokenizer, gpt2_store, "val",
                                      MAX_LEN, 24, batch_size=4, limit=1)
    assert first["documents"] == 1 and "bits_per_byte" not in first
    assert first["tokens"] == counts[0] and "bits_per_byte" in first["absent"]
    with pytest.raises(ValueError, match=r"split='test' is not in the token store"):
        evaluate.store_perplexity(params, model_config, tokenizer, gpt2_store, "test")


def test_choices_from_a_shared_cache_equal_full_sequences_and_torch(gpt2):
    _, torch_model, params, model_config, _ = gpt2
    rng = np.random.default_rng(0)
    groups = []
    for context_len in (1, 5, 17, 40):
        context = rng.integers(1, 300, context_len).tolist()
        groups.append((context, [rng.integers(1, 300, n).tolist() for n in (1, 3, 9, 2)]))
    # One continuation that the model produces greedily (argmax by PyTorch, token by token).
    greedy = list(groups[2][0])
    for _ in range(3):
        with torch.no_grad():
            greedy.append(int(torch_model(torch.tensor([greedy])).logits[0, -1].argmax()))
    groups[2][1][3] = greedy[-3:]
    cached = evaluate.score_choices(params, model_config, groups, batch_size=4)
    full = evaluate.score_sequences(params, model_config,
                                    [(c, x) for c, conts in groups for x in conts], batch_size=16)
    for (context, conts), scores in zip(groups, cached):
        for cont, (ll, _) in zip(conts, scores):
            logprobs = torch_logprobs(torch_model, context + cont)[-len(cont):]
            np.testing.assert_allclose(ll, logprobs.sum().item(), rtol=1e-5)
    np.testing.assert_allclose([s[0] for g in cached for s in g], [s[0] for s in full],
                               rtol=1e-5)
    assert [s[1] for g in cached for s in g] == [s[1] for s in full]
    assert cached[2][3][1] and not cached[2][2][1]  # greedy: the argmax at every position


def test_encode_pair_boundaries_as_lm_eval(gpt2):
    tokenizer = gpt2[4]
    enc = tokenizer.encode
    # A trailing space moves into the continuation: " went" is one BPE token of the corpus.
    context, cont = evaluate.encode_pair(enc, "3 little pigs ", "went")
    assert context == enc("3 little pigs") and cont == enc("3 little pigs went")[len(context):]
    assert cont == enc(" went")
    # Several trailing spaces (and a newline) move too.
    context, cont = evaluate.encode_pair(enc, "pigs \n ", "went")
    assert context == enc("pigs") and tokenizer.decode(cont) == " \n went"
    # An empty context becomes the prefix token, unless the continuation starts with it.
    assert evaluate.encode_pair(enc, "", " went", prefix_id=0) == ([0], enc(" went"))
    assert evaluate.encode_pair(lambda s: [0] + enc(s), "", " went", prefix_id=0) == \
        ([0], enc(" went"))
    with pytest.raises(ValueError, match="prefix token"):
        evaluate.encode_pair(enc, "", " went", prefix_id=None)
    # A continuation never comes out empty.
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate.encode_pair(enc, "3 little", "")
    # (A context's trailing space alone is a continuation.)
    assert tokenizer.decode(evaluate.encode_pair(enc, "3 little ", "")[1]) == " "
    with pytest.raises(ValueError, match="merges the continuation into the context"):
        evaluate.encode_pair(lambda s: [1] if s.startswith("ab") else [2, 3], "ab", "c")


def test_multiple_choice_accuracy_against_torch(gpt2, pigs_text):
    _, torch_model, params, model_config, tokenizer = gpt2
    lines = pigs_text.splitlines()
    docs = [{"context": lines[i], "choices": [lines[i + 1], lines[i + 7], "pigs", "market"],
             "label": i % 4} for i in range(0, 40, 5)]
    result = evaluate.multiple_choice(params, model_config, tokenizer,
                                      [dict(d) for d in docs], target_delimiter="\n")
    correct = correct_norm = 0
    for doc in docs:
        lls = []
        for choice in doc["choices"]:
            context, cont = evaluate.encode_pair(tokenizer.encode, doc["context"], "\n" + choice)
            lls.append(torch_logprobs(torch_model, context + cont)[-len(cont):].sum().item())
        correct += int(np.argmax(lls)) == doc["label"]
        correct_norm += int(np.argmax(np.array(lls) / [len(c) for c in doc["choices"]])) == \
            doc["label"]
    assert result["acc"] == correct / len(docs)
    assert result["acc_norm"] == correct_norm / len(docs)
    with pytest.raises(ValueError, match="'label'=4 must be an index into its 4 choices"):
        evaluate.multiple_choice(params, model_config, tokenizer, [{**docs[0], "label": 4}])


def test_generation_metrics_are_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer
    predictions = ["the cat sat on the mat", "a dog ran in the park today"]
    references = ["the cat sat on the mat", ["the dog ran in a park", "a dog runs in the park"]]
    result = eval_metrics.generation_metrics(predictions, references)
    streams = [["the cat sat on the mat", "the dog ran in a park"],
               [None, "a dog runs in the park"]]
    assert result["bleu"] == sacrebleu.corpus_bleu(predictions, streams).score
    assert result["chrf"] == sacrebleu.corpus_chrf(predictions, streams).score
    assert result["bleu_signature"].startswith("nrefs:var|case:mixed|eff:no|tok:13a")
    # ROUGE-1 by hand (lower-cased words, Porter-stemmed: "runs" -> "run", "ran" stays): the
    # first pair is identical (F = 1); the second prediction's 7 words share 6 with the first
    # reference's 6 (P = 6/7, R = 1, F = 12/13) and 5 with the second's: the best is 12/13.
    np.testing.assert_allclose(result["rouge1"], 100 * (1 + 12 / 13) / 2, rtol=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    lsum = [scorer.score_multi(r if isinstance(r, list) else [r], p)["rougeLsum"].fmeasure
            for p, r in zip(predictions, references)]
    np.testing.assert_allclose(result["rougeLsum"], 100 * np.mean(lsum), rtol=1e-9)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        eval_metrics.generation_metrics(predictions, references[:1])


def run_eval(args):
    done = subprocess.run([sys.executable, "-m", "lmjax", "eval"] + args, cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return done


def read_scalars(directory):
    """{tag: [(step, value)]} of the scalars in the TensorBoard event files of `directory`, read
    as TFRecords (length, masked crc32c, data, masked crc32c) of tensorboardX's Event protos."""
    import struct
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    scalars = {}
    for name in sorted(os.listdir(directory)):
        assert name.startswith("events.out.tfevents")
        with open(os.path.join(directory, name), "rb") as f:
            while header := f.read(8):
                (length,), (header_crc,) = struct.unpack("Q", header), \
                    struct.unpack("I", f.read(4))
                payload, (payload_crc,) = f.read(length), struct.unpack("I", f.read(4))
                assert (header_crc, payload_crc) == (masked_crc32c(header),
                                                     masked_crc32c(payload))
                event = event_pb2.Event.FromString(payload)
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_eval_command_json_markdown_and_tensorboard(gpt2, pigs_text, tmp_path):
    folder, torch_model, params, model_config, tokenizer = gpt2
    text_file = tmp_path / "val.txt"
    text_file.write_text(pigs_text[:600])
    out = tmp_path / "ppl.json"
    done = run_eval([f"--hf_model={folder}", "--task=perplexity", f"--data={text_file}",
                     "--stride=32", f"--output={out}", f"--tensorboard_dir={tmp_path / 'tb'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lmjax_version"] and result["model"]["hf_model"] == folder
    assert result["settings"]["stride"] == 32 and str(text_file) in result["data"]["sha256"]
    expected = evaluate.text_perplexity(params, model_config, tokenizer, [pigs_text[:600]],
                                        stride=32)
    np.testing.assert_allclose(result["results"]["bits_per_byte"], expected["bits_per_byte"],
                               rtol=1e-6)
    assert "| bits_per_byte |" in done.stdout
    # TensorBoard: one float32 scalar eval/perplexity/METRIC at step 0 per float result.
    floats = {k: v for k, v in result["results"].items() if isinstance(v, float)}
    assert {"token_perplexity", "bits_per_byte", "word_perplexity"} <= set(floats)
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == {f"eval/perplexity/{k}" for k in floats}
    for key, value in floats.items():
        (step, logged), = scalars[f"eval/perplexity/{key}"]
        assert step == 0 and logged == pytest.approx(value, rel=1e-6)

    predictions = tmp_path / "pred.jsonl"
    predictions.write_text(json.dumps({"prediction": "the cat sat on the mat",
                                       "reference": "the cat sat on the mat"}) + "\n")
    done = run_eval(["--task=generate", f"--data={predictions}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| bleu | 100 |" in done.stdout

    done = run_eval([f"--hf_model={folder}", "--task=generate", f"--data={predictions}",
                     "--top_p=2"])
    assert done.returncode != 0 and "sampling.top_p=2.0 must be in (0, 1]" in done.stderr


def test_eval_command_on_a_token_store_and_a_params_export(gpt2, gpt2_store, store_texts,
                                                           tmp_path):
    """--data=store:PATH[:SPLIT] through the command; --data=val on an `export_params` folder,
    which has no `meta`: its saved config's validation files, or a clear error naming what to
    pass when it was exported without a config."""
    from absl import app
    from lmjax import checkpoint
    from lmjax.commands import evaluate as command
    folder, _, params, model_config, tokenizer = gpt2
    with_config = checkpoint.export_params(str(tmp_path / "export"), params, model_config,
                                           tokenizer, data_config_run(tmp_path, store_texts))
    bare = checkpoint.export_params(str(tmp_path / "bare"), params, model_config, tokenizer)
    assert command.read_texts("val", with_config, None) == store_texts
    with pytest.raises(app.UsageError, match=r"has no saved run config .*--data=store:PATH"):
        command.read_texts("val", bare, None)

    out = tmp_path / "ppl.json"
    done = run_eval([f"--workdir={with_config}", "--task=perplexity",
                     f"--data=store:{gpt2_store.path}:val", "--stride=32", f"--output={out}"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    expected = evaluate.text_perplexity(params, model_config, tokenizer, store_texts, stride=32)
    for key in ("token_perplexity", "bits_per_byte"):
        np.testing.assert_allclose(result["results"][key], expected[key], rtol=1e-6, err_msg=key)
    assert "word_perplexity" in result["results"]["absent"]
    assert os.path.join(gpt2_store.path, "manifest.json") in result["data"]["sha256"]


def test_generate_texts_greedy_equals_torch_and_cuts_at_stop(gpt2):
    from lmjax import sample
    _, torch_model, params, model_config, tokenizer = gpt2
    prompts = ["3 little pigs", "12 little"]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = torch_model.generate(ids, max_new_tokens=10, do_sample=False,
                                       attention_mask=torch.ones_like(ids), eos_token_id=None,
                                       pad_token_id=0)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    stop = expected[0][4:6]
    texts = eval_metrics.generate_texts(params, model_config, tokenizer, prompts,
                                    sample.SamplingConfig(max_new_tokens=10, greedy=True),
                                    stop=[stop])
    assert texts == [e.split(stop)[0] for e in expected] and len(texts[0]) == 4


ANIMALS = ("cows", "hens", "pigs")


def write_bert_classifier(folder, texts):
    """A random BertForSequenceClassification (3 labels, weights drawn wide enough that its
    predictions vary) with a WordPiece tokenizer trained on `texts`; returns the torch model."""
    import transformers
    from lmjax import tokenizers as tokenizers_lib
    tokenizer = tokenizers_lib.WordPieceTokenizer.train(texts, 80)
    tokenizer.save(folder)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
        id2label=dict(enumerate(ANIMALS)), label2id={a: i for i, a in enumerate(ANIMALS)}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.3)
    model.eval().save_pretrained(folder)
    return model


def test_classification_against_sklearn_and_transformers(tmp_path, pigs_text):
    """`lmjax eval --task=classification` on an HF BERT folder and a TSV: accuracy, macro-F1
    and the confusion matrix are scikit-learn's of transformers' own argmax labels."""
    import transformers
    from sklearn import metrics as sk
    from lmjax import classify, labelled
    lines = pigs_text.splitlines()[:40]
    rows = [(f"{line} the {ANIMALS[i % 3]}", ANIMALS[(i * 7) % 3 if i % 4 else 1])
            for i, line in enumerate(lines)]
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    folder = str(tmp_path / "bert")
    model = write_bert_classifier(folder, [t for t, _ in rows])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**hf_tokenizer([t for t, _ in rows], padding=True, truncation=True,
                                      max_length=32, return_tensors="pt")).logits.numpy()
    top2 = np.sort(logits, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # no near-ties for float rounding to flip
    truth, predicted = [y for _, y in rows], [ANIMALS[i] for i in logits.argmax(-1)]
    assert len(set(predicted)) > 1 and len(set(truth)) == 3

    examples = labelled.read_examples(str(data), ["sentence"], "label")
    result = eval_metrics.classification(classify.load_classifier(hf_folder=folder), examples,
                                     batch_size=16)
    assert result["predictions"] == predicted and result["label_names"] == list(ANIMALS)
    assert result["confusion"] == sk.confusion_matrix(truth, predicted, labels=ANIMALS).tolist()
    assert result["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert result["macro_f1"] == pytest.approx(sk.f1_score(truth, predicted, average="macro"))

    out = tmp_path / "cls.json"
    done = run_eval([f"--hf_model={folder}", "--task=classification", f"--data={data}",
                     "--text_fields=sentence", f"--output={out}",
                     f"--tensorboard_dir={tmp_path / 'tb'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["results"]["confusion"] == result["confusion"]
    assert saved["results"]["macro_f1"] == pytest.approx(result["macro_f1"])
    assert saved["settings"]["text_fields"] == ["sentence"] and saved["model"]["hf_model"]
    assert "| macro_f1 |" in done.stdout and "| true label / predicted | cows | hens | pigs |" \
        in done.stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    with pytest.raises(ValueError, match=r"labels \['goats'\] are not among"):
        eval_metrics.classification(classify.load_classifier(hf_folder=folder),
                                [(("a goat",), "goats")])
