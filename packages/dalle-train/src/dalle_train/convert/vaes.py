"""The VAE of an upstream checkpoint, as one of this project's VAEs.

- ``DiscreteVAE``: the keywords (``hparams`` of a vae.pt, ``vae_params`` of a dalle.pt) and the
  state dict are dalle-core's `DiscreteVAE`'s, key for key.
- ``OpenAIDiscreteVAE``: upstream's DALLE state dict holds the networks OpenAI published under
  ``vae.enc.*`` / ``vae.dec.*`` (``dall_e``'s module names); the ``openai`` plugin
  (dalle-vae-openai) has the same modules, whose sizes are read from the weights' shapes.
- ``VQGanVAE``: upstream stored only the class name (and the weights under ``vae.model.*``):
  the VQGAN comes from the VAE flags (``--taming --vqgan_model_path CKPT --vqgan_config_path
  YAML``, ``--vae vqgan``, ``--vae-path DIR``) and must hold the weights the checkpoint has.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from dalle_core import DiscreteVAE
from dalle_core.plugins import registry
from dalle_train.choices import VaeFlags, as_train_error, vae_from_args
from dalle_train.convert.upstream import DISCRETE, OPENAI, VQGAN, UpstreamCheckpoint
from dalle_train.errors import TrainError

#: upstream's pretrained VAEs encoded 256 px images (OpenAIDiscreteVAE and VQGanVAE hard-code it)
UPSTREAM_PRETRAINED_IMAGE_SIZE = 256


def vae_weights(weights: dict[str, Tensor], prefix: str = "vae.") -> dict[str, Tensor]:
    """The entries under ``prefix``, without it."""
    return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}


def discrete_vae(params: dict[str, Any], weights: dict[str, Tensor], source: str) -> DiscreteVAE:
    """dalle-core's `DiscreteVAE` from upstream's keywords and state dict (keys must match)."""
    try:
        vae = DiscreteVAE(**params)
    except (TypeError, ValueError) as error:
        raise TrainError(
            f"{source}: the DiscreteVAE keywords {params} do not build a DiscreteVAE: {error}"
        ) from error
    load_exactly(vae, weights, f"{source} (DiscreteVAE)")
    return vae.eval()


def load_exactly(module: torch.nn.Module, weights: dict[str, Tensor], what: str) -> None:
    """Load ``weights`` into ``module``: missing, unexpected or misshapen keys are a `TrainError`."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise TrainError(
            f"{what}: the weights do not fit: missing {missing[:6] or 'none'}, "
            f"unexpected {unexpected[:6] or 'none'}"
        )
    for key, value in weights.items():
        if value.shape != own[key].shape:
            raise TrainError(
                f"{what}: {key} has shape {list(value.shape)}, the model needs {list(own[key].shape)}"
            )
    module.load_state_dict({key: value.to(own[key].dtype) for key, value in weights.items()})


