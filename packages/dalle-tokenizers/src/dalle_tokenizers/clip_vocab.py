"""The CLIP byte-level BPE vocabulary (49408 ids) and its merge rule, as the upstream project had.

The merges file is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, shipped in
``dalle_tokenizers/data`` with ``LICENSE-CLIP``). Ids are CLIP's, with one change so that id 0
can mean padding (as `dalle_core.interfaces.Tokenizer` requires):

- CLIP numbers the byte token ``!`` 0. The upstream project padded with 0 as well, so every
  ``!`` in a caption became padding (masked out, and dropped by ``decode``).
- Here ``!`` takes id 49406, CLIP's ``<|startoftext|>``, which DALL-E never uses; id 0 is
  padding only. Every other id is CLIP's (and the upstream project's). ``<|endoftext|>`` (49407)
  is never produced by `encode` and decodes to nothing.
"""

from __future__ import annotations

import functools
import gzip
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import regex

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges after the byte tokens, before 2 specials
EXCLAMATION_ID = 49406  # where "!" (CLIP id 0) lives, so that 0 is free for padding
END_OF_TEXT_ID = 49407
END_OF_WORD = "</w>"
DEFAULT_MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"

#: CLIP's pre-tokenizer (its special-token alternatives left out: captions are plain text)
WORD_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def default_merges_path() -> Path:
    """The merges file shipped with this package."""
    return Path(str(resources.files("dalle_tokenizers") / "data" / DEFAULT_MERGES_NAME))


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from each byte to a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def bpe_merge(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the adjacent pair of lowest rank, all its occurrences left to right, until no
    pair has a rank: the upstream ``SimpleTokenizer.bpe`` loop, quadratic in the word length
    (the specification `bpe_merge_heap` is tested against)."""
    word = list(word)
    while len(word) > 1:
        pairs = set(zip(word, word[1:]))
        first, second = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if (first, second) not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def bpe_merge_heap(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[str]:
    """`bpe_merge` in O(n log n): the same merges in the same order, so the same result.

    Symbols form a linked list (``after[i]``/``before[i]``, -1 at the ends) and a heap holds
    ``(rank, i)`` for each ranked pair starting at symbol ``i``. All entries of the lowest rank
    (one pair) are taken at once and merged left to right, as `bpe_merge` does in one pass;
    entries whose pair has changed since they were pushed are skipped. Merging a pair never
    creates another occurrence of that same pair, so one pass per rank suffices.
    """
    symbols = list(word)
    size = len(symbols)
    after = [*range(1, size), -1]
    before = list(range(-1, size - 1))
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
    heapq.heapify(heap)

    def push(i: int) -> None:  # the pair starting at symbol i, if it has a rank
        j = after[i]
        if j >= 0:
            rank = ranks.get((symbols[i], symbols[j]))
            if rank is not None:
                heapq.heappush(heap, (rank, i))

    while heap:
        rank = heap[0][0]
        starts = []
        while heap and heap[0][0] == rank:
            starts.append(heapq.heappop(heap)[1])
        for i in sorted(starts):  # symbol indices only grow along the list: left to right
            j = after[i]
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # merged away or changed since it was pushed
            symbols[i] += symbols[j]
            symbols[j] = None
            after[i] = after[j]
            if after[j] >= 0:
                before[after[j]] = i
            push(i)
            if before[i] >= 0:
                push(before[i])
    return [symbol for symbol in symbols if symbol is not None]


@dataclass(frozen=True)
class ClipVocabulary:
    """Token strings <-> ids and the merge ranks read from one merges file."""

    encoder: dict[str, int]  # token string (bytes as characters, "</w>" ending a word) -> id
    ranks: dict[tuple[str, str], int]  # merge pair -> priority (lower merges first)
    id_to_bytes: tuple[bytes, ...]  # id -> the bytes it decodes to, b" " ending a word

    def word_ids(self, word: str, merge: Callable[..., list[str]] = bpe_merge_heap) -> list[int]:
        """Ids of one pre-tokenized word (non-empty, no whitespace in it), merged by ``merge``
        (`bpe_merge_heap`, or the upstream loop `bpe_merge`)."""
        chars = "".join(bytes_to_unicode()[byte] for byte in word.encode("utf-8"))
        symbols = (*chars[:-1], chars[-1] + END_OF_WORD)
        return [self.encoder[token] for token in merge(symbols, self.ranks)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> words separated by single spaces; padding, ``<|endoftext|>`` and out-of-range
        ids are dropped, a split UTF-8 character becomes U+FFFD."""
        table = self.id_to_bytes
        data = b"".join(table[i] for i in map(int, ids) if 0 <= i < VOCAB_SIZE)
        return data.decode("utf-8", errors="replace").rstrip(" ")


@functools.lru_cache(maxsize=4)
def load_vocabulary(path: Path) -> ClipVocabulary:
    """Read a CLIP merges file (gzip or plain text); cached per path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE merges file {path} does not exist (expected a CLIP-style "
                                f"merges file such as {DEFAULT_MERGES_NAME})")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    bad = next((n for n, merge in enumerate(merges) if len(merge) != 2), None)
    if len(merges) < NUM_MERGES or bad is not None:
        where = f"line {bad + 2} is {lines[bad]!r}" if bad is not None else f"it has {len(merges)}"
        raise ValueError(f"{path} is not a CLIP merges file: it needs {NUM_MERGES} lines of two "
                         f"symbols after its header line, {where}")
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + END_OF_WORD for c in byte_chars), *("".join(m) for m in merges)]
    encoder = {token: index for index, token in enumerate(tokens)}
    encoder[byte_chars[0]] = EXCLAMATION_ID  # "!" leaves id 0 to padding
    byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    id_to_bytes = [b""] * VOCAB_SIZE  # 0 (padding) and END_OF_TEXT_ID decode to nothing
    for token, index in encoder.items():
        word_end = token.endswith(END_OF_WORD)
        body = token[: -len(END_OF_WORD)] if word_end else token
        id_to_bytes[index] = bytes(byte_decoder[c] for c in body) + (b" " if word_end else b"")
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    return ClipVocabulary(encoder, ranks, tuple(id_to_bytes))
