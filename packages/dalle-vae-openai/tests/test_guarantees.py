"""Guarantees of OpenAIDiscreteVAE, each a test that fails when the promise breaks.

- Model: ``decode(get_codebook_indices(x))`` is what the loaded networks themselves compute:
  encoder logits -> argmax -> one-hot grid -> decoder -> sigmoid of the means -> unmapped
  pixels (within 1e-5), for both published file formats and across batch chunks.
- Defaults the upstream README states: ``OpenAIDiscreteVAE()  # loads pretrained OpenAI VAE``
  (256 px images, "OpenAI's, which has a size of 8192" codes, an image sequence of 1024).
- Safe loading: an encoder or decoder file, downloaded or local, zip or legacy format, that
  holds a pickled object whose unpickling would run code is refused with an error naming the
  file, and the code never runs; so is a saved VAE's ``model.safetensors`` that is a pickle.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import fake_dall_e
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, Published

from dalle_core import DALLE
from dalle_core.download import OFFLINE_ENV
from dalle_core.testing.fileserver import FileServer
from dalle_core.testing.pickles import PAYLOADS, TouchOnUnpickle, write_code_pickle
from dalle_vae_openai import Decoder, Encoder, OpenAIDiscreteVAE, map_pixels, unmap_pixels

FORMATS = {"zip": ("encoder.pkl", "decoder.pkl"), "legacy": ("encoder-legacy.pkl", "decoder-legacy.pkl")}


def networks_reconstruction(vae: OpenAIDiscreteVAE, images: torch.Tensor) -> torch.Tensor:
    """The loaded networks' own pass: argmax codes as a one-hot grid through the decoder."""
    with torch.no_grad():
        codes = vae.enc(map_pixels(images)).argmax(dim=1)  # [B, f, f]
        one_hot = F.one_hot(codes, vae.num_tokens).permute(0, 3, 1, 2).float()  # [B, V, f, f]
        stats = vae.dec(one_hot)  # [B, 2 C, H, W]
    return unmap_pixels(torch.sigmoid(stats[:, : vae.channels]))


@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_decoded_codes_are_the_networks_reconstruction(
    published: Published, tmp_path: Path, file_format: str
) -> None:
    paths = published.write(tmp_path / "files")
    encoder_file, decoder_file = FORMATS[file_format]
    vae = OpenAIDiscreteVAE(paths[encoder_file], paths[decoder_file], image_size=IMAGE_SIZE, batch_size=2)
    images = torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))

    codes = vae.get_codebook_indices(images)  # 3 chunks of at most 2 images
    with torch.no_grad():
        assert torch.equal(codes, vae.enc(map_pixels(images)).argmax(dim=1).flatten(1))
    grids = codes.view(5, vae.fmap_size, vae.fmap_size)
    assert not torch.equal(grids, grids.transpose(1, 2))  # a transposed layout would show
    decoded = vae.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, networks_reconstruction(vae, images), atol=1e-5, rtol=0)


