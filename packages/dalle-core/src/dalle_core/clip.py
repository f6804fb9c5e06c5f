"""A small CLIP: contrastive text and image encoders, used to rank DALL-E's generations.

Text tokens and image patches go through their own bidirectional transformer `Encoder`, are
mean-pooled (text over its unpadded tokens), projected to a shared latent space and
L2-normalised. The score of a (text, image) pair is their cosine similarity times a learned
temperature ``exp(t)``; training pulls matching pairs of a batch together with a symmetric
cross-entropy (InfoNCE) over the ``[B, B]`` similarity matrix.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.encoder import Encoder
from dalle_core.pretrained import PretrainedMixin


class CLIP(PretrainedMixin, nn.Module):
    """Contrastive text-image model with the upstream DALLE-pytorch keywords.

    Args:
        dim_text: width of the text encoder.
        dim_image: width of the image encoder.
        dim_latent: width of the shared latent space.
        num_text_tokens: text vocabulary size.
        text_enc_depth: blocks in the text encoder.
        text_seq_len: longest text accepted (positions embedded).
        text_heads: attention heads of the text encoder.
        num_visual_tokens: unused; kept for compatibility with the upstream signature.
        visual_enc_depth: blocks in the image encoder.
        visual_heads: attention heads of the image encoder.
        visual_image_size: side of the square input images, divisible by the patch size.
        visual_patch_size: side of the square patches the image is cut into.
        channels: image channels.

    Images are ``[B, channels, visual_image_size, visual_image_size]`` in [0, 1] (the range
    `DiscreteVAE.decode` returns); text is ``LongTensor[B, N]`` with ``N <= text_seq_len``,
    padded with 0 where ``text_mask`` is False.
    """

    plugin_name: ClassVar[str] = "clip"

    def __init__(
        self,
        *,
        dim_text: int = 512,
        dim_image: int = 512,
        dim_latent: int = 512,
        num_text_tokens: int = 10000,
        text_enc_depth: int = 6,
        text_seq_len: int = 256,
        text_heads: int = 8,
        num_visual_tokens: int = 512,
        visual_enc_depth: int = 6,
        visual_heads: int = 8,
        visual_image_size: int = 256,
        visual_patch_size: int = 32,
        channels: int = 3,
    ):
        super().__init__()
        self.config = {
            "dim_text": dim_text,
            "dim_image": dim_image,
            "dim_latent": dim_latent,
            "num_text_tokens": num_text_tokens,
            "text_enc_depth": text_enc_depth,
            "text_seq_len": text_seq_len,
            "text_heads": text_heads,
            "num_visual_tokens": num_visual_tokens,
            "visual_enc_depth": visual_enc_depth,
            "visual_heads": visual_heads,
            "visual_image_size": visual_image_size,
            "visual_patch_size": visual_patch_size,
            "channels": channels,
        }
        for name, value in self.config.items():
            low = 0 if name.endswith("depth") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if visual_image_size % visual_patch_size != 0:
            raise ValueError(
                f"visual_image_size {visual_image_size} must be divisible by visual_patch_size "
                f"{visual_patch_size}"
            )

        self.num_text_tokens = num_text_tokens
        self.text_seq_len = text_seq_len
        self.visual_image_size = visual_image_size
        self.visual_patch_size = visual_patch_size
        self.channels = channels
        num_patches = (visual_image_size // visual_patch_size) ** 2
        patch_dim = channels * visual_patch_size**2

        self.text_emb = nn.Embedding(num_text_tokens, dim_text)
        self.text_pos_emb = nn.Embedding(text_seq_len, dim_text)
        self.text_transformer = Encoder(dim_text, text_enc_depth, heads=text_heads)
        self.to_text_latent = nn.Linear(dim_text, dim_latent, bias=False)

        self.to_visual_embedding = nn.Linear(patch_dim, dim_image)
        self.visual_pos_emb = nn.Embedding(num_patches, dim_image)
        self.visual_transformer = Encoder(dim_image, visual_enc_depth, heads=visual_heads)
        self.to_visual_latent = nn.Linear(dim_image, dim_latent, bias=False)

        self.temperature = nn.Parameter(torch.tensor(1.0))  # logit scale is exp(temperature)

    # -- validation --------------------------------------------------------------------------

    def _check_text(self, text: Tensor, text_mask: Tensor | None) -> None:
        expected = f"[B, N] with 1 <= N <= text_seq_len={self.text_seq_len}"
        if not isinstance(text, Tensor):
            raise TypeError(f"text must be a LongTensor {expected}, got {type(text).__name__}")
        if text.dtype.is_floating_point or text.dtype.is_complex or text.dtype == torch.bool:
            raise ValueError(f"text must be integer token ids, got dtype {text.dtype}")
        if text.ndim != 2 or not 1 <= text.shape[1] <= self.text_seq_len:
            raise ValueError(f"text must have shape {expected}, got {list(text.shape)}")
        if text_mask is not None and text_mask.shape != text.shape:
            raise ValueError(
                f"text_mask must have the shape of text {list(text.shape)}, "
                f"got {list(text_mask.shape)}"
            )

    def _check_image(self, image: Tensor) -> None:
        size = self.visual_image_size
        expected = f"[B, {self.channels}, {size}, {size}]"
        if not isinstance(image, Tensor):
            raise TypeError(f"image must be a tensor {expected}, got {type(image).__name__}")
        if image.ndim != 4 or tuple(image.shape[1:]) != (self.channels, size, size):
            raise ValueError(
                f"image must have shape {expected} (channels={self.channels}, "
                f"visual_image_size={size}), got {list(image.shape)}"
            )
        if not image.is_floating_point():
            raise ValueError(f"image must be floating point in [0, 1], got dtype {image.dtype}")

    # -- encoders ----------------------------------------------------------------------------

    def embed_text(self, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """Token ids ``[B, N]`` (and mask ``[B, N]``, True = real) -> unit latents ``[B, L]``."""
        self._check_text(text, text_mask)
        n = text.shape[1]
        positions = torch.arange(n, device=text.device)
        x = self.text_emb(text) + self.text_pos_emb(positions)  # [B, N, dim_text]
        if text_mask is not None:
            text_mask = text_mask.bool()
        x = self.text_transformer(x, mask=text_mask)  # [B, N, dim_text]
        if text_mask is None:
            pooled = x.mean(dim=1)  # [B, dim_text]
        else:
            weights = text_mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
            # an all-padding row pools to zeros (and scores 0) instead of NaN
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, dim]
        return F.normalize(self.to_text_latent(pooled), dim=-1)  # [B, dim_latent]

    def patchify(self, image: Tensor) -> Tensor:
        """``[B, C, S, S] -> [B, (S/p)**2, p * p * C]``, patches row-major, pixels (p1 p2 c)."""
        b, c, s, _ = image.shape
        p = self.visual_patch_size
        g = s // p
        patches = image.reshape(b, c, g, p, g, p)  # [B, C, h, p1, w, p2]
        patches = patches.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p1, p2, C]
        return patches.reshape(b, g * g, p * p * c)  # [B, h * w, p1 * p2 * C]

    def embed_image(self, image: Tensor) -> Tensor:
        """Images ``[B, C, S, S]`` in [0, 1] -> unit latents ``[B, dim_latent]``."""
        self._check_image(image)
        x = self.to_visual_embedding(self.patchify(image))  # [B, P, dim_image]
        positions = torch.arange(x.shape[1], device=image.device)
        x = x + self.visual_pos_emb(positions)  # [B, P, dim_image]
        x = self.visual_transformer(x)  # [B, P, dim_image]
        return F.normalize(self.to_visual_latent(x.mean(dim=1)), dim=-1)  # [B, dim_latent]

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        text_mask: Tensor | None = None,
        return_loss: bool = False,
    ) -> Tensor:
        """Score pairs, or compute the contrastive loss.

        Args:
            text: token ids ``[B, N]``.
            image: images ``[B, C, S, S]`` in [0, 1]; row i pairs with text row i.
            text_mask: ``[B, N]``, True for real tokens (padding is ignored when pooling).
            return_loss: return the symmetric cross-entropy over all ``B x B`` pairs.

        Returns:
            scores ``[B]`` (scaled cosine similarity of text i and image i, for ranking), or
            the scalar loss.
        """
        self._check_text(text, text_mask)
        self._check_image(image)
        if text.shape[0] != image.shape[0]:
            raise ValueError(
                f"text and image must have the same batch size, got {text.shape[0]} texts "
                f"and {image.shape[0]} images"
            )
        text_latents = self.embed_text(text, text_mask)  # [B, L]
        image_latents = self.embed_image(image)  # [B, L]
        scale = self.temperature.exp()

        if not return_loss:
            return (text_latents * image_latents).sum(dim=-1) * scale  # [B]

        sim = text_latents @ image_latents.t() * scale  # [B, B]: text i vs image j
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
