"""OpenAIDiscreteVAE's files through dalle_core.download (URL, cache, SHA-256) from a loopback
HTTP server. Generic download behaviour (corrupted and cut downloads, re-download of a changed
cached file, HTTP errors, distributed ranks) is tested in dalle-core's tests/test_download.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import IMAGE_SIZE, Published

from dalle_core.download import OFFLINE_ENV, OfflineError, cache_path, url_file
from dalle_core.testing.fileserver import FileServer
from dalle_vae_openai import (
    OPENAI_DECODER_URL,
    OPENAI_ENCODER_URL,
    ChecksumError,
    DownloadError,
    OpenAIDiscreteVAE,
)


def make(server: FileServer, encoder: str = "encoder.pkl", decoder: str = "decoder.pkl", **kwargs):
    return OpenAIDiscreteVAE(server.url(encoder), server.url(decoder), image_size=IMAGE_SIZE, **kwargs)


def cached(url: str, root: Path) -> Path:
    """Where this package caches a URL other than OpenAI's: ``<root>/openai/<hash>/<name>``."""
    return cache_path(url_file(url, "openai"), root)


def test_urls_are_cached_in_the_openai_folder(
    server: FileServer, published: Published, tmp_path: Path, cache_root: Path
) -> None:
    vae = make(server, cache_dir=tmp_path / "elsewhere")  # cache_dir= overrides DALLE_CACHE_DIR
    assert server.requests == {"encoder.pkl": 1, "decoder.pkl": 1}
    target = cached(server.url("encoder.pkl"), tmp_path / "elsewhere")
    assert target.parent.parent == tmp_path / "elsewhere" / "openai"
    assert target.read_bytes() == published.files["encoder.pkl"]
    assert not cache_root.exists()
    # the configuration records the URLs and the digests of what was downloaded
    assert vae.config()["encoder_path"] == server.url("encoder.pkl")
    assert vae.config()["encoder_sha256"] == published.sha256("encoder.pkl")
    assert vae.config()["decoder_sha256"] == published.sha256("decoder.pkl")

    make(server, cache_dir=tmp_path / "elsewhere")  # from the cache: no request
    assert server.requests == {"encoder.pkl": 1, "decoder.pkl": 1}


def test_offline_names_the_argument_to_pass(
    server: FileServer, published: Published, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OFFLINE_ENV, "1")
    encoder_target = cached(server.url("encoder.pkl"), cache_root)
    decoder_target = cached(server.url("decoder.pkl"), cache_root)
    with pytest.raises(OfflineError, match=(
        f"{OFFLINE_ENV}.*fetch {server.url('encoder.pkl')}.*put it at {encoder_target}.*"
        f"pass encoder_path=<path of a local copy>"
    )):
        make(server)
    encoder_target.parent.mkdir(parents=True)
    encoder_target.write_bytes(published.files["encoder.pkl"])  # what the message asks for
    with pytest.raises(OfflineError, match=f"put it at {decoder_target}.*pass decoder_path="):
        make(server)
    decoder_target.parent.mkdir(parents=True)
    decoder_target.write_bytes(published.files["decoder.pkl"])
    make(server)
    assert not server.requests


def test_published_urls_offline(
    published: Published, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OpenAIDiscreteVAE()`` looks for OpenAI's files in the cache by their plain names."""
    monkeypatch.setenv(OFFLINE_ENV, "1")
    encoder_target = cache_root / "openai" / "encoder.pkl"
    with pytest.raises(DownloadError, match=f"fetch {OPENAI_ENCODER_URL} .*put it at {encoder_target}"):
        OpenAIDiscreteVAE()
    # tiny stand-ins where the real files would go: the whole default path then works offline
    encoder_target.parent.mkdir(parents=True)
    encoder_target.write_bytes(published.files["encoder.pkl"])
    (cache_root / "openai" / "decoder.pkl").write_bytes(published.files["decoder.pkl"])
    vae = OpenAIDiscreteVAE(image_size=IMAGE_SIZE)
    assert vae.config()["encoder_path"] == OPENAI_ENCODER_URL
    assert vae.config()["decoder_path"] == OPENAI_DECODER_URL
    digest = published.sha256("encoder.pkl")
    assert vae.config()["encoder_sha256"] == digest  # and pinned beside the file from now on
    assert (cache_root / "openai" / "encoder.pkl.sha256").read_text().strip() == digest


def test_local_paths(published: Published, tmp_path: Path) -> None:
    paths = published.write(tmp_path / "files")
    vae = OpenAIDiscreteVAE(str(paths["encoder.pkl"]), paths["decoder.pkl"], image_size=IMAGE_SIZE,
                            encoder_sha256=published.sha256("encoder.pkl").upper())
    assert vae.config()["encoder_path"] == str(paths["encoder.pkl"].resolve())
    assert vae.config()["decoder_sha256"] == published.sha256("decoder.pkl")
    with pytest.raises(ChecksumError, match=f"encoder_path: {paths['encoder.pkl']}"):
        OpenAIDiscreteVAE(paths["encoder.pkl"], paths["decoder.pkl"], encoder_sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="decoder_path=.*nowhere.pkl"):
        OpenAIDiscreteVAE(paths["encoder.pkl"], tmp_path / "nowhere.pkl")
    with pytest.raises(ValueError, match="SHA-256 for decoder_path must be 64 hexadecimal digits"):
        OpenAIDiscreteVAE(paths["encoder.pkl"], paths["decoder.pkl"], decoder_sha256="abc")
