"""``dalle-train clip``: train CLIP on image-text pairs (the upstream project had no script).

The tokenizer is saved in ``OUT/tokenizer``; rank a DALLE's images with a CLIP trained on the
same tokenizer (``dalle-train generate --clip-path``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any

from dalle_core import CLIP
from dalle_core.plugins import load_tokenizer
from dalle_train.choices import TokenizerFlags, add_tokenizer_flags, tokenizer_from_args
from dalle_train.commands.common import (
    add_data_flags,
    add_run_flags,
    add_training_flags,
    fit,
    load_model,
    prepare_run,
)
from dalle_train.config import CaptionedData, Section, TrainConfig, option
from dalle_train.datasets import captioned_dataset, make_batches, split_held_out
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.tasks.clip import ClipTask

TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class ClipModel(Section):
    """CLIP's keywords (fixed when resuming), each a flag with this default."""

    dim_text: int = option(512, fixed=True)
    dim_image: int = option(512, fixed=True)
    dim_latent: int = option(512, fixed=True)
    text_enc_depth: int = option(6, fixed=True)
    text_heads: int = option(8, fixed=True)
    text_seq_len: int = option(256, fixed=True)
    visual_enc_depth: int = option(6, fixed=True)
    visual_heads: int = option(8, fixed=True)
    visual_image_size: int = option(256, fixed=True)
    visual_patch_size: int = option(32, fixed=True)


@dataclass(frozen=True)
class ClipTraining(Section):
    """The pairs held out of training to measure retrieval (fixed: they are not trained on)."""

    eval_size: int = option(fixed=True)


@dataclass(frozen=True)
class ClipConfig(TrainConfig):
    """``dalle-train clip``'s configuration."""

    data: CaptionedData
    model: ClipModel
    tokenizer: TokenizerFlags
    task: ClipTraining


def register(subparsers: Any) -> None:
    """Add ``dalle-train clip``."""
    parser = subparsers.add_parser("clip", help="train CLIP on image-text pairs",
                                   description=__doc__.split("\n\n")[0])
    add_data_flags(parser, folder_flag="--image-text-folder", captions=True)
    add_tokenizer_flags(parser)
    model = parser.add_argument_group("model")
    for item in fields(ClipModel):
        add_flag(model, "--" + item.name.replace("_", "-"), type=int, default=item.default,
                 help=f"(default {item.default})")
    add_flag(parser, "--eval-size", type=int, default=32,
             help="pairs held out of training to measure retrieval accuracy (default 32)")
    add_run_flags(parser, default_out="clip-run")
    add_training_flags(parser, batch_size=32, learning_rate=3e-4, clip_grad_norm=1.0, schedule="cosine")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit code."""
    run_ = prepare_run(ClipConfig.from_args(args))
    config = run_.config
    if config.data.wds or config.data.tokens:
        raise TrainError("dalle-train clip reads folders (and --dataset shapes), not --wds or --tokens "
                         "shards yet: convert --wds shards with dalle-train shards, or train DALLE from them")
    if run_.resume_from is not None:
        model = load_model(CLIP, run_.resume_from)
        tokenizer = load_tokenizer(run_.out / TOKENIZER_DIR)
    else:
        tokenizer = tokenizer_from_args(config.tokenizer)
        model = CLIP(num_text_tokens=tokenizer.vocab_size, channels=4 if config.data.transparent else 3,
                     **asdict(config.model))
        tokenizer.save_pretrained(run_.out / TOKENIZER_DIR)
    model = model.to(run_.device)
    if config.optim.compile:
        model.compile()
    dataset = captioned_dataset(config.data, config.optim.seed, image_size=model.visual_image_size,
                                channels=model.channels)
    train_set, held = split_held_out(dataset, config.task.eval_size)
    task = ClipTask(model, tokenizer, config.data.truncate_captions, run_.device, held)
    return fit(task, make_batches(train_set, config.optim, config.data, run_.backend, run_.device), run_)
