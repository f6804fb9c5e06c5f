"""``dalle-train convert``: turn a checkpoint of the upstream project (DALLE-pytorch) into a model
directory of this one.

    dalle-train convert vae.pt VAE_OUT                  # train_vae.py's DiscreteVAE
    dalle-train convert dalle.pt DALLE_OUT              # train_dalle.py's DALLE with its VAE
    dalle-train convert dalle-ds-cp DALLE_OUT           # a DeepSpeed checkpoint directory (ZeRO <= 2)
    dalle-train convert dalle.pt OUT --taming --vqgan_model_path vqgan.ckpt --vqgan_config_path vqgan.yaml

Files are read with torch.load(weights_only=True): tensors and plain data, never code. The
DALLE's VAE comes from the checkpoint (its DiscreteVAE, or OpenAI's VAE through the openai plugin
of dalle-vae-openai); upstream stored only the name of a VQGanVAE, so its files come from the VAE
flags, as for dalle-train dalle, and must hold the weights the checkpoint has. The tokenizer is
saved with the model: the tokenizer flags name it, as for dalle-train dalle (--bpe_path, --hug,
--chinese); without them a model of 49408 text ids gets CLIP's BPE (bpe, upstream's default)
when dalle-tokenizers is installed, and others none (then pass it to dalle-train generate).
Options that cannot be converted exactly are refused by name (see the dalle-train README).
Upstream's optimizer and scheduler states are not converted (said when present).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dalle_core.interfaces import Tokenizer
from dalle_core.plugins import create_tokenizer, default_tokenizer_name
from dalle_train.choices import (
    TokenizerFlags,
    VaeFlags,
    add_tokenizer_flags,
    add_vae_flags,
    as_train_error,
    tokenizer_choice,
    tokenizer_from_args,
)
from dalle_train.commands.common import documented_parser
from dalle_train.convert import convert
from dalle_train.convert.mapping import UPSTREAM_DEFAULTS
from dalle_train.convert.upstream import UpstreamCheckpoint

#: upstream's default tokenizer (CLIP's BPE), this project's ``bpe``, and its number of text ids
CLIP_BPE, CLIP_BPE_VOCAB_SIZE = "bpe", 49408


def register(subparsers: Any) -> None:
    """Add ``dalle-train convert``."""
    parser = documented_parser(
        subparsers,
        "convert",
        "convert an upstream DALLE-pytorch vae.pt / dalle.pt / DeepSpeed directory",
        __doc__,
    )
    parser.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help="upstream's vae.pt or dalle.pt, or a DeepSpeed checkpoint directory of its scripts",
    )
    parser.add_argument(
        "out", type=Path, metavar="OUT", help="the model directory to write (must not exist, or be empty)"
    )
    add_vae_flags(parser, default_help="the checkpoint's own; a VQGanVAE DALLE needs --taming and its files")
    add_tokenizer_flags(
        parser, default_help="bpe for 49408 text ids when dalle-tokenizers is installed, else none"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert; returns the exit code."""
    tokenizer_flags = TokenizerFlags.from_args(args)
    tokenizer_choice(tokenizer_flags)  # contradicting flags fail before anything is read

    def tokenizer_for(checkpoint: UpstreamCheckpoint) -> Tokenizer | None:
        return checkpoint_tokenizer(checkpoint, tokenizer_flags)

    convert(args.path, args.out, vae_flags=VaeFlags.from_args(args), tokenizer_for=tokenizer_for)
    return 0


def checkpoint_tokenizer(checkpoint: UpstreamCheckpoint, flags: TokenizerFlags) -> Tokenizer | None:
    """The tokenizer to save with a converted DALLE: the flags', else ``bpe`` for upstream's
    default vocabulary when it is installed, else None (said, with how to pass one later)."""
    tokenizer = tokenizer_from_args(flags, default=None)
    if tokenizer is not None:
        return tokenizer
    size = checkpoint.hparams.get("num_text_tokens", UPSTREAM_DEFAULTS["num_text_tokens"])
    if size == CLIP_BPE_VOCAB_SIZE and default_tokenizer_name() == CLIP_BPE:
        print(f"tokenizer: {CLIP_BPE} (CLIP's BPE, upstream's default for {size} text ids)")
        return as_train_error("default tokenizer", lambda: create_tokenizer(CLIP_BPE))
    why = (
        "dalle-tokenizers is not installed (pip install dalle-tokenizers for CLIP's BPE)"
        if size == CLIP_BPE_VOCAB_SIZE
        else f"{size} text ids are not upstream's default CLIP BPE"
    )
    print(
        f"note: no tokenizer saved with the model: {why}; pass the one it was trained with to convert "
        f"(--bpe_path FILE [--hug], --chinese, --tokenizer NAME) or to dalle-train generate"
    )
    return None
