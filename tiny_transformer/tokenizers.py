"""Tokenizers: text <-> token ids.

`CharTokenizer` gives every distinct character its own id (sorted, so the mapping is the same on
every machine). It is the simplest tokenizer there is, and on Tiny Shakespeare its vocabulary has
65 entries. It refuses characters it has not seen instead of silently mapping them to an `<unk>`:
a typo in a prompt should be an error you can read, not garbage you have to debug.
"""

from __future__ import annotations

import json
from pathlib import Path


class UnknownCharacterError(ValueError):
    """A character that is not in the tokenizer's vocabulary."""


class CharTokenizer:
    """Character-level tokenizer. `fit(text)` builds the vocabulary; `encode`/`decode` convert."""

    def __init__(self, chars: list[str] | str | None = None):
        self.vocab: dict[str, int] = {}
        self.itos: list[str] = []
        if chars is not None:
            self._set_chars(sorted(set(chars)))

    def _set_chars(self, chars: list[str]) -> None:
        self.itos = list(chars)
        self.vocab = {ch: i for i, ch in enumerate(self.itos)}

    def fit(self, text: str) -> CharTokenizer:
        """Build the vocabulary from every distinct character in `text` (sorted by code point)."""
        if not text:
            raise ValueError("cannot fit a tokenizer on empty text")
        self._set_chars(sorted(set(text)))
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Text -> list of ids. Raises `UnknownCharacterError` naming the first unknown character."""
        if not self.itos:
            raise ValueError("tokenizer has no vocabulary: call fit(text) or load(path) first")
        try:
            return [self.vocab[ch] for ch in text]
        except KeyError:
            for pos, ch in enumerate(text):
                if ch not in self.vocab:
                    raise UnknownCharacterError(
                        f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the vocabulary "
                        f"of {self.vocab_size} characters; remove or replace it (the model was trained "
                        "on text without it)"
                    ) from None
            raise

    def decode(self, ids) -> str:
        """Ids (list, tuple or 1-D tensor) -> text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            return "".join(self.itos[i] for i in ids)
        except (IndexError, TypeError):
            bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size), None)
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})") from None

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("type", "char") != "char" or "chars" not in d:
            raise ValueError("not a CharTokenizer description (expected {'type': 'char', 'chars': ...})")
        tok = cls()
        tok._set_chars(list(d["chars"]))
        return tok

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (UTF-8)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer from `tokenizer.to_dict()` (as stored in checkpoints)."""
    kind = d.get("type", "char")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "sentencepiece":
        from tiny_transformer.sentencepiece_tools import SentencePieceTokenizer

        return SentencePieceTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer type {kind!r} (expected 'char' or 'sentencepiece')")


# SentencePiece lives in its own module (it needs the optional `sentencepiece` package, imported
# only when used); re-exported here so every tokenizer can be imported from one place.
from tiny_transformer.sentencepiece_tools import (  # noqa: E402, F401
    SentencePieceTokenizer,
    export_tokenizer_bin,
    train_sentencepiece,
)