def test_readme_defaults(published: Published, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OpenAIDiscreteVAE()`` reads OpenAI's files (here tiny stand-ins where the cache keeps
    them), for 256 px images of 32 x 32 = 1024 codes; the networks default to 8192 codes."""
    monkeypatch.setenv(OFFLINE_ENV, "1")
    (cache_root / "openai").mkdir(parents=True)
    for name in ("encoder.pkl", "decoder.pkl"):
        (cache_root / "openai" / name).write_bytes(published.files[name])
    vae = OpenAIDiscreteVAE()
    assert vae.config()["encoder_path"] == "https://cdn.openai.com/dall-e/encoder.pkl"
    assert vae.config()["decoder_path"] == "https://cdn.openai.com/dall-e/decoder.pkl"
    assert (vae.image_size, vae.fmap_size) == (256, 32)
    dalle = DALLE(vae=vae, dim=16, num_text_tokens=10000, text_seq_len=256, depth=1, heads=1, dim_head=16)
    assert dalle.image_seq_len == 1024
    with torch.device("meta"):
        full = OpenAIDiscreteVAE.from_networks(Encoder(), Decoder())
    assert (full.num_tokens, full.channels, full.image_size, full.fmap_size) == (8192, 3, 256, 32)
















def code_pickles(published: Published, marker: Path, payload: type[TouchOnUnpickle]) -> dict[str, bytes]:
    """Published-format files (both formats) whose module also carries ``payload(marker)``."""
    files = {}
    for part, module in (("encoder", published.encoder), ("decoder", published.decoder)):
        module.payload = payload(marker)
        try:
            files[f"{part}.pkl"] = fake_dall_e.save_published(module)
            files[f"{part}-legacy.pkl"] = fake_dall_e.save_published(module, legacy_format=True)
        finally:
            del module.payload
    return files


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_code_pickles_run_their_code_when_unpickled_unsafely(
    published: Published, tmp_path: Path, payload: type[TouchOnUnpickle]
) -> None:
    """What the tests below refuse is real: an unrestricted ``torch.load`` runs the code."""
    for name, data in code_pickles(published, tmp_path / "marker", payload).items():
        with fake_dall_e.published_modules():
            torch.load(io.BytesIO(data), weights_only=False)
        assert (tmp_path / "marker").exists(), name
        (tmp_path / "marker").unlink()


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("part", ["encoder", "decoder"])
@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_downloaded_file_with_code_is_refused_unrun(
    published: Published, server: FileServer, cache_root: Path, tmp_path: Path,
    payload: type[TouchOnUnpickle], part: str, file_format: str,
) -> None:
    marker = tmp_path / "marker"
    bad = code_pickles(published, marker, payload)
    server.files.update({f"bad-{name}": data for name, data in bad.items()})
    names = dict(zip(("encoder", "decoder"), FORMATS[file_format], strict=True))
    names[part] = f"bad-{names[part]}"
    cached = f"{re.escape(str(cache_root / 'openai'))}/.*/{re.escape(names[part])}"
    with pytest.raises(ValueError, match=f"{cached} is not a readable dall_e {part}"):
        OpenAIDiscreteVAE(server.url(names["encoder"]), server.url(names["decoder"]), image_size=IMAGE_SIZE)
    assert server.requests[names[part]] == 1
    assert not marker.exists()


@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_local_file_with_code_is_refused_unrun(
    published: Published, tmp_path: Path, file_format: str
) -> None:
    marker = tmp_path / "marker"
    bad = code_pickles(published, marker, TouchOnUnpickle)
    encoder_file, decoder_file = FORMATS[file_format]
    paths = published.write(tmp_path / "files")
    paths[encoder_file].write_bytes(bad[encoder_file])
    refused = f"{re.escape(str(paths[encoder_file]))} is not a readable dall_e encoder"
    with pytest.raises(ValueError, match=refused):
        OpenAIDiscreteVAE(paths[encoder_file], paths[decoder_file], image_size=IMAGE_SIZE)
    assert not marker.exists()


def test_saved_weights_that_are_a_code_pickle_are_refused_unrun(published: Published, tmp_path: Path) -> None:
    """A DALLE checkpoint whose embedded VAE was saved with its weights (``save_weights=True``)."""
    paths = published.write(tmp_path / "files")
    vae = OpenAIDiscreteVAE(paths["encoder.pkl"], paths["decoder.pkl"], image_size=IMAGE_SIZE,
                            save_weights=True)
    torch.manual_seed(0)
    dalle = DALLE(vae=vae, dim=16, num_text_tokens=50, text_seq_len=4, depth=1, heads=1, dim_head=16)
    dalle.save_pretrained(tmp_path / "dalle")
    weights, marker = tmp_path / "dalle" / "vae" / "model.safetensors", tmp_path / "marker"
    write_code_pickle(weights, marker, tensors={"enc.blocks.input.w": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is not a safetensors file"):
        DALLE.from_pretrained(tmp_path / "dalle")
    assert not marker.exists()
