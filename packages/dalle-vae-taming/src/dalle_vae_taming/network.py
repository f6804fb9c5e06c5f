"""Taming Transformers' VQGAN networks, assembled for inference.

taming's ``VQModel`` and ``GumbelVQ`` are PyTorch Lightning modules whose module imports
``taming.main`` (torchvision and a pytorch-lightning 1.x API) and whose constructor builds the
training loss (LPIPS, which needs torchvision). Their inference path is five submodules, built
here from taming's own classes under the same attribute names, so a Lightning checkpoint's
``state_dict`` loads into it unchanged (less the ``loss.`` entries, which hold the
discriminator and LPIPS weights used only in training):

- ``encoder`` / ``decoder``: ``taming.modules.diffusionmodules.model.Encoder`` / ``Decoder``
- ``quantize``: ``taming.modules.vqvae.quantize.VectorQuantizer2`` (VQModel) or ``GumbelQuantize``
- ``quant_conv`` / ``post_quant_conv``: 1x1 convolutions around the codebook

``tests/test_reference.py`` checks codes and images against taming's ``VQModel`` and ``GumbelVQ``.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor, nn

from dalle_vae_taming.config import VQGanSpec

#: the state-dict prefix of the training loss in Lightning checkpoints (not part of inference)
LOSS_PREFIX = "loss."

#: modules needed to build a model: taming (installed with --no-deps) and einops, which its
#: quantizer imports; the plugins declare them as ``requires``
REQUIRES = ("taming", "einops")

INSTALL_HINT = (
    "pip install einops && pip install --no-deps taming-transformers-rom1504==0.0.6 "
    "(--no-deps: its torchvision and pytorch-lightning requirements are not used here)"
)


def require_taming() -> None:
    """Raise ModuleNotFoundError saying what to install unless taming and einops import."""
    missing = [name for name in REQUIRES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"VQGanVAE needs Taming Transformers ({', '.join(missing)} not installed): {INSTALL_HINT}",
            name=missing[0],
        )


class TamingVQGAN(nn.Module):
    """The encoder, codebook and decoder of a taming ``VQModel`` or ``GumbelVQ``."""

    def __init__(self, spec: VQGanSpec):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

        self.is_gumbel = spec.is_gumbel
        z_channels = spec.ddconfig["z_channels"]
        self.encoder = Encoder(**spec.ddconfig)
        self.decoder = Decoder(**spec.ddconfig)
        if spec.is_gumbel:  # as GumbelVQ.__init__ (kl_weight only scales a training loss)
            self.quantize = GumbelQuantize(z_channels, spec.embed_dim, n_embed=spec.n_embed, temp_init=1.0)
        else:  # as VQModel.__init__
            self.quantize = VectorQuantizer2(spec.n_embed, spec.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(z_channels, spec.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(spec.embed_dim, z_channels, 1)

    def encode_codes(self, x: Tensor) -> Tensor:
        """Pixels ``[B, C, H, W]`` in [-1, 1] -> codes ``LongTensor[B, h, w]``.

        VQModel: the nearest codebook vector (``VectorQuantizer2``). GumbelVQ: the most likely
        code, the argmax of the quantizer's logits; taming's ``GumbelQuantize.forward`` instead
        samples with Gumbel noise even in eval mode, which would give a different tokenization
        of the same image on every call.
        """
        h = self.quant_conv(self.encoder(x))  # [B, embed_dim, h, w]
        if self.is_gumbel:
            return self.quantize.proj(h).argmax(dim=1)  # logits [B, n_embed, h, w] -> [B, h, w]
        _, _, (_, _, indices) = self.quantize(h)  # indices [B * h * w] (or [B * h * w, 1])
        return indices.view(h.shape[0], h.shape[2], h.shape[3])

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes ``LongTensor[B, h, w]`` -> pixels ``[B, C, H, W]``, about [-1, 1] (not clamped)."""
        codebook = self.quantize.embed if self.is_gumbel else self.quantize.embedding
        z = codebook(codes).permute(0, 3, 1, 2)  # [B, h, w, embed_dim] -> [B, embed_dim, h, w]
        return self.decoder(self.post_quant_conv(z))
