"""The published-model path through `dalle_core.download` (whose own tests cover the cache,
checksums, corrupted and truncated downloads and torch.distributed): the published VQGANs
downloaded once into the cache, downloaded content checked as a VQGAN config / a PyTorch file,
offline mode naming the VQGAN files and flags, URLs as paths, the Gumbel plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vqgan_files import VQGanFiles, sha256

from dalle_core.download import RemoteFile
from dalle_core.testing.fileserver import FileServer
from dalle_vae_taming import VQGanVAE
from dalle_vae_taming import sources as sources_module
from dalle_vae_taming.sources import DEFAULT_PRETRAINED, GUMBEL_PRETRAINED, PretrainedVQGAN


def publish(
    server: FileServer,
    files: VQGanFiles,
    monkeypatch: pytest.MonkeyPatch,
    name: str = DEFAULT_PRETRAINED,
    model_sha256: str | None = "known",
    config_sha256: str | None = "known",
) -> PretrainedVQGAN:
    """Serve ``files`` as the published model ``name`` (digests of the real bytes by default)."""
    server.files["config"] = files.config_bytes
    server.files["model"] = files.model_bytes
    published = PretrainedVQGAN(
        name,
        RemoteFile(
            server.url("config", "dl=1"),
            f"{name}.config.yml",
            sha256(files.config_bytes) if config_sha256 == "known" else config_sha256,
        ),
        RemoteFile(
            server.url("model", "dl=1"),
            f"{name}.model.ckpt",
            sha256(files.model_bytes) if model_sha256 == "known" else model_sha256,
        ),
    )
    monkeypatch.setitem(sources_module.PRETRAINED, name, published)
    return published


def leftovers(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.rglob("*.part"))


def test_default_model_is_downloaded_once_then_cached(
    server: FileServer, vq_files: VQGanFiles, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(server, vq_files, monkeypatch)
    first = VQGanVAE()  # cache from DALLE_CACHE_DIR
    assert server.requests == {"config": 1, "model": 1}
    assert (cache / f"{DEFAULT_PRETRAINED}.model.ckpt").read_bytes() == vq_files.model_bytes
    second = VQGanVAE()
    assert server.requests == {"config": 1, "model": 1}  # served from the cache
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    local = VQGanVAE(vqgan_model_path=vq_files.model, vqgan_config_path=vq_files.config)
    assert torch.equal(first.get_codebook_indices(images), local.get_codebook_indices(images))
    assert torch.equal(second.get_codebook_indices(images), local.get_codebook_indices(images))
    assert first.config["source"] == {
        "pretrained": DEFAULT_PRETRAINED,
        "config": {"url": server.url("config", "dl=1"), "sha256": sha256(vq_files.config_bytes)},
        "model": {"url": server.url("model", "dl=1"), "sha256": sha256(vq_files.model_bytes)},
    }


def test_error_page_instead_of_a_file_is_removed(
    server: FileServer, vq_files: VQGanFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no digest published: the content itself is checked before it enters the cache
    publish(server, vq_files, monkeypatch, model_sha256=None, config_sha256=None)
    server.files["config"] = b"<html><body>Too many requests</body></html>"
    with pytest.raises(ValueError, match="downloaded file .* has no 'model' mapping"):
        VQGanVAE(cache_dir=tmp_path)
    server.files["config"] = vq_files.config_bytes
    server.files["model"] = b"<html><body>Too many requests</body></html>"
    with pytest.raises(ValueError, match="downloaded file .* is not a PyTorch file"):
        VQGanVAE(cache_dir=tmp_path)
    assert not (tmp_path / f"{DEFAULT_PRETRAINED}.model.ckpt").exists()
    assert leftovers(tmp_path) == []


def test_offline_mode_says_where_to_put_the_files(
    server: FileServer, vq_files: VQGanFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = publish(server, vq_files, monkeypatch)
    monkeypatch.setenv("DALLE_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="DALLE_OFFLINE") as error:  # an OfflineError
        VQGanVAE(cache_dir=tmp_path)
    message = str(error.value)
    assert published.config.url in message and str(tmp_path / published.config.filename) in message
    assert message.endswith("or pass local files with vqgan_config_path= and vqgan_model_path=")
    assert not server.requests
    (tmp_path / published.config.filename).write_bytes(vq_files.config_bytes)  # as the message says
    (tmp_path / published.model.filename).write_bytes(vq_files.model_bytes)
    VQGanVAE(cache_dir=tmp_path)
    assert not server.requests


def test_urls_as_paths(server: FileServer, vq_files: VQGanFiles, tmp_path: Path) -> None:
    server.files["runs/model.yaml"] = vq_files.config_bytes
    server.files["runs/last.ckpt"] = vq_files.model_bytes
    urls = dict(
        vqgan_config_path=server.url("runs/model.yaml"), vqgan_model_path=server.url("runs/last.ckpt")
    )
    vae = VQGanVAE(**urls, cache_dir=tmp_path)
    VQGanVAE(**urls, cache_dir=tmp_path)
    assert server.requests == {"runs/model.yaml": 1, "runs/last.ckpt": 1}
    assert vae.config["source"]["model"] == {
        "url": urls["vqgan_model_path"],
        "sha256": sha256(vq_files.model_bytes),
    }
    assert [p.name for p in (tmp_path / "urls").glob("*/last.ckpt")] == ["last.ckpt"]  # urls/<hash>/
    missing = "could not download .*/missing.ckpt.*404.*put it at .*vqgan_model_path="
    with pytest.raises(OSError, match=missing):
        VQGanVAE(
            vqgan_config_path=urls["vqgan_config_path"],
            vqgan_model_path=server.url("missing.ckpt"),
            cache_dir=tmp_path,
        )


def test_gumbel_plugin_downloads_the_published_gumbel_model(
    server: FileServer, gumbel_files: VQGanFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dalle_core.plugins import create_vae

    publish(server, gumbel_files, monkeypatch, name=GUMBEL_PRETRAINED)
    vae = create_vae("gumbel-vqgan", cache_dir=tmp_path)
    assert vae.is_gumbel and vae.config["source"]["pretrained"] == GUMBEL_PRETRAINED
