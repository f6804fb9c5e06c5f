"""`ChineseTokenizer`: BERT WordPiece through ``transformers`` (``--chinese``), upstream's
``bert-base-chinese`` by default.

transformers is optional (``pip install "dalle-tokenizers[chinese]"``) and imported when a
tokenizer is built. The vocabulary comes from the Hugging Face hub (cached by transformers), a
local folder written by ``save_pretrained``, or a ``vocab.txt`` file (one token per line, the
line number being its id).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from dalle_tokenizers.padding import LibraryTokenizer, PaddingIds

DEFAULT_MODEL = "bert-base-chinese"
SAVED_FOLDER = "bert"
INSTALL = 'pip install "dalle-tokenizers[chinese]"'


def import_bert_tokenizer() -> Any:
    """``transformers.BertTokenizer``, or an ImportError that says how to install it."""
    try:
        from transformers import BertTokenizer
    except ImportError as error:
        raise ImportError(f"the chinese tokenizer needs transformers: {INSTALL}") from error
    return BertTokenizer


def load_bert(source: str | Path) -> Any:
    """A BERT tokenizer from a ``vocab.txt`` file, a local folder, or a hub model name.

    A source that looks like a path (absolute, starting with ``.`` or ``~``, more than one
    ``/``, or ending in ``.txt``) must exist. transformers 5 does not fail on a folder without
    tokenizer files, nor offline on a model that is not cached: it returns a tokenizer of the
    five special tokens alone. Both are caught here (a vocabulary of special tokens only) and,
    like transformers 4's ``OSError``, become an error saying how to provide the vocabulary.
    """
    bert_tokenizer = import_bert_tokenizer()
    path = Path(source).expanduser()
    if path.is_file():
        return _from_vocab_file(bert_tokenizer, path)
    text = str(source)
    looks_like_path = (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
                       or path.suffix == ".txt")
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"BERT vocabulary {path} does not exist (give a vocab.txt file, a "
                                f"folder written by save_pretrained, or a Hugging Face model name)")
    try:
        tokenizer = bert_tokenizer.from_pretrained(str(path) if path.is_dir() else text)
        error = None
    except OSError as raised:  # transformers 4: not cached and not downloadable, or no such model
        tokenizer, error = None, raised
    if tokenizer is not None and len(tokenizer.get_vocab()) > len(tokenizer.all_special_tokens):
        return tokenizer
    reason = f" ({type(error).__name__}: {error})" if error else ""
    if path.is_dir():
        raise OSError(f"{path} holds no BERT vocabulary{reason}: expected vocab.txt, or "
                      f"tokenizer.json and tokenizer_config.json as written by save_pretrained")
    raise OSError(
        f"could not load the BERT tokenizer {text!r}: it is not in the Hugging Face cache and could "
        f"not be downloaded (offline?){reason}. Download it once with network access: python -c "
        f"\"from transformers import BertTokenizer; BertTokenizer.from_pretrained('{text}')\"; or "
        f"give a local folder holding its files or a vocab.txt file with --bpe_path "
        f"(ChineseTokenizer(bpe_path=...))"
    ) from error


def _from_vocab_file(bert_tokenizer: Any, path: Path) -> Any:
    """A BERT tokenizer on the vocabulary of ``path``, checked to really use it: transformers 5
    takes ``vocab=`` and ignores the ``vocab_file=`` of transformers 4 without a word."""
    lines = path.read_text(encoding="utf-8").splitlines()
    parameters = inspect.signature(bert_tokenizer.__init__).parameters
    keyword = "vocab_file" if "vocab_file" in parameters else "vocab"
    tokenizer = bert_tokenizer(**{keyword: str(path)})
    vocab = tokenizer.get_vocab()
    expected = {token: index for index, token in enumerate(lines)}  # a repeated token: its last line
    wrong = [token for token, index in expected.items() if vocab.get(token) != index]
    if wrong:
        raise RuntimeError(
            f"transformers {_version()} did not load the vocabulary {path} ({len(expected)} tokens; "
            f"the tokenizer has {len(vocab)}, {len(wrong)} with another id, e.g. {wrong[:3]})"
        )
    return tokenizer


def _version() -> str:
    import transformers

    return transformers.__version__


class ChineseTokenizer(LibraryTokenizer):
    """BERT WordPiece for Chinese (and any BERT vocabulary): ``bpe_path`` is a hub model name
    (default ``bert-base-chinese``), a folder, or a ``vocab.txt`` file. Text is encoded without
    ``[CLS]``/``[SEP]``; unknown characters become ``[UNK]``. Its ``[PAD]`` (id 0 in BERT
    vocabularies) is dalle's padding; otherwise see `dalle_tokenizers.padding`."""

    plugin_name = "chinese"

    def __init__(self, bpe_path: str | Path | None = None):
        self.bpe_path = str(bpe_path or DEFAULT_MODEL)
        self.tokenizer = load_bert(self.bpe_path)
        pad, unknown = self.tokenizer.pad_token_id, self.tokenizer.unk_token_id
        self.ids = PaddingIds(len(self.tokenizer), pad == 0 and unknown != 0)

    def encode(self, text: str) -> list[int]:
        return self.ids.to_dalle(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        batch = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self.ids.to_dalle(ids) for ids in batch]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> text as BERT writes it (characters of Chinese text separated by spaces)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(self.ids.from_dalle(ids))

    def save_files(self, directory: Path) -> dict[str, Any]:
        """Save the tokenizer's files in ``directory/bert``, so reloading needs no download."""
        self.tokenizer.save_pretrained(str(directory / SAVED_FOLDER))
        return {"bpe_path": SAVED_FOLDER}

    @classmethod
    def from_pretrained(cls, directory: str | Path, bpe_path: str = SAVED_FOLDER) -> ChineseTokenizer:
        """Rebuild from a directory written by ``save_pretrained``."""
        return cls(Path(directory) / bpe_path)
