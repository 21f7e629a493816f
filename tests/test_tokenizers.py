"""Tokenizers round-trip text and agree with independent references."""

import os

import ml_collections
import pytest
import sentencepiece as spm

from lmjax import data, tokenizers

# Unicode (accents, CJK, emoji), tabs, runs of spaces, leading/trailing whitespace, blank lines.
TRICKY = "  Hello   world,\n\n\tété — 日本語 🙂!\nO Romeo,  Romeo!   \n\n  trailing  "

# nanoGPT's shakespeare_char vocabulary (data/shakespeare_char/prepare.py prints it).
NANOGPT_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def tokenizer_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(kind="sentencepiece", vocab_size=600, model_type="bpe", path=""))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def training_text() -> str:
    """About 30 KB of Shakespeare plus a little unicode, enough for a 600-piece vocabulary."""
    return data.shakespeare_works()["tempest"][:30_000] + "\nCafé déjà vu, naïve façade.\n"


def test_byte_ids_are_utf8_bytes():
    tokenizer = tokenizers.ByteTokenizer()
    ids = tokenizer.encode(TRICKY)
    assert ids == list(TRICKY.encode("utf-8"))
    assert tokenizer.decode(ids) == TRICKY
    assert tokenizer.vocab_size == 259
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (256, 257, 258)
    # Specials are dropped, broken UTF-8 becomes U+FFFD instead of raising.
    assert tokenizer.decode([257] + ids + [258, 256, 256]) == TRICKY
    assert tokenizer.decode([0xE6, 0x97]) == "\ufffd"


def test_char_round_trip_and_ids():
    tokenizer = tokenizers.CharTokenizer.train(["ba\n", TRICKY])
    assert tokenizer.chars == "".join(sorted(set("ba\n" + TRICKY)))
    ids = tokenizer.encode(TRICKY)
    assert ids == [tokenizer.chars.index(c) for c in TRICKY]
    assert tokenizer.decode(ids) == TRICKY
    assert tokenizer.encode("") == []
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (None, None, None)


def test_char_unknown_character_is_named():
    tokenizer = tokenizers.CharTokenizer.train(["abc"])
    with pytest.raises(ValueError, match="'é'"):
        tokenizer.encode("abé")
    with pytest.raises(ValueError, match="'🙂'"):  # Beyond the lookup table.
        tokenizer.encode("a🙂")


def test_char_vocab_of_tiny_shakespeare_is_nanogpts(tiny_shakespeare):
    train = tiny_shakespeare[:int(len(tiny_shakespeare) * 0.9)]
    tokenizer = tokenizers.build_tokenizer(tokenizer_config(kind="char"), train)
    assert tokenizer.vocab_size == 65
    assert tokenizer.chars == NANOGPT_CHARS
    stoi = {c: i for i, c in enumerate(NANOGPT_CHARS)}
    assert tokenizer.encode(train[:5000]) == [stoi[c] for c in train[:5000]]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_matches_reference_and_round_trips(model_type, training_text, tmp_path):
    config = tokenizer_config(model_type=model_type)
    tokenizer = tokenizers.build_tokenizer(config, [training_text], workdir=str(tmp_path))
    assert tokenizer.vocab_size == 600
    assert len({tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}) == 3

    # The independent reference: SentencePiece's own processor on the saved model.
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert reference.get_piece_size() == 600
    for text in [TRICKY, training_text[:3000]]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text)
        assert tokenizer.decode(ids) == text
    # Subwords, not characters: the training text compresses well.
    assert len(tokenizer.encode(training_text[:3000])) < 0.6 * 3000
    # Specials are dropped when decoding.
    ids = tokenizer.encode(TRICKY)
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id]) == TRICKY

    # Save / load gives the same tokenizer.
    loaded = tokenizers.load_tokenizer(str(tmp_path))
    assert loaded.kind == "sentencepiece" and loaded.vocab_size == 600
    assert loaded.encode(TRICKY) == ids


def test_sentencepiece_from_model_file_and_directory(training_text, tmp_path):
    trained = tokenizers.build_tokenizer(tokenizer_config(), training_text)
    trained.save(str(tmp_path / "saved"))
    reference = spm.SentencePieceProcessor(
        model_file=str(tmp_path / "saved" / "tokenizer.model")).encode(TRICKY)
    for path in [tmp_path / "saved" / "tokenizer.model", tmp_path / "saved"]:
        loaded = tokenizers.build_tokenizer(tokenizer_config(path=str(path)), "unused")
        assert loaded.encode(TRICKY) == trained.encode(TRICKY) == reference


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_save_load(kind, tmp_path):
    tokenizer = tokenizers.build_tokenizer(tokenizer_config(kind=kind), [TRICKY])
    tokenizer.save(str(tmp_path))
    assert os.path.exists(tmp_path / "lmjax_tokenizer.json")
    loaded = tokenizers.load_tokenizer(str(tmp_path))
    assert type(loaded) is type(tokenizer)
    assert loaded.vocab_size == tokenizer.vocab_size
    # The ids the kind defines: UTF-8 bytes, or indices into the sorted characters.
    chars = sorted(set(TRICKY))
    expected = (list(TRICKY.encode("utf-8")) if kind == "byte"
                else [chars.index(c) for c in TRICKY])
    assert loaded.encode(TRICKY) == tokenizer.encode(TRICKY) == expected
    assert loaded.decode(expected) == TRICKY


def test_saving_renames_complete_files_and_the_marker_last(training_text, tmp_path, monkeypatch):
    """Processes of a multi-host run share the workdir: each tokenizer file appears whole (a
    rename of a finished temporary file), lmjax_tokenizer.json after the model file."""
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        assert open(src, "rb").read()  # complete before it becomes visible
        renamed.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    trained = tokenizers.build_tokenizer(tokenizer_config(), training_text)
    trained.save(str(tmp_path))
    assert renamed == ["tokenizer.model", "lmjax_tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == renamed[::-1]  # no temporary files left
    assert tokenizers.load_tokenizer(str(tmp_path)).encode(TRICKY) == trained.encode(TRICKY)


def test_workdir_tokenizer_is_reused_on_resume(tmp_path):
    first = tokenizers.build_tokenizer(tokenizer_config(kind="char"), "abc", str(tmp_path))
    # A resumed run must get the saved tokenizer, whatever text it is handed.
    resumed = tokenizers.build_tokenizer(tokenizer_config(kind="char"), "xyz", str(tmp_path))
    assert resumed.chars == first.chars == "abc"
    with pytest.raises(ValueError, match="holds a saved 'char' tokenizer"):
        tokenizers.build_tokenizer(tokenizer_config(kind="byte"), "abc", str(tmp_path))


@pytest.mark.parametrize("overrides, error, match", [
    (dict(kind="unigram"), ValueError, r"tokenizer.kind must be one of \('char', 'byte', "
                                       r"'sentencepiece', 'wordpiece'\), got 'unigram'"),
    (dict(kind="wordpiece", vocab_size=3), ValueError, r"tokenizer.vocab_size must be an int > 5 "
                                                       "for WordPiece"),
    (dict(model_type="wordpiece"), ValueError, r"tokenizer.model_type must be one of "
                                               r"\('bpe', 'unigram'\)"),
    (dict(vocab_size=100), ValueError, r"tokenizer.vocab_size must be an int >= 262"),
    (dict(path="/nonexistent/tokenizer.model"), FileNotFoundError, "tokenizer.path"),
])
def test_bad_config_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        tokenizers.build_tokenizer(tokenizer_config(**overrides), "some text")


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="No saved tokenizer"):
        tokenizers.load_tokenizer(str(tmp_path))
