"""``yttm``: YouTokenToMe models trained here (skipped where youtokentome is not installed; the
package's CI installs it, see ``[tool.dalle.install]`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalle_core.plugins import create_tokenizer
from dalle_core.testing import TokenizerConformance
from dalle_tokenizers import YTTMTokenizer


class TestYTTMTokenizer(TokenizerConformance):
    @pytest.fixture
    def tokenizer(self, yttm_model: Path) -> YTTMTokenizer:
        return YTTMTokenizer(yttm_model)


def test_ids_are_the_models(yttm_model: Path) -> None:
    import youtokentome

    model = youtokentome.BPE(str(yttm_model))
    tokenizer = create_tokenizer("yttm", bpe_path=str(yttm_model))
    texts = ["a small red cube", "two cats", "", "日本語 🐱"]
    assert tokenizer.vocab_size == model.vocab_size() == 120  # its <PAD> is id 0
    assert tokenizer.encode_batch(texts) == model.encode(texts, output_type=youtokentome.OutputType.ID)
    assert tokenizer.decode([0, *tokenizer.encode("two cats"), 0]) == "two cats"


def test_bad_files_are_named(tmp_path: Path, yttm_model: Path) -> None:
    # youtokentome itself aborts the interpreter on these (std::out_of_range): checked first
    with pytest.raises(FileNotFoundError, match=r"missing\.model does not exist"):
        YTTMTokenizer(tmp_path / "missing.model")
    lines = yttm_model.read_text().splitlines()
    n_chars = int(lines[0].split()[0])
    undefined = lines[:]
    left, right, merged = undefined[n_chars + 1].split()
    undefined[n_chars + 1] = f"{left} 9999 {merged}"
    bad = {
        "text.model": ("not a model\n", "not lines of integers"),
        "empty.model": ("", "first line"),
        "short.model": ("\n".join(lines[:1] + lines[2:]), f"it has {len(lines) - 1}"),
        "undefined.model": ("\n".join(undefined), f"line {n_chars + 2} merges an id not defined"),
        "ids.model": ("\n".join(lines[:-1] + ["1 0 2 2"]), "each once"),
    }
    for name, (text, why) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name} is not a YouTokenToMe model \(.*{why}"):
            YTTMTokenizer(tmp_path / name)
