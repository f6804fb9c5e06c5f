"""Registers ``vqgan`` (and ``gumbel-vqgan``) with dalle's VAE hook.

Nothing heavy is imported here: `dalle_vae_taming.vae` imports taming only when a model is built,
so the plugins are listed (as unusable, saying what is missing) where taming is not installed.
"""

from __future__ import annotations

from pathlib import Path

from dalle_core import hookimpl
from dalle_core.hookspecs import Register
from dalle_vae_taming.network import REQUIRES
from dalle_vae_taming.sources import GUMBEL_PRETRAINED
from dalle_vae_taming.vae import VQGanVAE


def gumbel_vqgan(cache_dir: str | Path | None = None) -> VQGanVAE:
    """Taming Transformers' Open Images Gumbel-VQGAN (f8, 8192 codes, 256 px)."""
    return VQGanVAE(cache_dir=cache_dir, pretrained=GUMBEL_PRETRAINED)


@hookimpl
def dalle_register_vaes(register: Register) -> None:
    register(
        VQGanVAE.plugin_name,
        VQGanVAE,
        loader=VQGanVAE.from_pretrained,
        requires=REQUIRES,
        description="Taming Transformers VQGAN (default ImageNet f16, 1024 codes; any .ckpt + .yaml)",
    )
    register(
        "gumbel-vqgan",
        gumbel_vqgan,
        loader=VQGanVAE.from_pretrained,
        requires=REQUIRES,
        description="Taming Transformers Gumbel-VQGAN (Open Images f8, 8192 codes)",
    )
