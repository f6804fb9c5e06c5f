"""`OpenAIDiscreteVAE`: OpenAI's released DALL-E discrete VAE as a dalle image VAE."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import save
from torch import Tensor, nn

from dalle_core.download import LocalFile, RemoteFile, resolve
from dalle_core.pretrained import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    atomic_write_bytes,
    load_state_strict,
    package_version,
    read_config,
    write_json,
)
from dalle_vae_openai.networks import Decoder, Encoder, map_pixels, unmap_pixels
from dalle_vae_openai.published import load_published

OPENAI_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"
OPENAI_DECODER_URL = "https://cdn.openai.com/dall-e/decoder.pkl"
DEFAULT_BATCH_SIZE = 16

#: SHA-256 of OpenAI's published files. OpenAI publishes no digests and these could not be
#: computed where this package was written (no network), so they are unset: the digest of the
#: first download is then pinned in the cache (``<file>.sha256``) and recorded by
#: `OpenAIDiscreteVAE.save_pretrained`, and every later load is checked against it.
#: Fill in the hex digests here to check the very first download too.
PUBLISHED_SHA256: dict[str, str | None] = {
    OPENAI_ENCODER_URL: None,
    OPENAI_DECODER_URL: None,
}
#: this package's folder in the download cache (`dalle_core.download`)
CACHE_FOLDER = "openai"


def published_file(url: str) -> RemoteFile:
    """OpenAI's published ``url`` (a key of `PUBLISHED_SHA256`), cached by its plain name as
    ``openai/<file name>``; other URLs are cached under ``openai/<16 hex of sha256(URL)>/``."""
    return RemoteFile(url, f"{CACHE_FOLDER}/{PurePosixPath(urlparse(url).path).name}", PUBLISHED_SHA256[url])


class OpenAIDiscreteVAE(nn.Module):
    """OpenAI's pretrained discrete VAE: 256 px RGB images <-> 32 x 32 codes out of 8192.

    Args:
        encoder_path: URL or local path of the encoder (``encoder.pkl``, as OpenAI published
            it); default OpenAI's URL, downloaded once into the cache.
        decoder_path: same for the decoder (``decoder.pkl``).
        cache_dir: cache root for downloads (default ``$DALLE_CACHE_DIR``,
            ``$XDG_CACHE_HOME/dalle`` or ``~/.cache/dalle``).
        encoder_sha256, decoder_sha256: expected hex SHA-256 of the files; a mismatch is an error
            (a mismatching download is removed). Defaults: `PUBLISHED_SHA256` for OpenAI's URLs.
        image_size: side of the images in pixels (the networks are convolutional; OpenAI trained
            them at 256).
        batch_size: images (or code grids) per pass through the encoder (decoder); larger
            batches are split, bounding memory (about 0.3 GB of activations per 256 px image).
        save_weights: whether `save_pretrained` also writes the weights (``model.safetensors``,
            about 390 MB), so that reloading needs neither the network nor the original files.

    ``channels``, ``num_tokens`` and ``fmap_size`` are read from the loaded networks. Encoding
    and decoding run in fp32 under ``torch.no_grad``, whatever autocast context the caller is
    in, ``batch_size`` images at a time.
    """

    plugin_name = "openai"
    distribution = "dalle-vae-openai"

    def __init__(
        self,
        encoder_path: str | Path | None = None,
        decoder_path: str | Path | None = None,
        cache_dir: str | Path | None = None,
        *,
        encoder_sha256: str | None = None,
        decoder_sha256: str | None = None,
        image_size: int = 256,
        batch_size: int = DEFAULT_BATCH_SIZE,
        save_weights: bool = False,
    ):
        super().__init__()
        sources = {}
        for part, location, sha256 in (
            ("encoder", str(encoder_path or OPENAI_ENCODER_URL), encoder_sha256),
            ("decoder", str(decoder_path or OPENAI_DECODER_URL), decoder_sha256),
        ):
            sources[part] = resolve(
                published_file(location) if location in PUBLISHED_SHA256 else location,
                argument=f"{part}_path", sha256=sha256, cache_dir=cache_dir, folder=CACHE_FOLDER,
            )
        encoder = load_published(sources["encoder"].path, Encoder)
        decoder = load_published(sources["decoder"].path, Decoder)
        self._setup(encoder, decoder, image_size, batch_size, sources, save_weights)

    @classmethod
    def from_networks(
        cls,
        encoder: Encoder,
        decoder: Decoder,
        *,
        image_size: int = 256,
        batch_size: int = DEFAULT_BATCH_SIZE,
        save_weights: bool = True,
    ) -> OpenAIDiscreteVAE:
        """Wrap networks already in memory (no files); `save_pretrained` then saves weights."""
        vae = cls.__new__(cls)
        nn.Module.__init__(vae)
        vae._setup(encoder, decoder, image_size, batch_size, None, save_weights)
        return vae

    def _setup(
        self,
        encoder: Encoder,
        decoder: Decoder,
        image_size: int,
        batch_size: int,
        sources: dict[str, LocalFile] | None,
        save_weights: bool,
    ) -> None:
        mismatched = [
            f"{a}={getattr(encoder, a)} vs {b}={getattr(decoder, b)}"
            for a, b in (("vocab_size", "vocab_size"), ("input_channels", "output_channels"),
                         ("group_count", "group_count"))
            if getattr(encoder, a) != getattr(decoder, b)
        ]
        if mismatched:
            raise ValueError(f"the encoder and decoder do not belong together: {'; '.join(mismatched)}")
        factor = 2 ** (encoder.group_count - 1)
        if image_size < factor or image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of {factor} (the downsampling "
                             f"factor of these networks), got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.enc, self.dec = encoder, decoder
        self.image_size = int(image_size)
        self.channels = int(encoder.input_channels)
        self.num_tokens = int(encoder.vocab_size)
        self.fmap_size = self.image_size // factor
        self.num_layers = int(encoder.group_count) - 1  # upstream's name: log2 of the factor
        self.batch_size = int(batch_size)
        self.sources = sources
        self.save_weights = save_weights
        self.requires_grad_(False).eval()

    # ------------------------------------------------------------------ codes

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """Images ``[B, channels, image_size, image_size]`` in [0, 1] -> codes
        ``LongTensor[B, fmap_size ** 2]`` (row-major), computed in fp32."""
        expected = [self.channels, self.image_size, self.image_size]
        if images.dim() != 4 or list(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [batch, {', '.join(map(str, expected))}] "
                             f"(channels, height, width), got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
        codes = []
        with torch.autocast(images.device.type, enabled=False):
            for chunk in images.split(self.batch_size):  # [b, C, H, W]
                pixels = map_pixels(chunk.float()).contiguous(memory_format=torch.channels_last)
                logits = self.enc(pixels)  # [b, num_tokens, fmap, fmap]; channels-last convs are faster
                codes.append(logits.argmax(dim=1).flatten(1))  # [b, fmap ** 2]
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``LongTensor[B, n]`` (``n`` a square, ``fmap_size ** 2`` for ``image_size``
        images) -> images ``[B, channels, side, side]`` in [0, 1], computed in fp32."""
        if codes.dim() != 2 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an integer tensor [batch, {self.fmap_size ** 2}], "
                             f"got {codes.dtype} {list(codes.shape)}")
        side = int(round(codes.shape[1] ** 0.5))
        if side * side != codes.shape[1] or side == 0:
            raise ValueError(f"the number of codes per image must be a square "
                             f"({self.fmap_size ** 2} for {self.image_size} px), got {codes.shape[1]}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_tokens):
            raise ValueError(f"codes must be in [0, {self.num_tokens}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        images = []
        with torch.autocast(codes.device.type, enabled=False):
            for chunk in codes.long().view(-1, side, side).split(self.batch_size):  # [b, side, side]
                stats = self.dec.decode_codes(chunk)  # [b, 2 C, H, W], fp32 logits
                images.append(unmap_pixels(torch.sigmoid(stats[:, : self.channels])))
        return torch.cat(images)

    # ------------------------------------------------------------ checkpoints

    def config(self) -> dict[str, Any] | None:
        """Constructor keywords that rebuild this VAE from its files (``None`` without files)."""
        if self.sources is None:
            return None
        return {
            "encoder_path": self.sources["encoder"].location,
            "decoder_path": self.sources["decoder"].location,
            "encoder_sha256": self.sources["encoder"].sha256,
            "decoder_sha256": self.sources["decoder"].sha256,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
        }

    def save_pretrained(self, directory: str | Path, include_weights: bool | None = None) -> None:
        """Write ``config.json``: plugin name, the files' sources (URL or path) and SHA-256,
        the architecture; with ``include_weights`` (default: ``save_weights``, and always for
        a VAE built from networks in memory) also ``model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config()
        include = self.save_weights if include_weights is None else include_weights
        include = include or config is None
        weights = directory / WEIGHTS_NAME
        if include:
            state = {key: tensor.detach().contiguous().cpu() for key, tensor in self.state_dict().items()}
            atomic_write_bytes(weights, save(state, metadata={"format": "pt"}))
        else:
            weights.unlink(missing_ok=True)  # a stale file would take precedence on load
        write_json(directory / CONFIG_NAME, {
            "format_version": FORMAT_VERSION,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "name": self.plugin_name,
            "package": self.distribution,
            "version": package_version(self.distribution),
            "config": config,
            "networks": {"encoder": self.enc.config(), "decoder": self.dec.config()},
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "weights": WEIGHTS_NAME if include else None,
        })

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> OpenAIDiscreteVAE:
        """Rebuild a VAE written by `save_pretrained`: from its ``model.safetensors`` when it
        has one, otherwise from the recorded sources through the download cache (checked
        against the recorded SHA-256)."""
        directory = Path(directory)
        meta = read_config(directory)
        expected_class = f"{cls.__module__}.{cls.__qualname__}"
        if meta["class"] != expected_class:
            raise ValueError(f"{directory / CONFIG_NAME} holds a {meta['class']}, not a {expected_class}")
        if meta.get("weights"):
            networks = meta.get("networks") or {}
            if set(networks) != {"encoder", "decoder"}:
                raise ValueError(f"{directory / CONFIG_NAME} has no 'networks' field with the "
                                 f"encoder and decoder configurations")
            with torch.device("meta"):
                vae = cls.from_networks(Encoder(**networks["encoder"]), Decoder(**networks["decoder"]),
                                        image_size=meta["image_size"], batch_size=meta["batch_size"])
            vae.to_empty(device="cpu")
            load_state_strict(vae, directory / meta["weights"])
            return vae.eval()
        if meta["config"] is None:
            raise ValueError(f"{directory / CONFIG_NAME} records neither weights nor source files")
        return cls(**meta["config"])

