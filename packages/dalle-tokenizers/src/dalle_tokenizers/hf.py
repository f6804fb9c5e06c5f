"""`HFTokenizer`: any Hugging Face ``tokenizers`` JSON file (``--tokenizer hf --bpe_path FILE``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from dalle_core.pretrained import atomic_write_bytes
from dalle_tokenizers.padding import LibraryTokenizer, PaddingIds

SAVED_NAME = "tokenizer.json"


class HFTokenizer(LibraryTokenizer):
    """A Hugging Face ``tokenizers`` JSON file, such as one written by `train_bpe`.

    Texts are encoded without the file's template special tokens (no BOS/CLS/EOS), padding or
    truncation; batches are encoded in parallel by the library. Id 0 is padding when the file's
    id 0 is a special token other than its unknown token (as `train_bpe` writes it); otherwise
    that token moves to the new id ``vocab_size - 1`` (see `dalle_tokenizers.padding`).
    """

    plugin_name = "hf"

    def __init__(self, bpe_path: str | Path):
        from tokenizers import Tokenizer as HFLibraryTokenizer

        path = Path(bpe_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Hugging Face tokenizer file {path} does not exist (--bpe_path must name a "
                f"tokenizer.json written by the tokenizers library, e.g. by dalle-train-tokenizer)"
            )
        try:
            tokenizer = HFLibraryTokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizers JSON file: {error}") from error
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.bpe_path = str(path)
        self.tokenizer = tokenizer
        self.ids = PaddingIds(tokenizer.get_vocab_size(with_added_tokens=True), _zero_is_padding(tokenizer))

    def encode(self, text: str) -> list[int]:
        return self.ids.to_dalle(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self.ids.to_dalle(encoding.ids) for encoding in encodings]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(self.ids.from_dalle(ids), skip_special_tokens=True)

    def save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_bytes(directory / SAVED_NAME, Path(self.bpe_path).read_bytes())
        return {"bpe_path": SAVED_NAME}

    @classmethod
    def from_pretrained(cls, directory: str | Path, bpe_path: str = SAVED_NAME) -> HFTokenizer:
        """Rebuild from a directory written by ``save_pretrained``."""
        return cls(Path(directory) / bpe_path)


def _zero_is_padding(tokenizer: Any) -> bool:
    """Whether id 0 of a ``tokenizers.Tokenizer`` is a special token that is not its unknown token."""
    token = tokenizer.get_added_tokens_decoder().get(0)
    model = tokenizer.model
    unknown = getattr(model, "unk_token", None)
    return (token is not None and token.special and token.content != unknown
            and getattr(model, "unk_id", None) != 0)
