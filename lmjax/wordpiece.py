"""BERT's WordPiece tokenizer, through the `tokenizers` library, as an lmjax `HFTokenizer`.

    tokenizer = tokenizers.WordPieceTokenizer.train(texts, 2000)  # tokenizers' WordPiece trainer
    tokenizer = wordpiece.from_vocab("folder/vocab.txt")      # a BERT folder without tokenizer.json
    ids, types = wordpiece.encode(tokenizer, "a sentence", "its pair", max_len=128)

The tokenizer is `tokenizers`' `BertWordPieceTokenizer` pipeline (BERT's normaliser and
pre-tokeniser, [CLS] A [SEP] B [SEP] post-processing), held as tokenizer.json +
tokenizer_config.json (`tokenizers.WordPieceTokenizer`), so it saves and loads like any Hugging
Face tokenizer and `transformers` reads the saved folder; the functions here work on any
`HFTokenizer` (a BERT folder's tokenizer.json too). `encode` here adds [CLS]/[SEP] and token
types, as `transformers`' BERT tokenizers do; `HFTokenizer.encode(text)` (training text) adds none.
"""
from __future__ import annotations

from lmjax import tokenizers as tokenizers_lib


def from_vocab(vocab_file: str, lowercase: bool = True) -> tokenizers_lib.WordPieceTokenizer:
    """BERT's tokenizer for a `vocab.txt` (one WordPiece a line, the line number is the id)."""
    from tokenizers import BertWordPieceTokenizer

    return tokenizers_lib.WordPieceTokenizer.from_backend(
        BertWordPieceTokenizer(vocab_file, lowercase=lowercase)._tokenizer, lowercase)


def token_id(tokenizer: tokenizers_lib.HFTokenizer, name: str) -> int:
    """The id of a special token by its tokenizer_config name ('cls', 'sep', 'mask', 'pad',
    'unk'), ValueError if the tokenizer has none."""
    token = tokenizer.config.get(f"{name}_token") or f"[{name.upper()}]"
    if isinstance(token, dict):
        token = token.get("content")
    value = tokenizer.backend.token_to_id(token)
    if value is None:
        raise ValueError(f"the tokenizer has no {name} token ({token!r})")
    return value


def special_ids(tokenizer: tokenizers_lib.HFTokenizer) -> list[int]:
    """The ids of the special (added) tokens: never masked, never predicted."""
    return sorted(i for i, token in tokenizer.backend.get_added_tokens_decoder().items()
                  if token.special)


def encode(tokenizer: tokenizers_lib.HFTokenizer, text: str, pair: str | None = None,
           max_len: int | None = None) -> tuple[list[int], list[int]]:
    """[CLS] text [SEP] (pair [SEP]) ids and their token types (0 for text, 1 for the pair), cut
    to `max_len` tokens longest-first as `transformers`' truncation=True does."""
    backend = tokenizer.backend
    if max_len:
        backend.enable_truncation(max_len, strategy="longest_first")
    try:
        encoding = backend.encode(text, pair, add_special_tokens=True)
    finally:
        backend.no_truncation()
    return encoding.ids, encoding.type_ids


def encode_batch(tokenizer: tokenizers_lib.HFTokenizer, texts: list[tuple[str, ...]],
                 max_len: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """`encode` of many (text,) or (text, pair) tuples at once (`tokenizers`' encode_batch:
    in parallel, the same ids)."""
    backend = tokenizer.backend
    if max_len:
        backend.enable_truncation(max_len, strategy="longest_first")
    try:
        encodings = backend.encode_batch([t[0] if len(t) == 1 else (t[0], t[1]) for t in texts],
                                         add_special_tokens=True)
    finally:
        backend.no_truncation()
    return [e.ids for e in encodings], [e.type_ids for e in encodings]
