"""Tiny encoder/decoder pairs in OpenAI's published file format, served on loopback HTTP.

The tiny networks keep OpenAI's layout (4 groups, so f = 8) with 8 hidden channels, one block
per group and 32 codes: 32 px images become 4 x 4 codes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fake_dall_e
import pytest
import torch

from dalle_core.download import CACHE_DIR_ENV, OFFLINE_ENV
from dalle_core.testing.fileserver import PROXY_VARIABLES, FileServer

IMAGE_SIZE = 32
VOCAB = 32
TINY_ENCODER = dict(n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=VOCAB)
TINY_DECODER = dict(n_init=8, n_hid=8, n_blk_per_group=1, output_channels=3, vocab_size=VOCAB)


@dataclass
class Published:
    """A tiny encoder/decoder pair (the in-memory originals, used as references) and their
    files in the published format."""

    encoder: fake_dall_e.Encoder
    decoder: fake_dall_e.Decoder
    files: dict[str, bytes]  # file name -> bytes

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def write(self, directory: Path) -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, data in self.files.items():
            paths[name] = directory / name
            paths[name].write_bytes(data)
        return paths


@pytest.fixture(scope="session")
def published() -> Published:
    torch.manual_seed(0)
    encoder = fake_dall_e.Encoder(**TINY_ENCODER).eval()
    decoder = fake_dall_e.Decoder(**TINY_DECODER).eval()
    return Published(encoder, decoder, {
        "encoder.pkl": fake_dall_e.save_published(encoder),
        "decoder.pkl": fake_dall_e.save_published(decoder),
        "encoder-legacy.pkl": fake_dall_e.save_published(encoder, legacy_format=True),
        "decoder-legacy.pkl": fake_dall_e.save_published(decoder, legacy_format=True),
    })


@pytest.fixture
def server(published: Published, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """A loopback HTTP server holding the published files; proxies bypassed."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with FileServer(published.files) as running:
        yield running


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own download cache (never the user's) and starts online."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(root))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    return root


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    yield
