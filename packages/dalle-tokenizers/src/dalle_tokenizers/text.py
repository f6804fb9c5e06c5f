"""Caption cleaning of the CLIP tokenizer: ftfy, HTML unescaping, whitespace, lower case.

`clean_text` is the upstream ``SimpleTokenizer`` cleaning, written plainly. `fast_clean_text`
gives exactly the same result and skips ftfy for the common case where ftfy cannot change
anything: printable ASCII without ``&`` (ftfy only alters ASCII text through HTML entities,
line breaks and control characters, all of which it needs ``&`` or a control character for).
"""

from __future__ import annotations

import html
import re

import ftfy
import regex

# ASCII characters ftfy.fix_text may change or drop: C0 controls except tab, line feed and
# form feed (which `" ".join(text.split())` then treats as spaces), DEL, and "&" (HTML entities)
_FTFY_SENSITIVE_ASCII = re.compile(r"[\x00-\x08\x0b\x0d-\x1f\x7f&]")
_WHITESPACE = regex.compile(r"\s+")


def clean_text(text: str) -> str:
    """ftfy fix, HTML unescape (twice), whitespace runs to one space, stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def fast_clean_text(text: str) -> str:
    """`clean_text`, without ftfy and HTML unescaping when they provably change nothing."""
    if text.isascii() and not _FTFY_SENSITIVE_ASCII.search(text):
        return " ".join(text.split()).lower()
    return clean_text(text)
