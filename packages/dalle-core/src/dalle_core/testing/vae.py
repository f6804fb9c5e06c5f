"""The conformance suite every image VAE plugin must pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dalle_core.interfaces import ImageVAE
from dalle_core.plugins import load_vae, save_vae


class VAEConformance:
    """Shapes, ranges, input checks and save/load of an `ImageVAE`: subclass it and define
    `make_vae` (a small, randomly initialised instance keeps the suite fast)::

        class TestMyVAE(VAEConformance):
            def make_vae(self):
                return MyVAE(image_size=32, num_tokens=64)

    The save/load test saves as a DALLE checkpoint does (`dalle_core.plugins.save_vae`: the
    VAE's own ``save_pretrained``, whatever files it writes, plus a record of the plugin that
    made it) and reloads through `dalle_core.plugins.load_vae`, so the VAE's plugin must be
    registered (its package installed) and know the VAE: `make_vae` builds it with
    ``create_vae(name, ...)``, or its class is the registered factory, or it has the registered
    ``plugin_name``. The plugin reloads it with its ``loader`` metadata or its factory's
    ``from_pretrained(directory)``; nothing of dalle-core needs to be subclassed.
    Override the ``vae`` fixture instead of `make_vae` to add setup or teardown.
    """

    batch_size: int = 2

    def make_vae(self) -> nn.Module:
        """The VAE under test."""
        raise NotImplementedError(f"{type(self).__name__} must define make_vae()")

    @pytest.fixture
    def vae(self) -> nn.Module:
        return self.make_vae().eval()

    def images(self, vae: ImageVAE, channels: int | None = None, size: int | None = None) -> Tensor:
        """Seeded random images in [0, 1], ``[batch_size, C, H, W]`` (the VAE's by default)."""
        channels = vae.channels if channels is None else channels
        size = vae.image_size if size is None else size
        generator = torch.Generator().manual_seed(0)
        return torch.rand(self.batch_size, channels, size, size, generator=generator)

    def test_attributes_are_positive_ints(self, vae: nn.Module) -> None:
        assert isinstance(vae, nn.Module)
        assert isinstance(vae, ImageVAE), "missing attributes or methods of dalle_core ImageVAE"
        for name in ("image_size", "channels", "num_tokens", "fmap_size"):
            value = getattr(vae, name)
            assert isinstance(value, int) and not isinstance(value, bool), f"{name} is {value!r}"
            assert value > 0, f"{name} is {value}"

    @torch.no_grad()
    def test_codes_per_image(self, vae: ImageVAE) -> None:
        codes = vae.get_codebook_indices(self.images(vae))
        assert codes.dtype == torch.long
        assert codes.shape == (self.batch_size, vae.fmap_size**2)
        assert codes.min() >= 0 and codes.max() < vae.num_tokens

    @torch.no_grad()
    def test_decode_gives_images_in_unit_range(self, vae: ImageVAE) -> None:
        generator = torch.Generator().manual_seed(0)
        shape = (self.batch_size, vae.fmap_size**2)
        codes = torch.randint(0, vae.num_tokens, shape, generator=generator)
        images = vae.decode(codes)
        assert images.shape == (self.batch_size, vae.channels, vae.image_size, vae.image_size)
        assert torch.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1

    @torch.no_grad()
    def test_encode_decode_keeps_shape(self, vae: ImageVAE) -> None:
        images = self.images(vae)
        assert vae.decode(vae.get_codebook_indices(images)).shape == images.shape

    @torch.no_grad()
    def test_wrong_channels_raise(self, vae: ImageVAE) -> None:
        with pytest.raises(ValueError):
            vae.get_codebook_indices(self.images(vae, channels=vae.channels + 1))

    @torch.no_grad()
    def test_wrong_image_size_raises(self, vae: ImageVAE) -> None:
        with pytest.raises(ValueError):
            vae.get_codebook_indices(self.images(vae, size=vae.image_size // 2))

    @torch.no_grad()
    def test_save_and_load_round_trip(self, vae: nn.Module, tmp_path: Path) -> None:
        images = self.images(vae)
        codes = vae.get_codebook_indices(images)
        decoded = vae.decode(codes)

        save_vae(vae, tmp_path / "vae")  # as a DALLE checkpoint saves its VAE
        loaded = load_vae(tmp_path / "vae").eval()

        assert type(loaded) is type(vae)
        for name in ("image_size", "channels", "num_tokens", "fmap_size"):
            assert getattr(loaded, name) == getattr(vae, name), name
        assert torch.equal(loaded.get_codebook_indices(images), codes)
        assert torch.equal(loaded.decode(codes), decoded)
