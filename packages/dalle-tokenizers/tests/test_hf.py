"""``hf``: Hugging Face tokenizers JSON files, trained here by `train_bpe` or built in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dalle_core.testing import TokenizerConformance
from dalle_tokenizers import HFTokenizer
from dalle_tokenizers.padding import PaddingIds


class TestHFTokenizer(TokenizerConformance):
    @pytest.fixture
    def tokenizer(self, hf_json: Path) -> HFTokenizer:
        return HFTokenizer(hf_json)


def test_batched_encoding_equals_one_at_a_time(hf_json: Path) -> None:
    tokenizer = HFTokenizer(hf_json)
    texts = ["a small red cube", "", "追老鼠的猫 🐱", "tab\tnul\x00", "x" * 3000]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
    batch = tokenizer.tokenize(texts, 4000)
    for row, text in zip(batch.tolist(), texts):
        ids = tokenizer.encode(text)
        assert row == ids + [0] * (4000 - len(ids))


def test_file_with_a_real_token_at_id_zero(tmp_path: Path) -> None:
    """A vocabulary whose id 0 is ``<unk>``: that token moves to the new last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    library = Tokenizer(models.WordLevel({"<unk>": 0, "red": 1, "cube": 2}, unk_token="<unk>"))
    library.pre_tokenizer = pre_tokenizers.Whitespace()
    library.save(str(tmp_path / "words.json"))
    tokenizer = HFTokenizer(tmp_path / "words.json")
    assert tokenizer.vocab_size == 4
    assert tokenizer.encode("red blue cube") == [1, 3, 2]
    assert tokenizer.decode(torch.tensor([1, 3, 2, 0, 0])) == "red <unk> cube"
    assert tokenizer.tokenize(["blue"], 3).tolist() == [[3, 0, 0]]


def test_padding_ids_map_both_ways() -> None:
    moved = PaddingIds(raw_size=10, zero_is_padding=False)
    assert moved.vocab_size == 11
    assert moved.to_dalle([0, 5, 0]) == [10, 5, 10]
    assert moved.from_dalle([0, 10, 5, 11, -1]) == [0, 5]
    kept = PaddingIds(raw_size=10, zero_is_padding=True)
    assert kept.vocab_size == 10 and kept.to_dalle([0, 5]) == [5] and kept.from_dalle([0, 9, 10]) == [9]


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json does not exist"):
        HFTokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"bad\.json is not a Hugging Face tokenizers JSON file"):
        HFTokenizer(tmp_path / "bad.json")
