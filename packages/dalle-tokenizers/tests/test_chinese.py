"""``chinese``: BERT WordPiece through transformers, on vocabularies written here (the hub is
off and its cache empty, see conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalle_core.plugins import create_tokenizer
from dalle_core.testing import TokenizerConformance
from dalle_tokenizers import ChineseTokenizer
from dalle_tokenizers.chinese import _from_vocab_file

pytest.importorskip("transformers")


class TestChineseTokenizer(TokenizerConformance):
    @pytest.fixture
    def tokenizer(self, chinese_vocab: Path) -> ChineseTokenizer:
        return ChineseTokenizer(bpe_path=chinese_vocab)


def test_the_local_vocabulary_is_used(chinese_vocab: Path, tmp_path: Path) -> None:
    """transformers 5 ignores ``BertTokenizer(vocab_file=...)`` silently: the ids must be the
    line numbers of this file, and another order of the same tokens must give other ids."""
    lines = chinese_vocab.read_text(encoding="utf-8").splitlines()
    tokenizer = ChineseTokenizer(bpe_path=chinese_vocab)
    assert tokenizer.vocab_size == len(lines)
    line = {token: index for index, token in enumerate(lines)}
    assert tokenizer.encode("追老鼠的猫") == [line[c] for c in "追老鼠的猫"]
    assert tokenizer.encode("Two CATS, café!") == [line[t] for t in ("two", "cats", ",", "cafe", "!")]
    assert tokenizer.encode("dogs") == [line["[UNK]"]]
    assert tokenizer.decode(tokenizer.encode("追老鼠的猫")) == "追 老 鼠 的 猫"

    reordered = [*lines[:5], *reversed(lines[5:])]
    (tmp_path / "vocab.txt").write_text("\n".join(reordered) + "\n", encoding="utf-8")
    other = ChineseTokenizer(bpe_path=tmp_path / "vocab.txt")
    assert other.encode("猫") == [reordered.index("猫")] != tokenizer.encode("猫")


def test_a_folder_and_a_saved_tokenizer(chinese_vocab: Path, tmp_path: Path) -> None:
    by_folder = create_tokenizer("chinese", bpe_path=str(chinese_vocab.parent))
    by_file = ChineseTokenizer(bpe_path=chinese_vocab)
    texts = ["追老鼠的猫", "a small red cube on a wooden table"]
    assert by_folder.encode_batch(texts) == by_file.encode_batch(texts)
    by_file.save_pretrained(tmp_path / "saved")
    assert ChineseTokenizer.from_pretrained(tmp_path / "saved", bpe_path="bert").encode_batch(texts) == (
        by_file.encode_batch(texts)
    )


def test_a_tokenizer_that_ignores_the_file_is_refused(chinese_vocab: Path) -> None:
    """The check behind `test_the_local_vocabulary_is_used`, with a BERT class that ignores
    its file the way transformers 5 ignores ``vocab_file=``."""
    from transformers import BertTokenizer

    class IgnoresTheFile(BertTokenizer):
        def __init__(self, vocab=None, **kwargs):
            super().__init__(**kwargs)

    with pytest.raises(RuntimeError, match=r"did not load the vocabulary .*vocab\.txt"):
        _from_vocab_file(IgnoresTheFile, chinese_vocab)


def test_offline_without_a_cached_model_says_how_to_provide_one() -> None:
    with pytest.raises(OSError) as error:
        ChineseTokenizer()  # bert-base-chinese: not in the (empty) cache, and the hub is off
    message = str(error.value)
    assert "'bert-base-chinese'" in message and "not in the Hugging Face cache" in message
    assert "BertTokenizer.from_pretrained('bert-base-chinese')" in message  # download it once
    assert "--bpe_path" in message and "vocab.txt" in message  # or give local files


def test_missing_local_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]vocab\.txt does not exist"):
        ChineseTokenizer(bpe_path=tmp_path / "nowhere" / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=r"empty holds no BERT vocabulary"):
        ChineseTokenizer(bpe_path=tmp_path / "empty")
