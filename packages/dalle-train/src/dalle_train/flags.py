"""Flags with their upstream spellings: ``--image-text-folder`` is also ``--image_text_folder``.

The upstream scripts (``train_dalle.py``, ``train_vae.py``, ``generate.py``) spelled flags with
underscores; every flag here accepts both spellings, so their users only change the command.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_flag(parser: argparse.ArgumentParser | Any, name: str, *aliases: str, **kwargs: Any) -> Any:
    """Add ``--some-flag`` with its ``--some_flag`` spelling and any extra ``aliases``.

    ``dest`` is the dashed name with underscores (``some_flag``) unless given. The aliases
    other than the underscored twin are also named in the help text, ``(also --alias)``.
    """
    assert name.startswith("--") and "_" not in name, f"flag {name} must be spelled with dashes"
    spellings = [name]
    underscored = "--" + name[2:].replace("-", "_")
    for alias in (underscored, *aliases):
        if alias not in spellings:
            spellings.append(alias)
    kwargs.setdefault("dest", name[2:].replace("-", "_"))
    extra = [s for s in spellings[1:] if s != underscored]
    if extra and kwargs.get("help") not in (None, argparse.SUPPRESS):
        kwargs["help"] += f" (also {', '.join(extra)})"
    return parser.add_argument(*spellings, **kwargs)
