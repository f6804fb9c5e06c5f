"""Picking the tokenizer and the VAE plugins from command-line flags (``dalle``, ``generate``).

Flags, with the upstream scripts' spellings and meanings:

=================================  ===============================================================
``--tokenizer NAME``               any registered tokenizer (``dalle-train plugins`` lists them)
``--bpe_path FILE``                alone: a YouTokenToMe model (``yttm``), or a Hugging Face
                                   ``.json`` file (``hf``: upstream's YouTokenToMe could not read
                                   one); with ``--hug``: Hugging Face (``hf``); with ``--tokenizer
                                   NAME`` or ``--chinese``: that tokenizer's file
``--chinese``                      the ``chinese`` tokenizer (bert-base-chinese vocabulary)
(none)                             ``bpe`` (CLIP's BPE) when dalle-tokenizers is installed, else
                                   dalle-core's ``bytes``
``--vae NAME``                     any registered VAE, built by name (``openai``, ``vqgan``, ...)
``--vae-path DIR``                 a VAE saved with ``save_pretrained`` (or a ``dalle-train vae``
                                   run directory: its newest checkpoint), whatever plugin saved it
``--taming``                       Taming Transformers' VQGAN (``vqgan``); its weights are
                                   ``--vqgan_model_path`` (.ckpt) and ``--vqgan_config_path``
                                   (.yaml), or the default pretrained VQGAN when both are left out
=================================  ===============================================================

Combinations that cannot work (``--hug`` without a file, ``--taming`` with a saved
DiscreteVAE, VQGAN files for another VAE, ...) and unknown names are `TrainError` one-liners.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from safetensors import SafetensorError

from dalle_core.interfaces import Tokenizer
from dalle_core.plugins import (
    create_tokenizer,
    create_vae,
    default_tokenizer_name,
    load_vae,
    saved_vae_name,
)
from dalle_train.config import Section, option
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.training.layout import find_model_dir

#: the keyword that tokenizer plugins reading a file (``hf``, ``yttm``, ...) take for it
BPE_PATH_KEYWORD = "bpe_path"
#: tokenizers that cannot work without a file
FILE_TOKENIZERS = ("hf", "yttm")
#: the keywords of the ``vqgan`` plugin for its weights and its config
VQGAN_MODEL_KEYWORD = "vqgan_model_path"
VQGAN_CONFIG_KEYWORD = "vqgan_config_path"
#: VAEs of dalle-vae-taming: what ``--taming`` means
TAMING_VAES = ("vqgan", "gumbel-vqgan")
#: ``tokenizer_from_args(default=AUTO)``: ``bpe`` when installed, else ``bytes``
AUTO = "auto"

#: what building a plugin or loading a checkpoint raises for a problem of the user's inputs
LOAD_ERRORS = (KeyError, ValueError, TypeError, ImportError, OSError, SafetensorError)

T = TypeVar("T")
_told_about_default = False


@dataclass(frozen=True)
class TokenizerFlags(Section):
    """The tokenizer flags as given (they shape the model: fixed when resuming)."""

    tokenizer: str | None = option(None, fixed=True)
    bpe_path: str | None = option(None, fixed=True)
    hug: bool = option(False, fixed=True)
    chinese: bool = option(False, fixed=True)


@dataclass(frozen=True)
class VaeFlags(Section):
    """The VAE flags as given (they shape the model: fixed when resuming)."""

    vae: str | None = option(None, fixed=True)
    vae_path: str | None = option(None, fixed=True)
    taming: bool = option(False, fixed=True)
    vqgan_model_path: str | None = option(None, fixed=True)
    vqgan_config_path: str | None = option(None, fixed=True)


class TokenizerChoice(NamedTuple):
    """The tokenizer the flags ask for: a registered ``name`` (None: no flag given) and the
    keywords to build it with."""

    name: str | None
    kwargs: dict[str, Any]


class VAEChoice(NamedTuple):
    """The VAE the flags ask for: a registered ``name`` to build with ``kwargs``, a saved
    model directory ``path`` to load (``name``, when also given, must match what it holds),
    or neither (no VAE flag given)."""

    name: str | None
    path: Path | None
    kwargs: dict[str, Any]


def add_tokenizer_flags(
    parser: argparse.ArgumentParser, default_help: str = "bpe with dalle-tokenizers installed, else bytes"
) -> None:
    """Add ``--tokenizer``, ``--bpe-path``/``--bpe_path``, ``--hug`` and ``--chinese``, in a help
    section titled with ``default_help`` (what is used without these flags)."""
    group = parser.add_argument_group(f"tokenizer (default: {default_help})")
    add_flag(group, "--tokenizer", metavar="NAME",
             help="a registered tokenizer, e.g. bpe, hf, yttm, chinese, bytes (see dalle-train plugins)")
    add_flag(group, "--bpe-path", metavar="FILE",
             help="the tokenizer's file: a YouTokenToMe model (yttm), or a Hugging Face "
                  "tokenizer.json with --hug")
    add_flag(group, "--hug", action="store_true",
             help="--bpe_path is a Hugging Face tokenizers JSON file (tokenizer hf)")
    add_flag(group, "--chinese", action="store_true",
             help="the Chinese BERT tokenizer (tokenizer chinese)")


def add_vae_flags(parser: argparse.ArgumentParser, default_help: str | None = None) -> None:
    """Add ``--vae``, ``--vae-path``, ``--taming``, ``--vqgan-model-path``, ``--vqgan-config-path``
    (each also spelled with underscores), in a help section titled with ``default_help``."""
    group = parser.add_argument_group(f"VAE (default: {default_help})" if default_help else "VAE")
    add_flag(group, "--vae", metavar="NAME",
             help="a registered VAE built by name, e.g. openai, vqgan (see dalle-train plugins)")
    add_flag(group, "--vae-path", metavar="DIR",
             help="a saved VAE: a model directory (config.json) or a dalle-train vae output "
                  "directory (its newest checkpoint)")
    add_flag(group, "--taming", action="store_true",
             help="Taming Transformers' VQGAN (VAE vqgan, from dalle-vae-taming)")
    add_flag(group, "--vqgan-model-path", metavar="CKPT",
             help="VQGAN weights (.ckpt), with --taming; default: the pretrained ImageNet VQGAN")
    add_flag(group, "--vqgan-config-path", metavar="YAML",
             help="VQGAN config (.yaml) going with --vqgan_model_path")


def tokenizer_choice(flags: TokenizerFlags) -> TokenizerChoice:
    """Read the tokenizer flags; impossible combinations are a `TrainError`."""
    name, path = flags.tokenizer, flags.bpe_path
    if flags.hug and flags.chinese:
        raise TrainError(
            "--hug (a Hugging Face tokenizer JSON file) and --chinese (a BERT vocabulary) "
            "contradict each other: drop one"
        )
    if flags.hug and path is None:
        raise TrainError("--hug reads a Hugging Face tokenizer JSON file: give it with --bpe_path FILE")
    implied, flag = None, None
    if flags.hug:
        implied, flag = "hf", "--hug"
    elif flags.chinese:
        implied, flag = "chinese", "--chinese"
    elif path is not None and name is None:
        implied = "hf" if Path(path).suffix.lower() == ".json" else "yttm"
    if name is not None and implied is not None and name != implied:
        raise TrainError(
            f"--tokenizer {name} contradicts {flag} (which means --tokenizer {implied}): drop one"
        )
    name = name or implied
    if name in FILE_TOKENIZERS and path is None:
        raise TrainError(f"--tokenizer {name} reads a file: give it with --bpe_path FILE")
    kwargs = {BPE_PATH_KEYWORD: str(path)} if path is not None else {}
    return TokenizerChoice(name, kwargs)


def tokenizer_from_args(flags: TokenizerFlags, default: str | None = AUTO) -> Tokenizer | None:
    """The tokenizer the flags pick, built through the plugin registry.

    Without a tokenizer flag: the tokenizer registered as ``default``; `AUTO` is ``bpe`` when
    dalle-tokenizers is installed and usable, else dalle-core's ``bytes`` (said once on stderr);
    None gives None (e.g. ``generate``, where the checkpoint brings its tokenizer).
    """
    name, kwargs = tokenizer_choice(flags)
    flag = _tokenizer_flags(flags)
    if name is None:
        if default is None:
            return None
        name, flag = (_auto_tokenizer() if default == AUTO else default), "default tokenizer"
    return as_train_error(flag, lambda: create_tokenizer(name, **kwargs))


def vae_choice(flags: VaeFlags) -> VAEChoice:
    """Read the VAE flags; impossible combinations are a `TrainError`.

    ``--vae-path`` is resolved with `find_model_dir` (so a training run's directory works);
    when ``--taming`` or ``--vae`` come with it, the saved VAE must be of that kind.
    """
    name, taming = flags.vae, flags.taming
    files = {
        keyword: str(value)
        for keyword, value in (
            (VQGAN_MODEL_KEYWORD, flags.vqgan_model_path),
            (VQGAN_CONFIG_KEYWORD, flags.vqgan_config_path),
        )
        if value is not None
    }
    if taming:
        if name is not None and name not in TAMING_VAES:
            raise TrainError(
                f"--taming picks a VQGAN ({' or '.join(TAMING_VAES)}), not --vae {name}: drop one"
            )
        name = name or TAMING_VAES[0]
    if files:
        given = " and ".join(f"--{keyword}" for keyword in files)
        if name is not None and name not in TAMING_VAES:
            raise TrainError(
                f"{given} are files of a Taming VQGAN, not of VAE {name!r}: drop them or use --taming"
            )
        if name is None:
            raise TrainError(f"{given} need --taming (they are the files of a Taming VQGAN)")
        if len(files) == 1:
            raise TrainError(
                "--vqgan_model_path (.ckpt) and --vqgan_config_path (.yaml) go together: give both, "
                "or neither for the default pretrained VQGAN"
            )
    if flags.vae_path is None:
        return VAEChoice(name, None, files)
    if files:
        raise TrainError(
            f"--vae_path {flags.vae_path} already holds a VAE's weights: drop --vqgan_model_path and "
            f"--vqgan_config_path, or --vae_path"
        )
    directory = find_model_dir(flags.vae_path)
    saved = _saved_vae_name(directory)
    if name is not None and saved != name and not (taming and saved in TAMING_VAES):
        what = "--taming" if taming else f"--vae {name}"
        raise TrainError(
            f"{what} does not match --vae_path {flags.vae_path}, which holds VAE {saved!r}: "
            f"drop {what}, or give the path of a {name} VAE"
        )
    return VAEChoice(saved, directory, {})


def vae_from_args(flags: VaeFlags, default: str | None = None) -> Any | None:
    """The VAE the flags pick: loaded from ``--vae-path``, or built by name through the plugin
    registry (``--vae``, ``--taming`` with the VQGAN files as keywords); without a VAE flag
    the VAE registered as ``default``, or None when ``default`` is None."""
    name, path, kwargs = vae_choice(flags)
    if path is not None:
        return as_train_error(f"--vae_path {flags.vae_path}", lambda: load_vae(path))
    if name is None:
        if default is None:
            return None
        name = default
    return as_train_error(vae_flag(flags, name), lambda: create_vae(name, **kwargs))


def vae_flag(flags: VaeFlags, default: str | None = None) -> str:
    """The VAE flag the user gave, as typed (for messages); ``default VAE <name>`` for none."""
    if flags.vae_path is not None:
        return f"--vae_path {flags.vae_path}"
    if flags.taming:
        return "--taming"
    return f"--vae {flags.vae}" if flags.vae else f"default VAE {default}"


def _saved_vae_name(directory: Path) -> str:
    try:
        return saved_vae_name(directory)
    except (OSError, ValueError) as error:
        raise TrainError(f"--vae_path {directory}: {error}") from error


def _tokenizer_flags(flags: TokenizerFlags) -> str:
    """The tokenizer flags given, as the user would have typed them (for messages)."""
    given = [f"--tokenizer {flags.tokenizer}" if flags.tokenizer else "",
             f"--bpe_path {flags.bpe_path}" if flags.bpe_path else "",
             "--hug" if flags.hug else "", "--chinese" if flags.chinese else ""]
    return " ".join(flag for flag in given if flag)


def _auto_tokenizer() -> str:
    global _told_about_default
    name = default_tokenizer_name()
    if name == "bpe":
        return name
    if not _told_about_default:
        _told_about_default = True
        print(
            "dalle-train: no tokenizer chosen and dalle-tokenizers is not installed: using "
            "dalle-core's 'bytes' tokenizer (one id per UTF-8 byte); pip install dalle-tokenizers "
            "for CLIP's BPE, or pick one with --tokenizer NAME",
            file=sys.stderr,
        )
    return "bytes"


def as_train_error(flag: str, build: Callable[[], T]) -> T:
    """``build()``, with the errors of unknown, unusable or misconfigured plugins and of
    unreadable checkpoints as a `TrainError` that starts with the flag the user gave."""
    try:
        return build()
    except LOAD_ERRORS as error:
        # KeyError's str() is the repr of its message; the message itself reads better
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise TrainError(f"{flag}: {message}") from error
