"""`BPETokenizer`: the CLIP byte-level BPE of the upstream project (49408 ids), the default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from dalle_core.interfaces import Tokenizer
from dalle_core.pretrained import atomic_write_bytes
from dalle_tokenizers.clip_vocab import VOCAB_SIZE, WORD_PATTERN, default_merges_path, load_vocabulary
from dalle_tokenizers.text import fast_clean_text

#: words remembered by the cache before it starts again (a few MB; real captions reuse far fewer)
CACHE_WORDS = 1 << 18


class BPETokenizer(Tokenizer):
    """CLIP's byte-level BPE with upstream cleaning (ftfy, HTML unescaping, lower case).

    ``bpe_path``: a CLIP-style merges file (gzip or text); default: the one shipped with this
    package. Ids are CLIP's except that ``!`` has id 49406 instead of 0, which is padding (see
    `dalle_tokenizers.clip_vocab`). Equal, id for id, to `ReferenceBPETokenizer`; faster through
    a cleaning shortcut for plain ASCII captions, an O(n log n) merge (`bpe_merge_heap`) and a
    cache of each word's ids.
    """

    plugin_name = "bpe"

    def __init__(self, bpe_path: str | Path | None = None):
        self.bpe_path = None if bpe_path is None else str(bpe_path)
        self.vocabulary = load_vocabulary(Path(bpe_path) if bpe_path else default_merges_path())
        self._cache: dict[str, list[int]] = {}  # word -> its ids

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def config(self) -> dict[str, Any]:
        return {"bpe_path": self.bpe_path}

    def encode(self, text: str) -> list[int]:
        cache = self._cache
        ids: list[int] = []
        for word in WORD_PATTERN.findall(fast_clean_text(text)):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= CACHE_WORDS:
                    cache.clear()
                word_ids = cache[word] = self.vocabulary.word_ids(word)
            ids += word_ids
        return ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> words separated by single spaces; padding, ``<|endoftext|>`` and out-of-range
        ids are dropped, a split UTF-8 character becomes U+FFFD."""
        return self.vocabulary.decode(ids.tolist() if isinstance(ids, Tensor) else ids)

    def save_files(self, directory: Path) -> dict[str, Any]:
        """Copy a custom merges file into ``directory``; the shipped one is not copied."""
        if self.bpe_path is None:
            return {}
        source = Path(self.bpe_path)
        atomic_write_bytes(directory / source.name, source.read_bytes())
        return {"bpe_path": source.name}

    @classmethod
    def from_pretrained(cls, directory: str | Path, bpe_path: str | None = None) -> BPETokenizer:
        """Rebuild from a directory written by ``save_pretrained``."""
        return cls(bpe_path=None if bpe_path is None else Path(directory) / bpe_path)
