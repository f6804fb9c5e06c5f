"""A toy patch VAE for dalle, registered as ``--vae toy``, written the way plugin authors often
write one: a plain ``nn.Module`` with diffusers-style ``save_pretrained(dir)`` /
``from_pretrained(dir)`` writing its own ``config.json`` (no fields of dalle's), and nothing of
dalle-core imported. Two broken variants exist for tests of what dalle refuses:
``toy-forgetful`` (``from_pretrained`` forgets ``shift``, so a reloaded VAE gives other codes)
and ``toy-unsaveable`` (built by a function, with no loader: a saved one cannot be rebuilt).
"""

from __future__ import annotations

import json
from pathlib import Path

import pluggy
import torch
from torch import Tensor, nn

hookimpl = pluggy.HookimplMarker("dalle")

CONFIG = "config.json"
WEIGHTS = "weights.pt"


class ToyVAE(nn.Module):
    """Each ``patch`` square of an image becomes the nearest of ``num_tokens`` codebook vectors;
    codes are then rotated by ``shift`` (a setting that only the config carries)."""

    def __init__(self, image_size: int = 32, patch: int = 8, num_tokens: int = 32, dim: int = 8,
                 shift: int = 0):
        super().__init__()
        self.settings = {"image_size": image_size, "patch": patch, "num_tokens": num_tokens, "dim": dim,
                         "shift": shift}
        self.image_size, self.channels, self.num_tokens = image_size, 3, num_tokens
        self.fmap_size = image_size // patch
        self.shift = shift
        self.encoder = nn.Conv2d(3, dim, patch, stride=patch)
        self.codebook = nn.Embedding(num_tokens, dim)
        self.decoder = nn.ConvTranspose2d(dim, 3, patch, stride=patch)

    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> codes [B, fmap_size ** 2]"""
        expected = [3, self.image_size, self.image_size]
        if images.ndim != 4 or list(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {expected}], got {list(images.shape)}")
        features = self.encoder(images * 2 - 1).flatten(2).transpose(1, 2)  # [B, N, dim]
        codebook = self.codebook.weight  # [num_tokens, dim]
        distances = codebook.pow(2).sum(-1) - 2 * features @ codebook.T  # [B, N, num_tokens]
        return (distances.argmin(dim=-1) + self.shift) % self.num_tokens

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, fmap_size ** 2] -> images [B, 3, H, W] in [0, 1]"""
        codes = (codes - self.shift) % self.num_tokens
        grid = self.codebook(codes).transpose(1, 2).unflatten(2, (self.fmap_size, self.fmap_size))
        return torch.sigmoid(self.decoder(grid))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (this VAE's own settings) and ``weights.pt``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG).write_text(json.dumps(self.settings, indent=2))
        torch.save(self.state_dict(), directory / WEIGHTS)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ToyVAE:
        """Rebuild what `save_pretrained` wrote."""
        directory = Path(directory)
        vae = cls(**json.loads((directory / CONFIG).read_text()))
        vae.load_state_dict(torch.load(directory / WEIGHTS, weights_only=True))
        return vae


def forgetful_loader(directory: str | Path) -> ToyVAE:
    """A buggy loader: it rebuilds the VAE without its ``shift``."""
    settings = json.loads((Path(directory) / CONFIG).read_text())
    vae = ToyVAE(**{**settings, "shift": 0})
    vae.load_state_dict(torch.load(Path(directory) / WEIGHTS, weights_only=True))
    return vae


def forgetful(**kwargs) -> ToyVAE:
    """`ToyVAE` with ``shift`` 3 unless given."""
    return ToyVAE(**{"shift": 3, **kwargs})


def unsaveable(**kwargs) -> ToyVAE:
    """`ToyVAE` built by a function, registered without a loader."""
    return ToyVAE(**kwargs)


@hookimpl
def dalle_register_vaes(register):
    register("toy", ToyVAE, description="toy patch VAE (dalle-train's tests)")
    register("toy-forgetful", forgetful, loader=forgetful_loader, description="toy VAE whose loader forgets")
    register("toy-unsaveable", unsaveable, description="toy VAE that cannot be reloaded")
