"""``dalle-train dalle``: train a DALLE on image-text pairs (or the built-in shapes).

The flags of upstream ``train_dalle.py`` are accepted in their spelling too. Model flags
default to None here and take `MODEL_DEFAULTS` (or, when resuming, the checkpoint's values).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dalle_core import DALLE
from dalle_core.plugins import UnknownPluginError
from dalle_train.choices import add_tokenizer_flags, add_vae_flags, tokenizer_from_args, vae_from_args
from dalle_train.commands.common import (
    add_data_flags,
    add_run_flags,
    add_training_flags,
    fit,
    load_model,
    prepare_run,
)
from dalle_train.datasets import captioned_dataset, make_batches
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.tasks.dalle import DalleTask
from dalle_train.training.layout import TRAINING_STATE, find_model_dir

#: DALLE keywords and the values used when neither the command line nor a checkpoint sets them
MODEL_DEFAULTS: dict[str, Any] = {
    "dim": 512, "text_seq_len": 256, "depth": 2, "heads": 8, "dim_head": 64, "reversible": False,
    "attn_dropout": 0.0, "ff_dropout": 0.0, "loss_img_weight": 7.0, "attn_types": "full",
    "shift_tokens": True, "rotary_emb": True, "shared_attn_ids": None, "shared_ff_ids": None,
    "share_input_output_emb": False, "stable_softmax": False, "sandwich_norm": False,
    "attn_kernel": "auto",
}
#: flags that shape the model: its keywords, its VAE and its tokenizer
MODEL_FLAGS = frozenset(MODEL_DEFAULTS) | {
    "vae", "vae_path", "taming", "vqgan_model_path", "vqgan_config_path",
    "tokenizer", "bpe_path", "hug", "chinese",
}
#: flags that must equal the checkpoint's when resuming
FIXED = MODEL_FLAGS | {"dataset", "dataset_size", "image_text_folder", "transparent"}


def _ids(text: str | None) -> tuple[int, ...] | None:
    """``"0,1,0,1"`` (upstream ``--shared_attn_ids``) -> ``(0, 1, 0, 1)``."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError as error:
        raise TrainError(f"shared ids must be comma-separated integers like 0,1,0,1, got {text!r}") from error


def register(subparsers: Any) -> None:
    """Add ``dalle-train dalle``."""
    parser = subparsers.add_parser(
        "dalle", help="train DALL-E on image-text pairs", description=__doc__.split("\n\n")[0],
    )
    add_data_flags(parser, folder_flag="--image-text-folder", captions=True)
    add_vae_flags(parser)
    add_tokenizer_flags(parser)
    add_flag(parser, "--dalle-path", type=Path,
             help="start from this DALLE checkpoint; a run's checkpoint directory resumes it exactly")
    model = parser.add_argument_group("model (defaults as upstream train_dalle.py)")
    for name, kind in (("dim", int), ("text-seq-len", int), ("depth", int), ("heads", int),
                       ("dim-head", int), ("attn-dropout", float), ("ff-dropout", float),
                       ("loss-img-weight", float)):
        default = MODEL_DEFAULTS[name.replace("-", "_")]
        add_flag(model, f"--{name}", type=kind, help=f"(default {default})")
    add_flag(model, "--attn-types", help="comma-separated, cycled over layers: full, axial_row, axial_col, "
             "conv_like, sparse (default full)")
    add_flag(model, "--attn-kernel", help="attention kernel: auto, sdpa, flex, triton, ...")
    for name in ("reversible", "shift-tokens", "rotary-emb", "share-input-output-emb", "stable-softmax",
                 "sandwich-norm"):
        default = MODEL_DEFAULTS[name.replace("-", "_")]
        add_flag(model, f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                 help=f"(default {'on' if default else 'off'})")
    add_flag(model, "--shared-attn-ids", help="comma-separated layer ids sharing attention weights")
    add_flag(model, "--shared-ff-ids", help="comma-separated layer ids sharing feed-forward weights")
    add_flag(model, "--checkpointing", action="store_true", help="activation checkpointing (less memory)")
    add_flag(parser, "--null-cond-prob", type=float, default=0.0,
             help="probability of dropping the caption, for classifier-free guidance (default 0)")
    add_flag(parser, "--sample-prompts", help="prompts of the sample grids, separated by | "
             "(default: captions of the first samples)")
    # upstream named its single checkpoint file; checkpoints are OUT/checkpoints/step-N here
    add_flag(parser, "--dalle-output-file-name", help=argparse.SUPPRESS)
    add_run_flags(parser, default_out="dalle-run")
    add_training_flags(parser, batch_size=4, learning_rate=3e-4, clip_grad_norm=0.5, schedule="cosine")
    parser.set_defaults(run=run)


def fill_model_defaults(args: argparse.Namespace) -> None:
    """Model flags not given take `MODEL_DEFAULTS` (so the saved flags hold real values)."""
    for key, default in MODEL_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """DALLE keywords from the flags."""
    values = {key: getattr(args, key) for key in MODEL_DEFAULTS}
    stable = values.pop("stable_softmax")
    attn_types = tuple(t.strip() for t in str(values.pop("attn_types")).split(",") if t.strip())
    return {
        **values, "stable": stable, "attn_types": attn_types,
        "shared_attn_ids": _ids(values["shared_attn_ids"]), "shared_ff_ids": _ids(values["shared_ff_ids"]),
        "activation_checkpointing": args.checkpointing,
    }


def build_model(args: argparse.Namespace, start_from: Path | None) -> DALLE:
    """The DALLE of a checkpoint (resumed, or ``--dalle-path``), or a new one from the flags."""
    if start_from is not None:
        model = load_model(DALLE, start_from)
        model.transformer.activation_checkpointing = args.checkpointing
        return model
    tokenizer = tokenizer_from_args(args)
    vae = vae_from_args(args, default="openai")
    try:
        return DALLE(vae=vae, num_text_tokens=tokenizer.vocab_size, tokenizer=tokenizer, **model_kwargs(args))
    except (UnknownPluginError, ValueError) as error:
        raise TrainError(str(error)) from error


def start_point(args: argparse.Namespace) -> Path | None:
    """``--dalle-path``: a resumable checkpoint continues exactly (as ``--resume``); a model
    directory only gives the starting weights, so model flags cannot be given with it."""
    if args.dalle_path is None:
        return None
    model_dir = find_model_dir(args.dalle_path)
    if (model_dir / TRAINING_STATE).is_dir():
        args.resume_from = model_dir
        return None
    given = sorted(f"--{key.replace('_', '-')}" for key in args.given & MODEL_FLAGS)
    if given:
        raise TrainError(f"{', '.join(given)} cannot be combined with --dalle-path {args.dalle_path}: "
                         f"the model, its VAE and tokenizer come from that checkpoint")
    return model_dir


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit code."""
    fill_model_defaults(args)
    start_from = start_point(args)
    run_ = prepare_run(args, FIXED)
    model = build_model(args, run_.resume_from or start_from).to(run_.device)
    if args.transparent and model.channels != 4:
        raise TrainError(f"--transparent reads RGBA images, but the VAE takes {model.channels} channels: "
                         f"drop --transparent, or use a VAE trained with --transparent")
    if args.compile:
        model.transformer.compile()
    dataset = captioned_dataset(args, image_size=model.image_size, channels=model.channels)
    return fit(DalleTask(model, args, run_.device, dataset), make_batches(dataset, args), args, run_)
