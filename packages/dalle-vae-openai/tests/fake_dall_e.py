"""Test-only stand-ins for OpenAI's ``dall_e`` package, to write files in its published format.

The classes mirror ``dall_e.utils.Conv2d``, ``dall_e.encoder.{EncoderBlock,Encoder}`` and
``dall_e.decoder.{DecoderBlock,Decoder}``: the same instance attributes (what ``attrs`` puts in
``__dict__``), the same fixed four groups, and ``group_count`` as a class attribute only, as in
the original. `published_modules` installs them under the ``dall_e`` names while pickling, and
`save_published` writes a module as ``torch.save`` did for the released ``encoder.pkl`` /
``decoder.pkl``, optionally without the attributes that PyTorch 1.7-era pickles lack.
The production loader must never need this module: it is removed from ``sys.modules`` again.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# nn.Module attributes added after PyTorch 1.7, absent from the published pickles
NEWER_MODULE_ATTRIBUTES = (
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_backward_pre_hooks",
    "_is_full_backward_hook",
)
CPU = torch.device("cpu")  # dall_e's default device


class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw, use_float16=True, device=CPU, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device)
        w.normal_(std=1 / ((n_in * kw**2) ** 0.5))
        b = torch.empty((n_out,), dtype=torch.float32, device=device).normal_(std=0.1)
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)


def _block(self, n_in, n_out, n_layers, kws, device, requires_grad):
    nn.Module.__init__(self)
    self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
    self.device, self.requires_grad = device, requires_grad
    self.n_hid = n_out // 4
    self.post_gain = 1 / (n_layers**2)
    self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
    ins = (n_in, self.n_hid, self.n_hid, self.n_hid)
    outs = (self.n_hid, self.n_hid, self.n_hid, n_out)
    layers = []
    for i in range(4):
        layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(ins[i], outs[i], kws[i]))]
    self.res_path = nn.Sequential(OrderedDict(layers))


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        _block(self, n_in, n_out, n_layers, (3, 3, 3, 1), device, requires_grad)

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        _block(self, n_in, n_out, n_layers, (1, 3, 3, 3), device, requires_grad)

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    group_count = 4  # a class attribute in dall_e: never in the pickles

    def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                 device=CPU, requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        n_layers = self.group_count * n_blk_per_group
        h = n_hid

        def group(n_first, n_out, pool):
            layers = [(f"block_{i + 1}", EncoderBlock(n_first if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            tail = [("pool", nn.MaxPool2d(kernel_size=2))] if pool else []
            return nn.Sequential(OrderedDict(layers + tail))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(input_channels, h, 7)),
            ("group_1", group(h, h, True)),
            ("group_2", group(h, 2 * h, True)),
            ("group_3", group(2 * h, 4 * h, True)),
            ("group_4", group(4 * h, 8 * h, False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(8 * h, vocab_size, 1, use_float16=False)),
            ]))),
        ]))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    group_count = 4

    def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192,
                 device=CPU, requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        n_layers = self.group_count * n_blk_per_group
        h = n_hid

        def group(n_first, n_out, upsample):
            layers = [(f"block_{i + 1}", DecoderBlock(n_first if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            tail = [("upsample", nn.Upsample(scale_factor=2, mode="nearest"))] if upsample else []
            return nn.Sequential(OrderedDict(layers + tail))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(vocab_size, n_init, 1, use_float16=False)),
            ("group_1", group(n_init, 8 * h, True)),
            ("group_2", group(8 * h, 4 * h, True)),
            ("group_3", group(4 * h, 2 * h, True)),
            ("group_4", group(2 * h, 1 * h, False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(1 * h, 2 * output_channels, 1)),
            ]))),
        ]))

    def forward(self, x):
        return self.blocks(x)


_MODULES = {
    "dall_e.utils": (Conv2d,),
    "dall_e.encoder": (EncoderBlock, Encoder),
    "dall_e.decoder": (DecoderBlock, Decoder),
}


@contextlib.contextmanager
def published_modules() -> Iterator[None]:
    """Make the classes above importable as ``dall_e.*`` (for pickling), then remove them."""
    assert "dall_e" not in sys.modules, "a real dall_e package is imported; these tests need it absent"
    originals = {cls: cls.__module__ for classes in _MODULES.values() for cls in classes}
    sys.modules["dall_e"] = types.ModuleType("dall_e")
    try:
        for name, classes in _MODULES.items():
            module = types.ModuleType(name)
            for cls in classes:
                cls.__module__ = name
                setattr(module, cls.__name__, cls)
            sys.modules[name] = module
        yield
    finally:
        for name in ("dall_e", *_MODULES):
            sys.modules.pop(name, None)
        for cls, module in originals.items():
            cls.__module__ = module


def save_published(
    module: nn.Module, *, legacy_format: bool = False, strip_new_attributes: bool = True
) -> bytes:
    """The bytes ``torch.save(module)`` gives with ``module``'s classes at their ``dall_e``
    names; ``strip_new_attributes`` removes what PyTorch 1.7-era module pickles did not have."""
    module = copy.deepcopy(module)
    if strip_new_attributes:
        for sub in module.modules():
            for name in NEWER_MODULE_ATTRIBUTES:
                sub.__dict__.pop(name, None)
            if isinstance(sub, nn.Upsample):
                sub.__dict__.pop("recompute_scale_factor", None)
    buffer = io.BytesIO()
    with published_modules(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Couldn't retrieve source code", UserWarning)  # legacy format
        torch.save(module, buffer, _use_new_zipfile_serialization=not legacy_format)
    return buffer.getvalue()
