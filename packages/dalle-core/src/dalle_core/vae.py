"""The discrete VAE of DALL-E: images to a grid of codebook indices and back.

The encoder is a stack of stride-2 convolutions (each halves the side), optional residual
blocks and a 1x1 convolution to ``num_tokens`` logits per position. Training samples a
relaxed one-hot code per position with Gumbel-softmax (hard with ``straight_through``, or
with the ReinMax estimator), mixes the codebook vectors with it, and decodes with transposed
convolutions. At inference a code is the argmax of the logits.

Module names match the upstream DALLE-pytorch ``DiscreteVAE`` (``encoder``, ``decoder``,
``codebook``), so upstream state dicts load as they are.

Images are ``[B, C, H, W]`` floats in [0, 1]. They are normalised inside (``(x - mean) / std``
per channel) before the encoder; the decoder works in that normalised space and everything
returned as an image is mapped back to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.pretrained import PretrainedMixin

Normalization = tuple[tuple[float, ...], tuple[float, ...]]

#: upstream default: mean 0.5 / std 0.5 for RGB (to [-1, 1]), identity for a 4th (alpha) channel
DEFAULT_NORMALIZATION: Normalization = ((*((0.5,) * 3), 0), (*((0.5,) * 3), 1))


class ResBlock(nn.Module):
    """Residual block ``x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))``; ``[B, C, H, W]`` kept.
    (Every ReLU here and in the VAE runs in place on a convolution's fresh output.)"""

    def __init__(self, chan: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(chan, chan, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x


def _as_normalization(normalization: Any, channels: int) -> Normalization | None:
    """Validate ``(means, stds)`` (tuples or JSON lists) and cut them to ``channels`` entries."""
    if normalization is None:
        return None
    try:
        means, stds = normalization
        means = tuple(float(m) for m in means)
        stds = tuple(float(s) for s in stds)
    except (TypeError, ValueError) as error:
        raise ValueError(
            "normalization must be None or a pair (means, stds) of per-channel numbers, "
            f"got {normalization!r}"
        ) from error
    if len(means) < channels or len(stds) < channels:
        raise ValueError(
            f"normalization needs at least {channels} means and stds (channels={channels}), "
            f"got {len(means)} means and {len(stds)} stds; pass your own or normalization=None"
        )
    means, stds = means[:channels], stds[:channels]
    if any(s == 0 for s in stds):
        raise ValueError(f"normalization stds must be non-zero, got {stds}")
    return means, stds


class DiscreteVAE(PretrainedMixin, nn.Module):
    """Discrete VAE (DALL-E's dVAE) with a Gumbel-softmax bottleneck.

    Args:
        image_size: side of the square input images, divisible by ``2 ** num_layers``.
        num_tokens: codebook size (number of distinct image codes).
        codebook_dim: dimension of each codebook vector.
        num_layers: number of stride-2 down/up-sampling layers; codes per side is
            ``image_size // 2 ** num_layers``.
        num_resnet_blocks: residual blocks after the encoder convs and before the decoder's.
        hidden_dim: channels of the convolutional layers.
        channels: image channels (3 for RGB, 4 for RGBA).
        smooth_l1_loss: reconstruction loss is smooth L1 instead of mean squared error.
        temperature: Gumbel-softmax temperature (lower is harder); ``forward(temp=)`` overrides.
        straight_through: hard one-hot samples in the forward pass, soft gradients backward.
        reinmax: use the ReinMax estimator (arXiv 2304.08612, Algorithm 2), second-order
            accurate straight-through gradients. ReinMax samples hard codes, so it applies
            whether or not ``straight_through`` is set (upstream ignored it without it).
        kl_div_loss_weight: weight of the KL divergence of the code posterior to uniform.
        normalization: ``(means, stds)`` per channel applied to the [0, 1] inputs (the first
            ``channels`` entries are used), or None for no normalisation.
    """

    plugin_name: ClassVar[str] = "discrete"

    def __init__(
        self,
        image_size: int = 256,
        num_tokens: int = 512,
        codebook_dim: int = 512,
        num_layers: int = 3,
        num_resnet_blocks: int = 0,
        hidden_dim: int = 64,
        channels: int = 3,
        smooth_l1_loss: bool = False,
        temperature: float = 0.9,
        straight_through: bool = False,
        reinmax: bool = False,
        kl_div_loss_weight: float = 0.0,
        normalization: Sequence[Sequence[float]] | None = DEFAULT_NORMALIZATION,
    ):
        super().__init__()
        for name, value, low in (
            ("image_size", image_size, 1),
            ("num_tokens", num_tokens, 1),
            ("codebook_dim", codebook_dim, 1),
            ("num_layers", num_layers, 1),
            ("num_resnet_blocks", num_resnet_blocks, 0),
            ("hidden_dim", hidden_dim, 1),
            ("channels", channels, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if image_size % (2**num_layers) != 0:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2 ** num_layers = {2**num_layers} "
                f"(num_layers={num_layers} stride-2 layers each halve the side)"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        norm = _as_normalization(normalization, channels)

        self.image_size = image_size
        self.num_tokens = num_tokens
        self.codebook_dim = codebook_dim
        self.num_layers = num_layers
        self.channels = channels
        self.fmap_size = image_size // 2**num_layers
        self.temperature = temperature
        self.straight_through = straight_through
        self.reinmax = reinmax
        self.kl_div_loss_weight = kl_div_loss_weight
        self.smooth_l1_loss = smooth_l1_loss
        self.normalization = norm
        self.config = {
            "image_size": image_size,
            "num_tokens": num_tokens,
            "codebook_dim": codebook_dim,
            "num_layers": num_layers,
            "num_resnet_blocks": num_resnet_blocks,
            "hidden_dim": hidden_dim,
            "channels": channels,
            "smooth_l1_loss": smooth_l1_loss,
            "temperature": temperature,
            "straight_through": straight_through,
            "reinmax": reinmax,
            "kl_div_loss_weight": kl_div_loss_weight,
            "normalization": None if norm is None else [list(norm[0]), list(norm[1])],
        }

        # per-channel statistics as [1, C, 1, 1] buffers (not saved: they live in config)
        means, stds = norm if norm is not None else ((0.0,) * channels, (1.0,) * channels)
        self.register_buffer("norm_mean", torch.tensor(means).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(stds).view(1, -1, 1, 1), persistent=False)

        self.codebook = nn.Embedding(num_tokens, codebook_dim)

        has_resblocks = num_resnet_blocks > 0
        enc_chans = [channels] + [hidden_dim] * num_layers
        dec_chans = [codebook_dim if not has_resblocks else hidden_dim] + [hidden_dim] * num_layers

        enc_layers: list[nn.Module] = []
        dec_layers: list[nn.Module] = []
        for enc_in, enc_out, dec_in, dec_out in zip(
            enc_chans[:-1], enc_chans[1:], dec_chans[:-1], dec_chans[1:]
        ):
            # each halves / doubles the side: [B, in, S, S] -> [B, out, S/2, S/2] and back
            enc_layers.append(
                nn.Sequential(nn.Conv2d(enc_in, enc_out, 4, stride=2, padding=1), nn.ReLU(inplace=True))
            )
            dec_layers.append(
                nn.Sequential(
                    nn.ConvTranspose2d(dec_in, dec_out, 4, stride=2, padding=1), nn.ReLU(inplace=True)
                )
            )
        for _ in range(num_resnet_blocks):
            dec_layers.insert(0, ResBlock(hidden_dim))
            enc_layers.append(ResBlock(hidden_dim))
        if has_resblocks:
            dec_layers.insert(0, nn.Conv2d(codebook_dim, hidden_dim, 1))
        enc_layers.append(nn.Conv2d(hidden_dim, num_tokens, 1))  # -> logits [B, num_tokens, f, f]
        dec_layers.append(nn.Conv2d(hidden_dim, channels, 1))  # -> image [B, C, H, W]

        self.encoder = nn.Sequential(*enc_layers)
        self.decoder = nn.Sequential(*dec_layers)

    # -- normalisation -----------------------------------------------------------------------

    def norm(self, images: Tensor) -> Tensor:
        """[0, 1] images ``[B, C, H, W]`` -> the normalised space the encoder works in."""
        if self.normalization is None:
            return images
        return (images - self.norm_mean.to(images)) / self.norm_std.to(images)

    def denorm(self, images: Tensor) -> Tensor:
        """Decoder output (normalised space) ``[B, C, H, W]`` -> images in [0, 1] (clamped)."""
        if self.normalization is not None:
            images = images * self.norm_std.to(images) + self.norm_mean.to(images)
        return images.clamp(0.0, 1.0)

    # -- validation --------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        expected = f"[B, {self.channels}, {self.image_size}, {self.image_size}]"
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor {expected}, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(
                f"images must be a 4-D tensor {expected}, got shape {list(images.shape)}"
            )
        _, c, h, w = images.shape
        if c != self.channels or h != self.image_size or w != self.image_size:
            raise ValueError(
                f"images must have shape {expected} (channels={self.channels}, "
                f"image_size={self.image_size}), got {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point in [0, 1], got dtype {images.dtype} "
                "(convert uint8 images with images.float() / 255)"
            )

    def _check_codes(self, codes: Tensor) -> None:
        seq_len = self.fmap_size**2
        expected = f"[B, {seq_len}] (fmap_size {self.fmap_size} squared)"
        if not isinstance(codes, Tensor):
            raise TypeError(f"codes must be a LongTensor {expected}, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != seq_len:
            raise ValueError(f"codes must have shape {expected}, got {list(codes.shape)}")
        if codes.numel() > 0:
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.num_tokens:
                raise ValueError(
                    f"codes must be in [0, {self.num_tokens}) (num_tokens={self.num_tokens}), "
                    f"got values from {low} to {high}"
                )

    # -- public API --------------------------------------------------------------------------

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W]`` in [0, 1] -> codes ``LongTensor[B, fmap_size ** 2]``.

        The code of each position is the argmax of the encoder logits (no sampling); the model
        is put in eval mode for the call and its mode restored after.
        """
        was_training = self.training
        self.eval()
        try:
            logits = self(images, return_logits=True)  # [B, num_tokens, f, f]
        finally:
            self.train(was_training)
        return logits.argmax(dim=1).flatten(1)  # [B, f * f]

    def decode(self, img_seq: Tensor) -> Tensor:
        """codes ``LongTensor[B, fmap_size ** 2]`` -> images ``[B, C, H, W]`` in [0, 1]."""
        self._check_codes(img_seq)
        b, f = img_seq.shape[0], self.fmap_size
        embeds = self.codebook(img_seq.long())  # [B, f * f, d]
        embeds = embeds.transpose(1, 2).reshape(b, self.codebook_dim, f, f)  # [B, d, f, f]
        return self.denorm(self.decoder(embeds))  # [B, C, H, W]

    def _sample_codes(self, logits: Tensor, temp: float) -> Tensor:
        """Relaxed one-hot codes ``[B, num_tokens, f, f]`` from logits of the same shape."""
        if self.reinmax:
            # ReinMax (arXiv 2304.08612, Algorithm 2): a hard sample D ~ softmax(logits) forward,
            # a second-order accurate gradient backward. Gumbel argmax of logits / temp samples
            # from softmax(logits) whatever temp is.
            hard = F.gumbel_softmax(logits, tau=temp, dim=1, hard=True).detach()  # D
            pi0 = logits.softmax(dim=1)
            pi1 = (hard + (logits / temp).softmax(dim=1)) / 2
            pi1 = ((pi1.clamp(min=1e-20).log() - logits).detach() + logits).softmax(dim=1)
            pi2 = 2 * pi1 - 0.5 * pi0
            return pi2 - pi2.detach() + hard
        return F.gumbel_softmax(logits, tau=temp, dim=1, hard=self.straight_through)

    def forward(
        self,
        img: Tensor,
        return_loss: bool = False,
        return_recons: bool = False,
        return_logits: bool = False,
        temp: float | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Encode, sample codes, decode.

        Args:
            img: images ``[B, C, H, W]`` in [0, 1].
            return_loss: return the training loss (reconstruction + weighted KL) instead of
                the reconstruction.
            return_recons: with ``return_loss``, return ``(loss, recons)``.
            return_logits: return the encoder logits ``[B, num_tokens, f, f]`` only.
            temp: Gumbel-softmax temperature for this call (default ``self.temperature``).

        Returns:
            logits, or reconstructions ``[B, C, H, W]`` in [0, 1], or the scalar loss, or
            ``(loss, recons)``. The loss compares in the normalised space, before clamping.
        """
        self._check_images(img)
        x = self.norm(img)  # [B, C, H, W]
        logits = self.encoder(x)  # [B, num_tokens, f, f]
        if return_logits:
            return logits

        temp = self.temperature if temp is None else temp
        one_hot = self._sample_codes(logits, temp)  # [B, num_tokens, f, f]
        sampled = torch.einsum("bnhw,nd->bdhw", one_hot, self.codebook.weight)  # [B, d, f, f]
        out = self.decoder(sampled)  # [B, C, H, W], normalised space

        if not return_loss:
            return self.denorm(out)

        loss_fn = F.smooth_l1_loss if self.smooth_l1_loss else F.mse_loss
        recon_loss = loss_fn(out, x)

        # KL(q(z|x) || uniform), summed over positions and codes, averaged over the batch
        # (upstream meant 'batchmean' but divided by 1, i.e. summed over the batch too)
        log_qy = F.log_softmax(logits.flatten(2), dim=1)  # [B, num_tokens, f * f]
        kl_div = (log_qy.exp() * (log_qy + math.log(self.num_tokens))).sum() / img.shape[0]
        loss = recon_loss + kl_div * self.kl_div_loss_weight

        if not return_recons:
            return loss
        return loss, self.denorm(out)
