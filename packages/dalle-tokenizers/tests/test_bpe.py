"""The default ``bpe`` tokenizer: CLIP's ids, the upstream tokenizer's behaviour, speed paths
checked against the plain reference on random text."""

from __future__ import annotations

import gzip
import random
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_core.plugins import load_tokenizer
from dalle_core.testing import TokenizerConformance
from dalle_tokenizers import BPETokenizer, ReferenceBPETokenizer
from dalle_tokenizers.clip_vocab import (
    END_OF_TEXT_ID,
    EXCLAMATION_ID,
    VOCAB_SIZE,
    WORD_PATTERN,
    bpe_merge,
    bpe_merge_heap,
    default_merges_path,
    load_vocabulary,
)
from dalle_tokenizers.text import clean_text, fast_clean_text

BPE = BPETokenizer()
REFERENCE = ReferenceBPETokenizer()
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)

#: text with everything the cleaning treats specially: HTML entities, controls, line breaks,
#: accents, CJK, emoji, combining marks, and the ``!`` whose CLIP id is 0
awkward_text = st.lists(
    st.one_of(
        st.sampled_from([*string.printable, "&amp;", "&lt;", "&#39;", "!", "\x00", "\x07", "\x1b",
                         "\x7f", "\r\n", "\u2028", "\xa0", "Ã©", "ﬁ", "e\u0301"]),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=60,
).map("".join)


def normalised(text: str) -> str:
    """What the BPE keeps of a text: cleaned, split into CLIP's words, one space between them."""
    return " ".join(WORD_PATTERN.findall(clean_text(text)))


class TestBPETokenizer(TokenizerConformance):
    def make_tokenizer(self) -> BPETokenizer:
        return BPETokenizer()


def test_ids_are_clips() -> None:
    # openai/CLIP: clip.tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407, 0...]
    assert BPE.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert BPE.encode("A  Photo of a CAT\n") == [320, 1125, 539, 320, 2368]
    assert BPE.vocab_size == VOCAB_SIZE == 49408


def test_exclamation_mark_leaves_zero_to_padding() -> None:
    # CLIP's id of a "!" inside a word is 0, which would be padding; here it is EXCLAMATION_ID
    ids = BPE.encode("!$")  # "!" stays alone before "$": CLIP ids [0, 259]
    assert EXCLAMATION_ID in ids and 0 not in ids
    assert ids == [EXCLAMATION_ID, 259] and BPE.decode(ids) == "!$"
    assert BPE.decode([*ids, END_OF_TEXT_ID, 0]) == "!$"


def test_html_and_mojibake_are_fixed_as_upstream() -> None:
    assert BPE.decode(BPE.encode("Tom &amp; Jerry &lt;3")) == "tom & jerry < 3"  # digits are words
    assert BPE.encode("cafÃ©") == BPE.encode("café")  # ftfy repairs mis-decoded UTF-8


@PROPERTY
@given(awkward_text)
def test_round_trip_of_normalised_text(text: str) -> None:
    expected = normalised(text)
    assert BPE.decode(BPE.encode(text)) == expected
    assert BPE.decode(BPE.encode(expected)) == expected


@PROPERTY
@given(awkward_text)
def test_equal_to_the_plain_reference(text: str) -> None:
    assert BPE.encode(text) == REFERENCE.encode(text)


@PROPERTY
@given(st.text(alphabet=st.sampled_from(string.printable + "&;#\x00\x01\x08\x0b\x0e\x1b\x1f\x7f"),
               max_size=80))
def test_fast_cleaning_equals_ftfy_cleaning(text: str) -> None:
    assert fast_clean_text(text) == clean_text(text)


@PROPERTY
@given(st.text(alphabet="abcdeilnorst日本é", min_size=1, max_size=50))
def test_heap_merge_equals_the_upstream_loop(word: str) -> None:
    vocabulary = load_vocabulary(default_merges_path())
    assert vocabulary.word_ids(word) == vocabulary.word_ids(word, bpe_merge)


def test_heap_merge_on_overlapping_pairs() -> None:
    ranks = {("a", "a"): 0, ("aa", "a"): 1, ("b", "a"): 2}
    for word in ("aaa", "aaaa", "aaaaa", "baaab", "ababa"):
        assert bpe_merge_heap(tuple(word), ranks) == bpe_merge(tuple(word), ranks), word


def test_very_long_word_and_text() -> None:
    generator = random.Random(0)
    word = "".join(generator.choice(string.ascii_lowercase) for _ in range(20_000))
    ids = BPE.encode(word)  # one word: the merge is O(n log n), upstream's loop is quadratic
    assert BPE.decode(ids) == word and len(ids) < len(word)
    text = " ".join(["a small red cube on a wooden table"] * 5_000)
    batch = BPE.tokenize([text, "two cats"], 256, truncate_text=True)
    assert batch.shape == (2, 256) and batch[0].ne(0).all()
    with pytest.raises(ValueError, match=r"text 0 is 40000 tokens long.*context length 256"):
        BPE.tokenize([text, "two cats"], 256)


def test_tokenize_equals_the_reference_batch() -> None:
    texts = ["a photo of a cat", "", "日本語 🐱 café", "Tom &amp; Jerry!!", "\x00\x07", " " * 5]
    expected = REFERENCE.tokenize(texts, 12, truncate_text=True)
    assert torch.equal(BPE.tokenize(texts, 12, truncate_text=True), expected)
    assert BPE.tokenize(texts[1], 4).tolist() == [[0, 0, 0, 0]]


def test_custom_merges_file_is_saved_and_reloaded(tmp_path: Path) -> None:
    merges = tmp_path / "merges.txt"
    merges.write_bytes(gzip.decompress(default_merges_path().read_bytes()))
    tokenizer = BPETokenizer(bpe_path=merges)
    assert tokenizer.encode("a photo of a cat") == BPE.encode("a photo of a cat")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "merges.txt").read_bytes() == merges.read_bytes()
    merges.unlink()  # the saved copy is what is reloaded
    loaded = load_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, BPETokenizer) and loaded.encode("two cats") == BPE.encode("two cats")


def test_default_vocabulary_is_not_copied_when_saved(tmp_path: Path) -> None:
    BPE.save_pretrained(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["tokenizer_config.json"]


def test_bad_merges_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        BPETokenizer(bpe_path=tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("#version\na b\n")
    with pytest.raises(ValueError, match="short.txt is not a CLIP merges file"):
        BPETokenizer(bpe_path=short)
    broken = tmp_path / "broken.txt"
    broken.write_text("#version\n" + "a b\n" * 10 + "abc\n" + "a b\n" * 50_000)
    with pytest.raises(ValueError, match=r"line 12 is 'abc'"):
        BPETokenizer(bpe_path=broken)
