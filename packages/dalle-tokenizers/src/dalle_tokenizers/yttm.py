"""`YTTMTokenizer`: a YouTokenToMe BPE model (``--tokenizer yttm --bpe_path bpe.model``).

youtokentome is optional and imported when a tokenizer is built. Version 1.0.6 builds only with
Cython already installed and without build isolation::

    pip install Cython setuptools wheel && pip install --no-build-isolation youtokentome==1.0.6
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from dalle_core.pretrained import atomic_write_bytes
from dalle_tokenizers.padding import LibraryTokenizer, PaddingIds

SAVED_NAME = "yttm.model"
INSTALL = "pip install Cython setuptools wheel && pip install --no-build-isolation youtokentome==1.0.6"


def import_youtokentome() -> Any:
    """The youtokentome module, or an ImportError that says how to install it."""
    try:
        import youtokentome
    except ImportError as error:
        raise ImportError(f"the yttm tokenizer needs youtokentome: {INSTALL}") from error
    return youtokentome


def check_model_file(path: Path) -> None:
    """Raise a `ValueError` naming ``path`` unless it is a well-formed YouTokenToMe model.

    The format: a line ``n_chars n_merges``; ``n_chars`` lines ``codepoint id``; ``n_merges``
    lines ``left_id right_id id`` (parts defined above); a line ``unk pad bos eos`` (ids, -1 for
    none). The ids must be ``0 .. vocab_size - 1``, each once.
    """

    def fail(why: str) -> ValueError:
        return ValueError(f"{path} is not a YouTokenToMe model ({why}); --bpe_path must name a model "
                          f"written by `yttm bpe ... --model FILE`")

    try:
        rows = [[int(field) for field in line.split()] for line in path.read_text().splitlines()]
    except (UnicodeDecodeError, ValueError) as error:
        raise fail(f"not lines of integers: {error}") from error
    if not rows or len(rows[0]) != 2:
        raise fail("its first line is not 'n_chars n_merges'")
    n_chars, n_merges = rows[0]
    chars, merges, specials = rows[1 : 1 + n_chars], rows[1 + n_chars : -1], rows[-1]
    if len(rows) != n_chars + n_merges + 2 or len(specials) != 4:
        raise fail(f"expected {n_chars + n_merges + 2} lines for {n_chars} characters and {n_merges} "
                   f"merges, ending with 'unk pad bos eos'; it has {len(rows)}")
    defined: set[int] = set()
    for number, row in enumerate(chars + merges, start=2):
        if len(row) != (2 if number <= n_chars + 1 else 3):
            raise fail(f"line {number} has {len(row)} fields")
        if number > n_chars + 1 and not {row[0], row[1]} <= defined:
            raise fail(f"line {number} merges an id not defined above it")
        defined.add(row[-1])
    ids = sorted([*(row[-1] for row in chars + merges), *(i for i in specials if i >= 0)])
    if ids != list(range(len(ids))):
        raise fail("its ids are not 0 .. vocab_size - 1, each once")


class YTTMTokenizer(LibraryTokenizer):
    """A YouTokenToMe BPE model file, as trained by ``yttm bpe --vocab_size N --data FILE --model
    bpe.model``. Its ``<PAD>`` (id 0 by default) is dalle's padding; a model trained with another
    pad id has its id-0 token moved to ``vocab_size - 1`` (see `dalle_tokenizers.padding`).
    Batches are encoded by youtokentome's threads."""

    plugin_name = "yttm"

    def __init__(self, bpe_path: str | Path):
        yttm = import_youtokentome()
        path = Path(bpe_path)
        if not path.is_file():
            raise FileNotFoundError(f"YouTokenToMe model file {path} does not exist (--bpe_path must "
                                    f"name a model written by `yttm bpe ... --model FILE`)")
        check_model_file(path)  # youtokentome aborts the whole process on a malformed file
        self.model = yttm.BPE(model=str(path))
        self.output_ids = yttm.OutputType.ID
        self.bpe_path = str(path)
        self.ids = PaddingIds(self.model.vocab_size(), self.model.id_to_subword(0) == "<PAD>")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.ids.to_dalle(ids) for ids in self.model.encode(list(texts), output_type=self.output_ids)]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.model.decode([self.ids.from_dalle(ids)])[0]

    def save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_bytes(directory / SAVED_NAME, Path(self.bpe_path).read_bytes())
        return {"bpe_path": SAVED_NAME}

    @classmethod
    def from_pretrained(cls, directory: str | Path, bpe_path: str = SAVED_NAME) -> YTTMTokenizer:
        """Rebuild from a directory written by ``save_pretrained``."""
        return cls(Path(directory) / bpe_path)
