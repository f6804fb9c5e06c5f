"""`VQGanVAE`: a pretrained Taming Transformers VQGAN as a dalle image VAE."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dalle_core.download import RemoteFile, resolve
from dalle_core.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, load_state_strict, read_config
from dalle_vae_taming.checkpoint import load_into, load_lightning_state_dict, require_torch_file
from dalle_vae_taming.config import VQGanSpec, parse_vqgan_config
from dalle_vae_taming.network import LOSS_PREFIX, TamingVQGAN, require_taming
from dalle_vae_taming.sources import DEFAULT_PRETRAINED, PRETRAINED

Location = str | os.PathLike[str]


class VQGanVAE(PretrainedMixin, nn.Module):
    """Taming Transformers' pretrained VQGAN (or Gumbel-VQGAN) as a dalle image VAE.

    ``VQGanVAE()`` loads the ImageNet f16 model with 1024 codes (256 px, 16 x 16 codes),
    downloaded once into the cache (see `dalle_core.download`). Any other taming model:
    ``VQGanVAE(vqgan_model_path="last.ckpt", vqgan_config_path="model.yaml")`` (local paths or
    http(s) URLs). ``pretrained=`` names another published model of
    `dalle_vae_taming.sources.PRETRAINED`.

    ``image_size``, ``channels``, the downsampling factor ``f = 2 ** (len(ch_mult) - 1)``
    (``downsampling_factor``; ``num_layers`` is its log2), ``num_tokens`` (``n_embed``) and
    ``fmap_size = image_size // f`` all come from the config.

    Encoding and decoding run in batches of ``encode_batch_size`` images, in the VAE's own
    precision (fp32 unless you cast it) with autocast switched off.
    """

    plugin_name = "vqgan"
    distribution = "dalle-vae-taming"

    def __init__(
        self,
        vqgan_model_path: Location | None = None,
        vqgan_config_path: Location | None = None,
        cache_dir: Location | None = None,
        *,
        pretrained: str = DEFAULT_PRETRAINED,
    ):
        super().__init__()
        require_taming()  # before downloading hundreds of MB
        if (vqgan_model_path is None) != (vqgan_config_path is None):
            raise ValueError(
                "pass both vqgan_model_path (the .ckpt) and vqgan_config_path (its .yaml), or neither "
                f"to use the published {pretrained!r} model"
            )
        origin: dict[str, Any] = {}
        if vqgan_model_path is None or vqgan_config_path is None:
            if pretrained not in PRETRAINED:
                raise ValueError(
                    f"unknown pretrained VQGAN {pretrained!r}; valid names: {', '.join(PRETRAINED)}"
                )
            vqgan_config_path, vqgan_model_path = PRETRAINED[pretrained].config, PRETRAINED[pretrained].model
            origin["pretrained"] = pretrained
        config_path, config_source = _resolve(
            vqgan_config_path, "vqgan_config_path", cache_dir, _check_config
        )
        model_path, model_source = _resolve(
            vqgan_model_path, "vqgan_model_path", cache_dir, _check_downloaded_checkpoint
        )

        spec = parse_vqgan_config(config_path.read_text(), where=str(config_path))
        self._build(spec, {**origin, "config": config_source, "model": model_source})
        state = load_lightning_state_dict(model_path)
        load_into(self.model, state, model_path, str(config_path), skip_prefix=LOSS_PREFIX)
        self.eval()

    def _build(self, spec: VQGanSpec, source: dict[str, Any]) -> None:
        """Create the (randomly initialised) network and the attributes read from ``spec``."""
        self.spec = spec
        self.model = TamingVQGAN(spec)
        self.image_size = spec.image_size
        self.channels = spec.channels
        self.num_tokens = spec.n_embed
        self.fmap_size = spec.fmap_size
        self.downsampling_factor = spec.downsampling_factor
        self.num_layers = spec.num_layers
        self.is_gumbel = spec.is_gumbel
        self.encode_batch_size = 32
        # saved in config.json: the YAML itself and where the weights came from
        self.config = {"vqgan_config": spec.yaml_text, "source": source}

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VQGanVAE:
        """Rebuild a VQGanVAE written by ``save_pretrained`` (no download: the config and the
        weights are in ``directory``). This is the ``loader`` of the ``vqgan`` plugin."""
        require_taming()
        directory = Path(directory)
        meta = read_config(directory)
        expected_class = f"{cls.__module__}.{cls.__qualname__}"
        if meta["class"] != expected_class:
            raise ValueError(f"{directory / CONFIG_NAME} holds a {meta['class']}, not a {expected_class}")
        config = meta["config"]
        missing = [key for key in ("vqgan_config", "source") if key not in config]
        if missing:
            raise ValueError(f"{directory / CONFIG_NAME}: config lacks {', '.join(missing)}")
        spec = parse_vqgan_config(
            config["vqgan_config"], where=f"{directory / CONFIG_NAME} (config.vqgan_config)"
        )
        vae = cls.__new__(cls)
        nn.Module.__init__(vae)
        vae._build(spec, config["source"])
        load_state_strict(vae, directory / WEIGHTS_NAME)
        return vae.eval().to(map_location)

    def extra_repr(self) -> str:
        kind = "GumbelVQ" if self.is_gumbel else "VQModel"
        return (
            f"{kind}, image_size={self.image_size}, channels={self.channels}, "
            f"f={self.downsampling_factor}, num_tokens={self.num_tokens}, fmap_size={self.fmap_size}"
        )

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` in [0, 1] -> codes ``LongTensor[B, fmap_size ** 2]``.

        Mapped to [-1, 1] (taming's input range); encoded without gradients, in batches.
        """
        expected = [self.channels, self.image_size, self.image_size]
        if images.dim() != 4 or list(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [batch, {', '.join(map(str, expected))}] (this VQGAN's "
                f"channels and image size, from its config), got {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            pixels = images.to(self._dtype()) * 2 - 1  # [B, C, H, W] in [-1, 1]
            codes = [self.model.encode_codes(chunk) for chunk in pixels.split(self.encode_batch_size)]
        return torch.cat(codes).flatten(1)  # [B, h, w] -> [B, h * w]

    def decode(self, img_seq: Tensor) -> Tensor:
        """Codes ``LongTensor[B, fmap_size ** 2]`` -> images ``[B, C, H, W]`` in [0, 1] (float32)."""
        n = self.fmap_size**2
        if img_seq.dim() != 2 or img_seq.shape[1] != n or img_seq.is_floating_point():
            raise ValueError(
                f"codes must be an integer tensor [batch, {n}] ({self.fmap_size} x {self.fmap_size} "
                f"codes per image), got {img_seq.dtype} {list(img_seq.shape)}"
            )
        if img_seq.numel() and (img_seq.min() < 0 or img_seq.max() >= self.num_tokens):
            raise ValueError(
                f"codes must be in [0, {self.num_tokens}), got values in "
                f"[{img_seq.min().item()}, {img_seq.max().item()}]"
            )
        grid = img_seq.long().view(-1, self.fmap_size, self.fmap_size)  # [B, h, w]
        with torch.autocast(img_seq.device.type, enabled=False):
            images = torch.cat(
                [self.model.decode_codes(chunk) for chunk in grid.split(self.encode_batch_size)]
            )
        return (images.float().clamp(-1, 1) + 1) * 0.5  # [-1, 1] -> [0, 1]


def _resolve(
    location: RemoteFile | Location, flag: str, cache_dir: Location | None, check: Callable[[Path], None]
) -> tuple[Path, dict[str, Any]]:
    """A local file for ``location`` (a published file, a URL or a path) and its source record."""
    local = resolve(
        location,
        argument=flag,
        cache_dir=cache_dir,
        check=check,
        alternative="pass local files with vqgan_config_path= and vqgan_model_path=",
    )
    return local.path, local.record()


def _check_config(path: Path) -> None:
    """Reject a downloaded config that is not a taming VQGAN config (e.g. an HTML error page)."""
    parse_vqgan_config(path.read_text(errors="replace"), where=f"downloaded file {path}")


def _check_downloaded_checkpoint(path: Path) -> None:
    """Reject a downloaded checkpoint that is not a PyTorch file (e.g. an HTML error page)."""
    require_torch_file(path, f"downloaded file {path}")
