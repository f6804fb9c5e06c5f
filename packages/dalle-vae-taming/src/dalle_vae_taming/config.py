"""Reading Taming Transformers' YAML model configs into the few numbers a VQGAN is built from.

A taming config looks like this (the published ImageNet f16 model, abridged)::

    model:
      target: taming.models.vqgan.VQModel      # or taming.models.vqgan.GumbelVQ
      params:
        embed_dim: 256
        n_embed: 1024                           # codebook size
        ddconfig:
          double_z: false
          z_channels: 256
          resolution: 256                       # image side in pixels
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 1, 2, 2, 4]              # one entry per resolution: f = 2 ** (5 - 1) = 16
          num_res_blocks: 2
          attn_resolutions: [16]
          dropout: 0.0
        lossconfig: {...}                       # training only, ignored here

Image size, channels and the downsampling factor are read from ``ddconfig``; nothing is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

#: ``model.target`` values this package can build, and whether they quantize with Gumbel-softmax
TARGETS: dict[str, bool] = {
    "taming.models.vqgan.VQModel": False,
    "taming.models.vqgan.VQNoDiscModel": False,  # a VQModel trained without the discriminator
    "taming.models.vqgan.GumbelVQ": True,
}

#: ``ddconfig`` entries taming's Encoder and Decoder need
DDCONFIG_KEYS = (
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "in_channels",
    "resolution",
    "z_channels",
)


@dataclass(frozen=True)
class VQGanSpec:
    """What a taming config says about the VQGAN it describes.

    Attributes:
        yaml_text: the config file's content, verbatim (saved with the model).
        target: ``model.target``, e.g. ``taming.models.vqgan.VQModel``.
        ddconfig: keyword arguments of taming's ``Encoder`` and ``Decoder``.
        n_embed: codebook size.
        embed_dim: size of a codebook vector.
    """

    yaml_text: str
    target: str
    ddconfig: dict[str, Any]
    n_embed: int
    embed_dim: int

    @property
    def is_gumbel(self) -> bool:
        """Whether the model quantizes with Gumbel-softmax (``GumbelVQ``)."""
        return TARGETS[self.target]

    @property
    def image_size(self) -> int:
        """Side of the square images, in pixels (``ddconfig.resolution``)."""
        return self.ddconfig["resolution"]

    @property
    def channels(self) -> int:
        """Image channels (``ddconfig.in_channels``, equal to ``out_ch``)."""
        return self.ddconfig["in_channels"]

    @property
    def num_layers(self) -> int:
        """Number of 2x downsamplings: one fewer than the entries of ``ch_mult``."""
        return len(self.ddconfig["ch_mult"]) - 1

    @property
    def downsampling_factor(self) -> int:
        """Pixels per code along a side: ``f = 2 ** (len(ch_mult) - 1)``."""
        return 2**self.num_layers

    @property
    def fmap_size(self) -> int:
        """Codes per side: ``image_size // f``."""
        return self.image_size // self.downsampling_factor


def parse_vqgan_config(text: str, where: str) -> VQGanSpec:
    """Parse and check a taming YAML config; errors name ``where`` (the file) and the field."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from error
    model = _mapping(document, "model", where)
    target = model.get("target")
    if target not in TARGETS:
        raise ValueError(
            f"{where}: model.target is {target!r}; this is not a Taming Transformers VQGAN config "
            f"(valid targets: {', '.join(TARGETS)})"
        )
    params = _mapping(model, "params", f"{where}: model")
    if params.get("remap") is not None:
        raise ValueError(
            f"{where}: model.params.remap is set ({params['remap']!r}); VQGANs with remapped "
            f"codebook indices are not supported, remove the field or use another model"
        )
    n_embed = _positive_int(params.get("n_embed"), f"{where}: model.params.n_embed")
    embed_dim = _positive_int(params.get("embed_dim"), f"{where}: model.params.embed_dim")
    ddconfig = dict(_mapping(params, "ddconfig", f"{where}: model.params"))
    _check_ddconfig(ddconfig, f"{where}: model.params.ddconfig")
    if TARGETS[target] and embed_dim != ddconfig["z_channels"]:
        raise ValueError(
            f"{where}: a GumbelVQ needs model.params.embed_dim ({embed_dim}) equal to "
            f"ddconfig.z_channels ({ddconfig['z_channels']}): its quantizer reads the "
            f"quant_conv output as z_channels features"
        )
    return VQGanSpec(text, target, ddconfig, n_embed, embed_dim)


def _check_ddconfig(ddconfig: dict[str, Any], where: str) -> None:
    missing = [key for key in DDCONFIG_KEYS if key not in ddconfig]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (needs {', '.join(DDCONFIG_KEYS)})")
    for key in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
        _positive_int(ddconfig[key], f"{where}.{key}")
    ch_mult = ddconfig["ch_mult"]
    if not isinstance(ch_mult, list) or not ch_mult:
        raise ValueError(f"{where}.ch_mult must be a non-empty list of ints, got {ch_mult!r}")
    for index, value in enumerate(ch_mult):
        _positive_int(value, f"{where}.ch_mult[{index}]")
    if not isinstance(ddconfig["attn_resolutions"], list):
        raise ValueError(f"{where}.attn_resolutions must be a list, got {ddconfig['attn_resolutions']!r}")
    if ddconfig.get("double_z", True):  # taming's Encoder defaults to double_z=True
        raise ValueError(
            f"{where}.double_z must be false for a VQGAN (true gives 2 * z_channels encoder outputs, "
            f"which is for KL autoencoders)"
        )
    if ddconfig["in_channels"] != ddconfig["out_ch"]:
        raise ValueError(
            f"{where}: in_channels ({ddconfig['in_channels']}) and out_ch ({ddconfig['out_ch']}) "
            f"differ; an image VAE must give back the channels it takes"
        )
    factor = 2 ** (len(ch_mult) - 1)
    if ddconfig["resolution"] % factor:
        raise ValueError(
            f"{where}.resolution ({ddconfig['resolution']}) is not a multiple of the downsampling "
            f"factor {factor} (2 ** (len(ch_mult) - 1))"
        )


def _mapping(parent: Any, key: str, where: str) -> dict[str, Any]:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, dict):
        raise ValueError(f"{where} has no '{key}' mapping; this is not a Taming Transformers model config")
    return value


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where} must be a positive int, got {value!r}")
    return value
