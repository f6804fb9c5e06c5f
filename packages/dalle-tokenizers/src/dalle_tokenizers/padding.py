"""Keeping id 0 for padding with a vocabulary whose id 0 may be a real token.

A library tokenizer (Hugging Face, BERT, YouTokenToMe) numbers its tokens from 0. When its id 0
is a padding token, dalle's ids are the library's. Otherwise the token at id 0 is given the
new id ``raw_size`` (one past the library's ids), so that no text ever encodes to 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dalle_core.interfaces import Tokenizer


@dataclass(frozen=True)
class PaddingIds:
    """Maps a library's ids to dalle's and back.

    ``raw_size``: the library's vocabulary size. ``zero_is_padding``: whether the library's id 0
    is a padding token (then it never stands for text: `to_dalle` drops it).
    """

    raw_size: int
    zero_is_padding: bool

    @property
    def vocab_size(self) -> int:
        """dalle's vocabulary size, padding included."""
        return self.raw_size if self.zero_is_padding else self.raw_size + 1

    def to_dalle(self, ids: Iterable[int]) -> list[int]:
        """Library ids of a text -> dalle ids (none of them 0)."""
        if self.zero_is_padding:
            return [i for i in ids if i]
        return [i or self.raw_size for i in ids]

    def from_dalle(self, ids: Iterable[int]) -> list[int]:
        """dalle ids -> library ids; padding and ids outside the vocabulary are dropped."""
        moved = None if self.zero_is_padding else self.raw_size
        return [0 if i == moved else i for i in map(int, ids) if 0 < i < self.vocab_size]


class LibraryTokenizer(Tokenizer):
    """A tokenizer of a library, read from ``bpe_path``, whose ids map to dalle's through
    ``ids`` (`PaddingIds`); subclasses set both in ``__init__``."""

    bpe_path: str
    ids: PaddingIds

    @property
    def vocab_size(self) -> int:
        return self.ids.vocab_size

    def config(self) -> dict[str, Any]:
        return {"bpe_path": self.bpe_path}
