"""``dalle-train dalle``: train a DALLE on image-text pairs (or the built-in shapes).

The flags of upstream ``train_dalle.py`` are accepted in their spelling too. Model flags
default to None here and take `MODEL_DEFAULTS` (or, when resuming, the checkpoint's values).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dalle_core import DALLE
from dalle_core.attention.patterns import PATTERNS
from dalle_core.plugins import UnknownPluginError, vae_save_problem
from dalle_train.choices import (
    TokenizerFlags,
    VaeFlags,
    add_tokenizer_flags,
    add_vae_flags,
    tokenizer_from_args,
    vae_flag,
    vae_from_args,
)
from dalle_train.commands.common import (
    add_data_flags,
    add_run_flags,
    add_training_flags,
    fit,
    load_model,
    prepare_run,
)
from dalle_train.config import CaptionedData, Section, TrainConfig, option
from dalle_train.datasets import captioned_dataset, check_source, make_batches
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.tasks.dalle import DalleTask, DalleTraining
from dalle_train.training.layout import TRAINING_STATE, find_model_dir


@dataclass(frozen=True)
class DalleModel(Section):
    """DALLE keywords (fixed when resuming), defaulting as upstream ``train_dalle.py``: the
    model flags default to None on the command line, so a resumed run can take the checkpoint's
    values, and those not given take these defaults."""

    dim: int = option(512, fixed=True)
    text_seq_len: int = option(256, fixed=True)
    depth: int = option(2, fixed=True)
    heads: int = option(8, fixed=True)
    dim_head: int = option(64, fixed=True)
    reversible: bool = option(False, fixed=True)
    attn_dropout: float = option(0.0, fixed=True)
    ff_dropout: float = option(0.0, fixed=True)
    loss_img_weight: float = option(7.0, fixed=True)
    #: comma-separated, cycled over the layers
    attn_types: str = option("full", fixed=True)
    shift_tokens: bool = option(True, fixed=True)
    rotary_emb: bool = option(True, fixed=True)
    #: comma-separated layer ids, as upstream's ``--shared_attn_ids 0,1,0,1``
    shared_attn_ids: str | None = option(None, fixed=True)
    shared_ff_ids: str | None = option(None, fixed=True)
    share_input_output_emb: bool = option(False, fixed=True)
    stable_softmax: bool = option(False, fixed=True)
    sandwich_norm: bool = option(False, fixed=True)
    attn_kernel: str = option("auto", fixed=True)
    #: activation checkpointing: memory, not the model (a resumed run may change it)
    checkpointing: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DalleModel:
        values = {item.name: getattr(args, item.name) for item in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})


#: DALLE keywords and the values used when neither the command line nor a checkpoint sets them
MODEL_DEFAULTS: dict[str, Any] = {
    item.name: item.default for item in fields(DalleModel) if item.metadata.get("fixed")
}
#: flags that shape the model: its keywords, its VAE and its tokenizer
MODEL_FLAGS = frozenset(MODEL_DEFAULTS) | {item.name for item in fields(VaeFlags) + fields(TokenizerFlags)}


@dataclass(frozen=True)
class DalleConfig(TrainConfig):
    """``dalle-train dalle``'s configuration."""

    data: CaptionedData
    model: DalleModel
    vae: VaeFlags
    tokenizer: TokenizerFlags
    task: DalleTraining


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
    add_flag(model, "--attn-types", help=f"comma-separated, cycled over layers: {', '.join(PATTERNS)} "
             "(default full)")
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


def model_kwargs(model: DalleModel) -> dict[str, Any]:
    """DALLE keywords from the model section."""
    values = {key: getattr(model, key) for key in MODEL_DEFAULTS}
    stable = values.pop("stable_softmax")
    attn_types = tuple(t.strip() for t in str(values.pop("attn_types")).split(",") if t.strip())
    return {
        **values, "stable": stable, "attn_types": attn_types,
        "shared_attn_ids": _ids(values["shared_attn_ids"]), "shared_ff_ids": _ids(values["shared_ff_ids"]),
        "activation_checkpointing": model.checkpointing,
    }


def build_model(config: DalleConfig, start_from: Path | None) -> DALLE:
    """The DALLE of a checkpoint (resumed, or ``--dalle-path``), or a new one from the flags."""
    if start_from is not None:
        model = load_model(DALLE, start_from)
        model.transformer.activation_checkpointing = config.model.checkpointing
        return model
    tokenizer = tokenizer_from_args(config.tokenizer)
    vae = vae_from_args(config.vae, default="openai")
    problem = vae_save_problem(vae)
    if problem:  # found now, not at the first checkpoint
        raise TrainError(f"{vae_flag(config.vae, 'openai')}: {problem}; its checkpoints could not be used")
    try:
        return DALLE(vae=vae, num_text_tokens=tokenizer.vocab_size, tokenizer=tokenizer,
                     **model_kwargs(config.model))
    except (UnknownPluginError, ValueError) as error:
        raise TrainError(str(error)) from error


def start_point(config: DalleConfig) -> tuple[DalleConfig, Path | None]:
    """``--dalle-path``: a resumable checkpoint continues exactly (as ``--resume``: it becomes
    ``launch.resume_from``); a model directory only gives the starting weights (returned), so
    model flags cannot be given with it."""
    dalle_path = config.task.dalle_path
    if dalle_path is None:
        return config, None
    model_dir = find_model_dir(dalle_path)
    if (model_dir / TRAINING_STATE).is_dir():
        return replace(config, launch=replace(config.launch, resume_from=model_dir)), None
    given = sorted(f"--{key.replace('_', '-')}" for key in config.launch.given & MODEL_FLAGS)
    if given:
        raise TrainError(f"{', '.join(given)} cannot be combined with --dalle-path {dalle_path}: "
                         f"the model, its VAE and tokenizer come from that checkpoint")
    return config, model_dir


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit code."""
    config, start_from = start_point(DalleConfig.from_args(args))
    run_ = prepare_run(config)
    config = run_.config  # a resumed run's flags merged with its checkpoint's
    check_source(config.data)  # before a pretrained VAE is downloaded
    model = build_model(config, run_.resume_from or start_from).to(run_.device)
    if config.data.transparent and model.channels != 4:
        raise TrainError(f"--transparent reads RGBA images, but the VAE takes {model.channels} channels: "
                         f"drop --transparent, or use a VAE trained with --transparent")
    if config.optim.compile:
        model.transformer.compile()
    dataset = captioned_dataset(config.data, config.optim.seed, image_size=model.image_size,
                                channels=model.channels, vae=model.vae)
    task = DalleTask(model, config.task, config.data, config.optim.seed, run_.device, dataset)
    return fit(task, make_batches(dataset, config.optim, config.data, run_.backend, run_.device), run_)
