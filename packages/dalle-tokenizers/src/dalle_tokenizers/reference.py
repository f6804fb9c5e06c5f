"""The upstream ``SimpleTokenizer``, written plainly: the specification `BPETokenizer` is tested
against (exact equality) and the reference its benchmark is measured against.

One caption at a time: `clean_text` (ftfy, HTML unescaping, whitespace, lower case), CLIP's
pre-tokenizer and the upstream byte-level BPE loop (`bpe_merge`) per word with its word cache.
Ids are those of `dalle_tokenizers.clip_vocab` (``!`` moved off 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from dalle_core.interfaces import Tokenizer
from dalle_tokenizers.clip_vocab import (
    VOCAB_SIZE,
    WORD_PATTERN,
    bpe_merge,
    default_merges_path,
    load_vocabulary,
)
from dalle_tokenizers.text import clean_text


class ReferenceBPETokenizer(Tokenizer):
    """Plain CLIP BPE, one caption at a time (not registered; for tests and benchmarks)."""

    def __init__(self, bpe_path: str | Path | None = None):
        self.vocabulary = load_vocabulary(Path(bpe_path or default_merges_path()))
        self.cache: dict[str, list[int]] = {}  # word -> ids, as the upstream bpe() cached

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            if word not in self.cache:
                self.cache[word] = self.vocabulary.word_ids(word, bpe_merge)
            ids.extend(self.cache[word])
        return ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        return self.vocabulary.decode(ids.tolist() if isinstance(ids, Tensor) else ids)
