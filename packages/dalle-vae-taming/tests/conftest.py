from __future__ import annotations

from pathlib import Path

import pytest
from vqgan_files import GUMBEL_TARGET, VQGanFiles, taming_yaml, write_vqgan

from dalle_core.download import OFFLINE_ENV
from dalle_core.testing.fileserver import PROXY_VARIABLES, FileServer


@pytest.fixture(scope="session")
def vq_files(tmp_path_factory: pytest.TempPathFactory) -> VQGanFiles:
    """A tiny VQModel: 32 px, 3 channels, f4 (ch_mult of 3 entries), 64 codes."""
    return write_vqgan(tmp_path_factory.mktemp("vq"), taming_yaml(), seed=0)


@pytest.fixture(scope="session")
def gumbel_files(tmp_path_factory: pytest.TempPathFactory) -> VQGanFiles:
    """A tiny GumbelVQ: 32 px, 3 channels, f4, 128 codes."""
    return write_vqgan(tmp_path_factory.mktemp("gumbel"), taming_yaml(GUMBEL_TARGET, n_embed=128), seed=1)


@pytest.fixture(scope="session")
def f8_files(tmp_path_factory: pytest.TempPathFactory) -> VQGanFiles:
    """A tiny f8 VQModel (ch_mult of 4 entries), RGBA, whose attention sits at 2 px: upstream's
    ``resolution / attn_resolutions[0]`` would call it f16."""
    yaml_text = taming_yaml(resolution=32, ch_mult=(1, 1, 1, 2), in_channels=4, attn_resolutions=(2,))
    return write_vqgan(tmp_path_factory.mktemp("f8"), yaml_text, seed=2)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    """A loopback file server; proxies bypassed, downloads allowed."""
    for name in (*PROXY_VARIABLES, OFFLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    with FileServer() as running:
        yield running


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory, also set as DALLE_CACHE_DIR."""
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
