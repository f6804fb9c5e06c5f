"""The encoder and decoder of OpenAI's discrete VAE, written for this package.

Module and parameter names follow OpenAI's released ``dall_e`` package (``blocks.input.w``,
``blocks.group_1.block_1.res_path.conv_1.b``, ..., ``blocks.output.conv.w``), so the published
weights load into these classes; neither the ``dall-e`` package nor torchvision is needed.
The defaults are OpenAI's: 4 groups of 2 residual blocks, 256 hidden channels, 8192 codes, RGB.
Each group but the last halves (encoder) or doubles (decoder) the resolution, so the
downsampling factor is ``2 ** (group_count - 1)`` (8 for the released model).

Every convolution runs in fp32, whatever the input dtype or an enclosing autocast says.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: OpenAI's logit-Laplace epsilon: pixels are squeezed into [eps, 1 - eps] before encoding
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: Tensor) -> Tensor:
    """Pixels in [0, 1] -> [eps, 1 - eps], the range the encoder was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: Tensor) -> Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class RepairingUnpickle(nn.Module):
    """Fills attributes that pickles of the ``dall_e`` classes lack when they are unpickled.

    `nn.Module.__setstate__` already adds the hook dictionaries newer PyTorch expects; this adds
    the class's own entries of ``pickle_defaults`` (``dall_e`` kept ``group_count`` as a class
    attribute, so the published pickles do not carry it).
    """

    pickle_defaults: ClassVar[dict[str, Any]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in self.pickle_defaults.items():
            if name not in self.__dict__:
                setattr(self, name, default)


class Conv2d(RepairingUnpickle):
    """Square convolution with "same" padding, parameters ``w [n_out, n_in, kw, kw]`` and
    ``b [n_out]`` (``dall_e.utils.Conv2d``), always computed in fp32."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if kw < 1 or kw % 2 != 1:
            raise ValueError(f"kernel width kw must be odd and positive, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        if not self.w.is_meta:  # meta tensors (networks about to receive weights) need no init
            nn.init.normal_(self.w, std=(n_in * kw**2) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:  # [B, n_in, H, W] -> [B, n_out, H, W]
        return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(self.kw - 1) // 2)


class ResidualBlock(RepairingUnpickle):
    """``id_path(x) + post_gain * res_path(x)``; ``res_path`` is four (ReLU, conv) pairs
    ``n_in -> n_out / 4 -> n_out / 4 -> n_out / 4 -> n_out`` with the kernel widths of
    ``kernel_widths``, and ``post_gain = 1 / n_layers ** 2`` (``n_layers``: blocks in the net)."""

    kernel_widths: ClassVar[tuple[int, int, int, int]]

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"a residual block's n_out must be divisible by 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, self.n_hid, self.n_hid, self.n_hid, n_out)
        layers: list[tuple[str, nn.Module]] = []
        for i, kw in enumerate(self.kernel_widths):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:  # [B, n_in, H, W] -> [B, n_out, H, W]
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(ResidualBlock):
    """The encoder's residual block (``dall_e.encoder.EncoderBlock``): kernels 3, 3, 3, 1."""

    kernel_widths = (3, 3, 3, 1)


class DecoderBlock(ResidualBlock):
    """The decoder's residual block (``dall_e.decoder.DecoderBlock``): kernels 1, 3, 3, 3."""

    kernel_widths = (1, 3, 3, 3)


def _groups(
    widths: list[int],
    n_in: int,
    n_blk_per_group: int,
    block: type[ResidualBlock],
    resample: tuple[str, Callable[[], nn.Module]],
) -> list[tuple[str, nn.Sequential]]:
    """``group_1 ... group_n`` of ``widths[g]`` channels: ``n_blk_per_group`` blocks each, then
    a resampling layer (``resample``: its name and a factory) after every group but the last."""
    n_layers = len(widths) * n_blk_per_group
    groups = []
    for g, width in enumerate(widths):
        layers: list[tuple[str, nn.Module]] = []
        for i in range(n_blk_per_group):
            layers.append((f"block_{i + 1}", block(n_in, width, n_layers)))
            n_in = width
        if g < len(widths) - 1:
            layers.append((resample[0], resample[1]()))
        groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
    return groups


class Encoder(RepairingUnpickle):
    """Mapped pixels ``[B, input_channels, H, W]`` -> code logits ``[B, vocab_size, H / f, W / f]``
    with ``f = 2 ** (group_count - 1)`` (``dall_e.encoder.Encoder``; defaults are OpenAI's)."""

    pickle_defaults = {"group_count": 4}

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
    ):
        super().__init__()
        for name, value in (("group_count", group_count), ("n_hid", n_hid),
                            ("n_blk_per_group", n_blk_per_group), ("input_channels", input_channels),
                            ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"Encoder {name} must be positive, got {value}")
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        widths = [n_hid * 2**g for g in range(group_count)]  # n_hid x 1, 2, 4, 8
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(input_channels, n_hid, 7)),
            *_groups(widths, n_hid, n_blk_per_group, EncoderBlock,
                     ("pool", lambda: nn.MaxPool2d(kernel_size=2))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], vocab_size, 1)),
            ]))),
        ]))

    def config(self) -> dict[str, int]:
        """The constructor keywords that rebuild this architecture."""
        return {
            "group_count": int(self.group_count), "n_hid": int(self.n_hid),
            "n_blk_per_group": int(self.n_blk_per_group),
            "input_channels": int(self.input_channels), "vocab_size": int(self.vocab_size),
        }

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, vocab_size, H / f, W / f]
        return self.blocks(x)


