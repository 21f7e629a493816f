"""Shared test fixtures."""

import os

import pytest

from lmjax.config import default_config

# The tiny-shakespeare text lives next to the repository, never inside it.
TINY_SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                "tinyshakespeare.txt")


# The longest tests, started first: `make test` runs on 2 xdist workers, and one of these
# started late (pytest collects test_readme.py near the end) is the whole run's tail.
LONGEST_FIRST = ("tests/test_readme.py", "tests/test_notebooks.py")


def pytest_collection_modifyitems(config, items):
    """Longest tests first (a stable sort: the order within each group is kept)."""
    del config
    def rank(item):
        return next((i for i, name in enumerate(LONGEST_FIRST) if item.nodeid.startswith(name)),
                    len(LONGEST_FIRST))
    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def token_stores(tmp_path_factory) -> str:
    """Token stores (lmjax/token_store.py) of the session go to a temporary folder, not the
    user's ~/.cache (subprocesses inherit it)."""
    folder = str(tmp_path_factory.mktemp("token_stores"))
    os.environ["LMJAX_TOKEN_STORES"] = folder
    return folder


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> str:
    """The commands' persistent XLA cache (`commands.common.use_compilation_cache`) of the
    session's subprocesses goes to a temporary folder too, not ~/.cache/lmjax/xla."""
    folder = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    return folder


@pytest.fixture(scope="session")
def tiny_shakespeare_path() -> str:
    """Path of nanoGPT's tiny shakespeare (skips the test when absent)."""
    if not os.path.exists(TINY_SHAKESPEARE):
        pytest.skip(f"{TINY_SHAKESPEARE} not found")
    return TINY_SHAKESPEARE


@pytest.fixture(scope="session")
def tiny_shakespeare(tiny_shakespeare_path) -> str:
    """The 1,115,394 characters of nanoGPT's tiny shakespeare."""
    with open(tiny_shakespeare_path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def pigs_text() -> str:
    """A small repetitive corpus (300 lines) that a tiny model learns within a few dozen steps."""
    return "".join(f"{i} little pigs went to market; {i * 7 % 13} came home.\n" for i in range(300))


@pytest.fixture
def tiny_config(tmp_path, pigs_text):
    """`tiny_config(**train_fields)`: a 2-layer, width-32 experiment config training on
    `pigs_text`, written to `tmp_path / 'corpus.txt'`."""
    def make(**train_fields):
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(pigs_text)
        config = default_config()
        config.data.source = "files"
        config.data.train_files = str(corpus)
        config.data.seq_len, config.data.batch_size = 32, 8
        config.model.update(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=32)
        config.optim.warmup_steps, config.optim.learning_rate = 5, 3e-3
        config.train.update(num_steps=40, log_every=10, eval_every=20, eval_batches=4,
                            num_samples=0, progress_bar=False)
        config.train.update(train_fields)
        return config
    return make


def write_random_gpt2(folder: str, text: str, vocab_size: int, n_positions: int):
    """A random two-layer GPT-2 with a byte-level BPE trained on `text`, saved in `folder` as
    `save_pretrained` writes it (what `hf download gpt2` gives, smaller). Returns the torch
    model in eval mode (no dropout)."""
    import tokenizers
    import torch
    import transformers
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    bpe.save(os.path.join(folder, "tokenizer.json"))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=2,
        n_head=2, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    return model.eval()
