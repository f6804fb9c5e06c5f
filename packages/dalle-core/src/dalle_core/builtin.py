"""dalle-core's own plugin: registered like any third-party plugin, with the same `hookimpl`.

The VAE is reached through small functions that import `dalle_core.vae` when called, so
building the registries never loads model code (and `dalle_core.vae` may use the registries).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_core.attention.kernels import FlexKernel, SDPAKernel
from dalle_core.backends import SingleProcessBackend
from dalle_core.hookspecs import Register, hookimpl
from dalle_core.tokenizers import ByteTokenizer


def discrete_vae(**kwargs: Any):
    """Build a `dalle_core.vae.DiscreteVAE` (a VAE trained from scratch)."""
    from dalle_core.vae import DiscreteVAE

    return DiscreteVAE(**kwargs)


def load_discrete_vae(directory: str | Path):
    """Rebuild a `dalle_core.vae.DiscreteVAE` saved with ``save_pretrained``."""
    from dalle_core.vae import DiscreteVAE

    return DiscreteVAE.from_pretrained(directory)


@hookimpl
def dalle_register_tokenizers(register: Register) -> None:
    register(
        ByteTokenizer.plugin_name, ByteTokenizer, description="UTF-8 bytes (257 ids), no files"
    )


@hookimpl
def dalle_register_vaes(register: Register) -> None:
    register(
        "discrete",
        discrete_vae,
        loader=load_discrete_vae,
        description="DiscreteVAE trained from scratch (Gumbel-softmax codebook)",
    )


@hookimpl
def dalle_register_attention(register: Register) -> None:
    register(
        SDPAKernel.name,
        SDPAKernel,
        description="torch scaled_dot_product_attention with pattern masks; every device",
    )
    register(
        FlexKernel.name,
        FlexKernel,
        description="FlexAttention block masks, compiled; skips blocks a pattern never visits",
    )


@hookimpl
def dalle_register_backends(register: Register) -> None:
    register(SingleProcessBackend.plugin_name, SingleProcessBackend, description="one process")