class Decoder(RepairingUnpickle):
    """One-hot codes ``[B, vocab_size, h, w]`` -> logit-Laplace statistics
    ``[B, 2 * output_channels, h * f, w * f]`` (``dall_e.decoder.Decoder``; defaults are
    OpenAI's). The first ``output_channels`` channels are the means, as logits."""

    pickle_defaults = {"group_count": 4}

    def __init__(
        self,
        group_count: int = 4,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ):
        super().__init__()
        for name, value in (("group_count", group_count), ("n_init", n_init), ("n_hid", n_hid),
                            ("n_blk_per_group", n_blk_per_group), ("output_channels", output_channels),
                            ("vocab_size", vocab_size)):
            if value < 1:
                raise ValueError(f"Decoder {name} must be positive, got {value}")
        self.group_count, self.n_init, self.n_hid = group_count, n_init, n_hid
        self.n_blk_per_group, self.output_channels, self.vocab_size = (
            n_blk_per_group, output_channels, vocab_size,
        )
        widths = [n_hid * 2**g for g in reversed(range(group_count))]  # n_hid x 8, 4, 2, 1
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(vocab_size, n_init, 1)),
            *_groups(widths, n_init, n_blk_per_group, DecoderBlock,
                     ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest"))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], 2 * output_channels, 1)),
            ]))),
        ]))

    def config(self) -> dict[str, int]:
        """The constructor keywords that rebuild this architecture."""
        return {
            "group_count": int(self.group_count), "n_init": int(self.n_init),
            "n_hid": int(self.n_hid), "n_blk_per_group": int(self.n_blk_per_group),
            "output_channels": int(self.output_channels), "vocab_size": int(self.vocab_size),
        }

    def forward(self, x: Tensor) -> Tensor:  # [B, vocab_size, h, w] -> [B, 2 C, h f, w f]
        return self.blocks(x)

    def decode_codes(self, codes: Tensor) -> Tensor:  # [B, h, w] long -> [B, 2 C, h f, w f]
        """`forward` on the one-hot encoding of ``codes``, without building it: the 1 x 1 input
        convolution of a one-hot vector is a column of its weight, so it is gathered instead
        (``B * h * w * n_init`` values instead of a ``B * vocab_size * h * w`` one-hot tensor)."""
        conv = self.blocks.input
        table = conv.w.float()[:, :, 0, 0].t()  # [vocab_size, n_init]
        x = F.embedding(codes, table) + conv.b.float()  # [B, h, w, n_init]
        x = x.permute(0, 3, 1, 2)  # [B, n_init, h, w] in channels-last memory: faster convolutions
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x
