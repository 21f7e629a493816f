"""Shared test fixtures."""

import os

import pytest

# The tiny-shakespeare text lives next to the repository, never inside it.
TINY_SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                "tinyshakespeare.txt")


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
