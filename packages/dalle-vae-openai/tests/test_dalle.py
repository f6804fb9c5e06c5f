"""The plugin in dalle_core's registry, and DALLE checkpoints that use OpenAIDiscreteVAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, VOCAB, Published

from dalle_core import DALLE
from dalle_core.download import OFFLINE_ENV
from dalle_core.plugins import create_vae, load_vae, registry
from dalle_core.testing.fileserver import FileServer
from dalle_vae_openai import ChecksumError, DownloadError, OpenAIDiscreteVAE


def tiny_dalle(vae: OpenAIDiscreteVAE) -> DALLE:
    torch.manual_seed(0)
    return DALLE(vae=vae, dim=32, num_text_tokens=50, text_seq_len=8, depth=1, heads=2, dim_head=16).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, 50, (2, 8), generator=generator)
    image = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return text, image


def test_registered_and_listed() -> None:
    entry = registry("vaes")["openai"]
    assert entry.package == "dalle-vae-openai"
    assert entry.usable() == (True, "")
    assert "OpenAI" in entry.description


def test_create_by_name(server: FileServer) -> None:
    vae = create_vae("openai", encoder_path=server.url("encoder.pkl"), decoder_path=server.url("decoder.pkl"),
                     image_size=IMAGE_SIZE)
    assert isinstance(vae, OpenAIDiscreteVAE) and vae.num_tokens == VOCAB


def test_dalle_reads_the_vae(server: FileServer) -> None:
    vae = OpenAIDiscreteVAE(server.url("encoder.pkl"), server.url("decoder.pkl"), image_size=IMAGE_SIZE)
    dalle = tiny_dalle(vae)
    assert dalle.num_image_tokens == VOCAB and dalle.image_seq_len == (IMAGE_SIZE // 8) ** 2
    text, image = inputs()
    loss = dalle(text, image, return_loss=True)
    assert torch.isfinite(loss)


def test_dalle_checkpoint_reloads_without_the_vae(
    server: FileServer, published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = OpenAIDiscreteVAE(server.url("encoder.pkl"), server.url("decoder.pkl"), image_size=IMAGE_SIZE)
    dalle = tiny_dalle(vae)
    dalle.save_pretrained(tmp_path / "dalle")

    # the checkpoint records which VAE (name), its configuration and where its files came from
    meta = json.loads((tmp_path / "dalle" / "vae" / "config.json").read_text())
    assert meta["name"] == "openai" and meta["package"] == "dalle-vae-openai"
    assert meta["config"]["encoder_path"] == server.url("encoder.pkl")
    assert meta["config"]["encoder_sha256"] == published.sha256("encoder.pkl")
    assert meta["config"]["image_size"] == IMAGE_SIZE and meta["weights"] is None
    assert not (tmp_path / "dalle" / "vae" / "model.safetensors").exists()  # only the sources

    monkeypatch.setenv(OFFLINE_ENV, "1")  # reloading reads the download cache: no network
    requests = server.requests.copy()
    loaded = DALLE.from_pretrained(tmp_path / "dalle").eval()
    assert server.requests == requests
    assert isinstance(loaded.vae, OpenAIDiscreteVAE)
    text, image = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(text, image), dalle(text, image))
        codes = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(loaded.vae.decode(codes), vae.decode(codes))


def test_reload_on_a_machine_without_the_files(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_dalle(OpenAIDiscreteVAE(server.url("encoder.pkl"), server.url("decoder.pkl"),
                                 image_size=IMAGE_SIZE)).save_pretrained(tmp_path / "dalle")
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(DownloadError, match="put it at"):
        DALLE.from_pretrained(tmp_path / "dalle")
    monkeypatch.delenv(OFFLINE_ENV)
    loaded = DALLE.from_pretrained(tmp_path / "dalle")  # fetched again, checked by the recorded SHA-256
    assert isinstance(loaded.vae, OpenAIDiscreteVAE)


def test_reload_rejects_changed_files(
    server: FileServer, published: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    OpenAIDiscreteVAE(server.url("encoder.pkl"), server.url("decoder.pkl"),
                      image_size=IMAGE_SIZE).save_pretrained(tmp_path / "vae")
    server.files["encoder.pkl"] = published.files["encoder-legacy.pkl"]  # the file behind the URL changes
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "new-cache"))
    with pytest.raises(ChecksumError, match=f"expected {published.sha256('encoder.pkl')}"):
        load_vae(tmp_path / "vae")


def test_saved_with_weights_needs_no_files(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = OpenAIDiscreteVAE(server.url("encoder.pkl"), server.url("decoder.pkl"), image_size=IMAGE_SIZE,
                            save_weights=True)
    tiny_dalle(vae).save_pretrained(tmp_path / "dalle")
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    loaded = DALLE.from_pretrained(tmp_path / "dalle")
    text, image = inputs()
    assert torch.equal(loaded.vae.get_codebook_indices(image), vae.get_codebook_indices(image))