def openai_vae(weights: dict[str, Tensor], source: str) -> Any:
    """The ``openai`` plugin's VAE holding the networks stored under ``vae.enc.*`` / ``vae.dec.*``
    (their sizes read from the weights), with its weights saved in the converted checkpoint."""
    entry = as_train_error("VAE openai (upstream OpenAIDiscreteVAE)", lambda: registry("vaes")["openai"])
    as_train_error("VAE openai (upstream OpenAIDiscreteVAE)", entry.require_usable)
    from dalle_vae_openai.networks import Decoder, Encoder  # the plugin is installed: checked above

    enc, dec = vae_weights(weights, "vae.enc."), vae_weights(weights, "vae.dec.")
    try:
        enc_in, enc_out = (
            enc["blocks.input.w"],
            enc["blocks.output.conv.w"],
        )  # [n_hid, C, 7, 7], [V, 8 n_hid, 1, 1]
        dec_in, dec_out = (
            dec["blocks.input.w"],
            dec["blocks.output.conv.w"],
        )  # [n_init, V, 1, 1], [2 C, n_hid, 1, 1]
    except KeyError as error:
        raise TrainError(
            f"{source}: vae_class_name is OpenAIDiscreteVAE but the weights lack vae.enc.{error.args[0]} "
            f"/ vae.dec.*: the networks of OpenAI's VAE"
        ) from error

    def groups(state: dict[str, Tensor]) -> tuple[int, int]:  # (group_count, blocks per group)
        found = {m[1] for key in state if (m := re.match(r"blocks\.group_(\d+)\.", key))}
        blocks = {m[1] for key in state if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", key))}
        return len(found), len(blocks)

    enc_groups, enc_blocks = groups(enc)
    dec_groups, dec_blocks = groups(dec)
    encoder = Encoder(
        group_count=enc_groups,
        n_hid=enc_in.shape[0],
        n_blk_per_group=enc_blocks,
        input_channels=enc_in.shape[1],
        vocab_size=enc_out.shape[0],
    )
    decoder = Decoder(
        group_count=dec_groups,
        n_init=dec_in.shape[0],
        n_hid=dec_out.shape[1],
        n_blk_per_group=dec_blocks,
        output_channels=dec_out.shape[0] // 2,
        vocab_size=dec_in.shape[1],
    )
    load_exactly(encoder, enc, f"{source} (vae.enc: OpenAI's encoder)")
    load_exactly(decoder, dec, f"{source} (vae.dec: OpenAI's decoder)")
    vae = as_train_error(
        f"{source} (OpenAIDiscreteVAE)",
        lambda: entry.factory.from_networks(
            encoder, decoder, image_size=UPSTREAM_PRETRAINED_IMAGE_SIZE, save_weights=True
        ),
    )
    return vae


def vqgan_vae(weights: dict[str, Tensor], flags: VaeFlags, source: str) -> Any:
    """The VQGAN the VAE flags name, checked against the ``vae.model.*`` weights of the checkpoint."""
    if not (flags.taming or flags.vae or flags.vae_path):
        raise TrainError(
            f"{source} was trained with upstream's VQGanVAE, which it names but does not describe: give "
            f"the VQGAN it was trained with: --taming --vqgan_model_path CKPT --vqgan_config_path YAML "
            f"(--taming alone: the default pretrained ImageNet VQGAN, upstream's default too), "
            f"or --vae-path DIR"
        )
    vae = vae_from_args(flags)
    stored = vae_weights(weights, "vae.model.")
    own = {key[len("model.") :]: value for key, value in vae.state_dict().items() if key.startswith("model.")}
    if not own:
        raise TrainError(f"the VAE the flags give ({type(vae).__name__}) is not a VQGAN: {source} needs one")
    differing = [
        key
        for key, value in own.items()
        if key not in stored
        or stored[key].shape != value.shape
        or not torch.equal(stored[key].to(value), value)
    ]
    if differing:
        raise TrainError(
            f"the VQGAN given by the flags is not the one {source} was trained with: its weight "
            f"{differing[0]} differs from the checkpoint's vae.model.{differing[0]}"
            f"{f' (and {len(differing) - 1} more)' if len(differing) > 1 else ''}"
        )
    return vae


def checkpoint_vae(checkpoint: UpstreamCheckpoint, flags: VaeFlags) -> Any:
    """The VAE of a dalle.pt as one of this project's; VAE flags only where upstream needed them."""
    given = flags.vae or flags.vae_path or flags.taming or flags.vqgan_model_path or flags.vqgan_config_path
    name = checkpoint.vae_class_name
    if name != VQGAN and given:
        raise TrainError(
            f"{checkpoint.source} carries its {name}: the VAE flags (--vae, --vae-path, --taming, "
            f"--vqgan_*) are only for a DALLE trained with upstream's VQGanVAE; drop them"
        )
    if name == DISCRETE:
        return discrete_vae(checkpoint.vae_params or {}, vae_weights(checkpoint.weights), checkpoint.source)
    if name == OPENAI:
        return openai_vae(checkpoint.weights, checkpoint.source)
    return vqgan_vae(checkpoint.weights, flags, checkpoint.source)
