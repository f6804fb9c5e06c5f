"""`ByteTokenizer`: text as UTF-8 bytes, the tokenizer that needs no files and no plugin."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dalle_core.interfaces import Tokenizer


class ByteTokenizer(Tokenizer):
    """Each UTF-8 byte ``b`` becomes id ``b + 1``, so id 0 stays free for padding (257 ids).

    Any text round-trips exactly; a text takes one id per byte (several per non-ASCII
    character), so contexts fill faster than with a BPE tokenizer from ``dalle-tokenizers``.
    """

    plugin_name = "bytes"

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return [byte + 1 for byte in text.encode("utf-8")]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> text; padding, out-of-range ids and broken UTF-8 sequences are dropped or
        replaced (U+FFFD), never an error."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        data = bytes(int(i) - 1 for i in ids if 1 <= int(i) <= 256)
        return data.decode("utf-8", errors="replace")
