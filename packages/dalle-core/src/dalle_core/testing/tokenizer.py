"""The conformance suite every tokenizer plugin must pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dalle_core.interfaces import Tokenizer
from dalle_core.plugins import load_tokenizer


def _spaces_collapsed(text: str) -> str:
    return " ".join(text.split())


class TokenizerConformance:
    """Encoding, padding, truncation and save/load of a `Tokenizer`: subclass it and define
    `make_tokenizer`::

        class TestMyTokenizer(TokenizerConformance):
            def make_tokenizer(self):
                return MyTokenizer(vocab_path=...)

    Decoding may normalise whitespace; a tokenizer that also changes case or spelling sets
    `round_trip_text` to a text it reproduces. The save/load test reloads through
    `dalle_core.plugins.load_tokenizer`, so the tokenizer's plugin must be registered.
    """

    #: lowercase ASCII words that must survive ``decode(encode(text))`` (spaces collapsed)
    round_trip_text: str = "a small red cube on a wooden table"
    texts: tuple[str, ...] = ("a small red cube on a wooden table", "two cats", "hello, world!")
    #: accents, CJK, emoji, tab, newline and control characters
    unicode_text: str = "café naïve 日本語 🐱🎨 tab\there\nnewline nul\x00 bell\x07 del\x7f"

    def make_tokenizer(self) -> Tokenizer:
        """The tokenizer under test."""
        raise NotImplementedError(f"{type(self).__name__} must define make_tokenizer()")

    @pytest.fixture
    def tokenizer(self) -> Tokenizer:
        return self.make_tokenizer()

    def long_text(self, tokenizer: Tokenizer) -> tuple[str, int]:
        """A text of more than 8 tokens, and its token count."""
        text = " ".join(["a small red cube on a wooden table"] * 4)
        return text, len(tokenizer.encode(text))

    def test_is_a_tokenizer(self, tokenizer: Tokenizer) -> None:
        assert isinstance(tokenizer, Tokenizer)
        assert tokenizer.plugin_name, "plugin_name is the name the tokenizer is registered under"
        size = tokenizer.vocab_size
        assert isinstance(size, int) and size > 1

    def test_round_trip(self, tokenizer: Tokenizer) -> None:
        ids = tokenizer.encode(self.round_trip_text)
        expected = _spaces_collapsed(self.round_trip_text)
        assert _spaces_collapsed(tokenizer.decode(ids)) == expected
        assert _spaces_collapsed(tokenizer.decode(torch.tensor(ids))) == expected

    def test_ids_are_in_vocabulary_and_not_padding(self, tokenizer: Tokenizer) -> None:
        for text in (*self.texts, self.unicode_text):
            ids = tokenizer.encode(text)
            assert ids, f"{text!r} encodes to nothing"
            assert all(isinstance(i, int) for i in ids), f"{text!r} gives non-int ids"
            assert all(1 <= i < tokenizer.vocab_size for i in ids), f"{text!r} -> {ids}"

    def test_decode_drops_padding_and_out_of_range_ids(self, tokenizer: Tokenizer) -> None:
        ids = tokenizer.encode(self.round_trip_text)
        noisy = [0, *ids, tokenizer.vocab_size, tokenizer.vocab_size + 7, 0, 0]
        assert tokenizer.decode(noisy) == tokenizer.decode(ids)

    def test_tokenize_pads_with_zero(self, tokenizer: Tokenizer) -> None:
        encoded = [tokenizer.encode(text) for text in self.texts]
        length = max(map(len, encoded)) + 3
        batch = tokenizer.tokenize(list(self.texts), length)
        assert batch.dtype == torch.long and batch.shape == (len(self.texts), length)
        for row, ids in zip(batch.tolist(), encoded, strict=True):
            assert row == ids + [0] * (length - len(ids))

    def test_tokenize_one_string(self, tokenizer: Tokenizer) -> None:
        batch = tokenizer.tokenize(self.texts[1], 64)
        assert batch.shape == (1, 64)
        assert batch[0, : len(tokenizer.encode(self.texts[1]))].ne(0).all()

    def test_too_long_text_is_an_error(self, tokenizer: Tokenizer) -> None:
        text, count = self.long_text(tokenizer)
        context = count - 3
        with pytest.raises(ValueError) as error:
            tokenizer.tokenize(["two cats", "a cube", text], context)
        message = str(error.value)
        assert re.search(r"\b2\b", message), f"the error does not name text 2: {message}"
        assert str(count) in message and str(context) in message, message

    def test_truncate_text(self, tokenizer: Tokenizer) -> None:
        text, count = self.long_text(tokenizer)
        context = count - 3
        batch = tokenizer.tokenize([text], context, truncate_text=True)
        assert batch[0].tolist() == tokenizer.encode(text)[:context]

    def test_empty_text(self, tokenizer: Tokenizer) -> None:
        assert tokenizer.decode(tokenizer.encode("")).strip() == ""
        batch = tokenizer.tokenize(["", "two cats"], 8)
        assert batch.shape == (2, 8) and batch.dtype == torch.long

    def test_unicode_and_control_characters(self, tokenizer: Tokenizer) -> None:
        ids = tokenizer.encode(self.unicode_text)
        assert isinstance(tokenizer.decode(ids), str)
        batch = tokenizer.tokenize([self.unicode_text], len(ids))
        assert batch[0].tolist() == ids

    def test_save_and_load_round_trip(self, tokenizer: Tokenizer, tmp_path: Path) -> None:
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        loaded = load_tokenizer(tmp_path / "tokenizer")
        assert type(loaded) is type(tokenizer)
        assert loaded.vocab_size == tokenizer.vocab_size
        for text in (*self.texts, self.unicode_text):
            assert loaded.encode(text) == tokenizer.encode(text), text
        texts = [*self.texts, self.unicode_text]
        assert torch.equal(loaded.tokenize(texts, 128, True), tokenizer.tokenize(texts, 128, True))
