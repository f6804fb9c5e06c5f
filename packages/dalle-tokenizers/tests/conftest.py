"""Tiny tokenizer files built by the tests themselves: nothing is downloaded.

The Hugging Face hub is switched off and pointed at an empty cache before transformers can be
imported, so a test that asks for ``bert-base-chinese`` sees a machine that never downloaded it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dalle-tokenizers-empty-hf-home-")

#: what the conformance suite encodes, so that tiny vocabularies cover it
CONFORMANCE_TEXTS = (
    "a small red cube on a wooden table",
    "two cats",
    "hello, world!",
    "café naïve 日本語 🐱🎨 tab here newline nul bell del",
)
#: more captions, so that a BPE has pairs to merge
EXTRA_CAPTIONS = (
    "a painting of a fox in the snow",
    "an armchair in the shape of an avocado",
    "a red cube on top of a blue cube",
    "追老鼠的猫",
)

#: a BERT vocabulary in an order no published model has, so that its ids prove it was used
CHINESE_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "table", "wooden", "on", "cube", "red", "small", "a", "two", "cats", "hello", ",", "world",
    "!", "cafe", "naive", "日", "本", "語", "tab", "here", "newline", "nul", "bell", "del",
    "追", "老", "鼠", "的", "猫", "##s",
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text file of captions, one per line: the conformance texts and a few more, 20 times."""
    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join([*CONFORMANCE_TEXTS, *EXTRA_CAPTIONS] * 20) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hf_json(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 300 ids trained on `corpus` by `train_bpe`."""
    from dalle_tokenizers import train_bpe

    return train_bpe(corpus, 300, tmp_path_factory.mktemp("hf") / "bpe.json")


@pytest.fixture(scope="session")
def yttm_model(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YouTokenToMe BPE of 120 ids trained on `corpus` (skips without youtokentome)."""
    yttm = pytest.importorskip("youtokentome")
    path = tmp_path_factory.mktemp("yttm") / "bpe.model"
    yttm.BPE.train(data=str(corpus), model=str(path), vocab_size=120, n_threads=1)
    return path


@pytest.fixture(scope="session")
def chinese_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``vocab.txt`` of `CHINESE_VOCAB`, one token per line."""
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(CHINESE_VOCAB) + "\n", encoding="utf-8")
    return path
