"""``dalle-train vae``: train a DiscreteVAE on a folder of images (or the built-in shapes).

The flags of upstream ``train_vae.py`` are accepted in their spelling too; the Gumbel
temperature anneals as there (``--starting_temp``, ``--temp_min``, ``--anneal_rate``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from dalle_core import DiscreteVAE
from dalle_train.commands.common import (
    add_data_flags,
    add_run_flags,
    add_training_flags,
    fit,
    load_model,
    prepare_run,
)
from dalle_train.config import ImageData, Section, TrainConfig, option
from dalle_train.datasets import image_dataset, make_batches
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.tasks.vae import VaeTask, VaeTraining


@dataclass(frozen=True)
class VaeModel(Section):
    """The DiscreteVAE's shape and losses (fixed when resuming)."""

    image_size: int = option(fixed=True)
    num_tokens: int = option(fixed=True)
    num_layers: int = option(fixed=True)
    num_resnet_blocks: int = option(fixed=True)
    emb_dim: int = option(fixed=True)
    hidden_dim: int = option(fixed=True)
    smooth_l1_loss: bool = option(fixed=True)
    kl_loss_weight: float = option(fixed=True)
    straight_through: bool = option(fixed=True)
    reinmax: bool = option(fixed=True)


@dataclass(frozen=True)
class VaeConfig(TrainConfig):
    """``dalle-train vae``'s configuration."""

    data: ImageData
    model: VaeModel
    task: VaeTraining


def register(subparsers: Any) -> None:
    """Add ``dalle-train vae``."""
    parser = subparsers.add_parser("vae", help="train a discrete VAE on images",
                                   description=__doc__.split("\n\n")[0])
    add_data_flags(parser, folder_flag="--image-folder", captions=False)
    model = parser.add_argument_group("model (defaults as upstream train_vae.py)")
    add_flag(model, "--image-size", type=int, default=128, help="image side in pixels (default 128)")
    add_flag(model, "--num-tokens", type=int, default=8192, help="codebook size (default 8192)")
    add_flag(model, "--num-layers", type=int, default=3, help="downsamplings (codes per side: size / 2**N)")
    add_flag(model, "--num-resnet-blocks", type=int, default=2, help="(default 2)")
    add_flag(model, "--emb-dim", type=int, default=512, help="codebook dimension (default 512)")
    add_flag(model, "--hidden-dim", type=int, default=256, help="(default 256)")
    add_flag(model, "--smooth-l1-loss", action="store_true", help="smooth L1 instead of MSE")
    add_flag(model, "--kl-loss-weight", type=float, default=0.0, help="weight of the KL to uniform codes")
    add_flag(model, "--straight-through", action="store_true", help="hard Gumbel-softmax samples")
    add_flag(model, "--reinmax", action="store_true", help="ReinMax gradient estimator")
    anneal = parser.add_argument_group("temperature annealing (as upstream)")
    add_flag(anneal, "--starting-temp", type=float, default=1.0, help="(default 1.0)")
    add_flag(anneal, "--temp-min", type=float, default=0.5, help="(default 0.5)")
    add_flag(anneal, "--anneal-rate", type=float, default=1e-6, help="(default 1e-6)")
    add_flag(parser, "--num-images-save", type=int, default=4, help="images in each reconstruction grid")
    add_run_flags(parser, default_out="vae-run")
    add_training_flags(parser, batch_size=8, learning_rate=1e-3, clip_grad_norm=None, schedule="exponential")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit code."""
    run_ = prepare_run(VaeConfig.from_args(args))
    config = run_.config
    shape = config.model
    if shape.image_size % 2 ** shape.num_layers:
        raise TrainError(f"--image-size {shape.image_size} must be divisible by 2**--num-layers "
                         f"({2 ** shape.num_layers})")
    if run_.resume_from is not None:
        model = load_model(DiscreteVAE, run_.resume_from)
    else:
        model = DiscreteVAE(
            image_size=shape.image_size, num_tokens=shape.num_tokens, codebook_dim=shape.emb_dim,
            num_layers=shape.num_layers, num_resnet_blocks=shape.num_resnet_blocks,
            hidden_dim=shape.hidden_dim,
            channels=4 if config.data.transparent else 3, smooth_l1_loss=shape.smooth_l1_loss,
            kl_div_loss_weight=shape.kl_loss_weight, straight_through=shape.straight_through,
            reinmax=shape.reinmax,
        )
    model = model.to(run_.device)
    if config.optim.compile:
        model.compile()
    dataset = image_dataset(config.data, config.optim.seed, image_size=model.image_size,
                            channels=model.channels)
    task = VaeTask(model, config.task, run_.device, dataset)
    return fit(task, make_batches(dataset, config.optim, config.data, run_.backend, run_.device), run_)
