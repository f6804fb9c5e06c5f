"""A prompt's token ids for a DALLE, with the two ways a prompt can fail to fit the model."""

from __future__ import annotations

import torch

from dalle_core import DALLE


class PromptError(ValueError):
    """A prompt the model cannot read; the message says why (without naming a flag or field)."""


class PromptTooLong(PromptError):
    """More tokens than the model's ``text_seq_len``."""


class UnknownTokenIds(PromptError):
    """Token ids past the model's text vocabulary: not the tokenizer it was trained with."""


def prompt_ids(prompt: str, dalle: DALLE, truncate: bool = False) -> torch.Tensor:
    """``prompt`` as ids ``[1, text_seq_len]`` with the model's tokenizer (on the CPU); a
    `PromptError` when it is longer than ``text_seq_len`` (unless ``truncate``) or holds ids the
    model does not know (a tokenizer other than the model's)."""
    try:
        text = dalle.tokenizer.tokenize([prompt], dalle.text_seq_len, truncate_text=truncate)
    except ValueError as error:
        length = len(dalle.tokenizer.encode(prompt))
        raise PromptTooLong(
            f"prompt {prompt[:60]!r} is {length} tokens long, more than the model's text_seq_len "
            f"{dalle.text_seq_len}"
        ) from error
    if int(text.max()) >= dalle.num_text_tokens:
        raise UnknownTokenIds(
            f"prompt {prompt[:60]!r} has token ids the model does not know (>= {dalle.num_text_tokens})"
        )
    return text
