"""OpenAIDiscreteVAE on tiny random-weight models written in OpenAI's published file format."""

from __future__ import annotations

import os
from pathlib import Path

import fake_dall_e
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, TINY_DECODER, TINY_ENCODER, VOCAB, Published

from dalle_core.testing import VAEConformance
from dalle_core.testing.fileserver import FileServer
from dalle_vae_openai import Decoder, Encoder, OpenAIDiscreteVAE, map_pixels, unmap_pixels
from dalle_vae_openai.published import LegacyReader, allow_list, load_published

FORMATS = {"zip": ("encoder.pkl", "decoder.pkl"), "legacy": ("encoder-legacy.pkl", "decoder-legacy.pkl")}


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def reference_codes(published: Published, x: torch.Tensor) -> torch.Tensor:
    """What OpenAI's usage code computes: argmax of the original encoder on mapped pixels."""
    with torch.no_grad():
        return published.encoder(map_pixels(x)).argmax(dim=1).flatten(1)


def reference_decode(published: Published, codes: torch.Tensor) -> torch.Tensor:
    """OpenAI's decoding: the original decoder on one-hot codes, sigmoid, unmap_pixels."""
    side = int(codes.shape[1] ** 0.5)
    one_hot = F.one_hot(codes.view(-1, side, side), VOCAB).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        stats = published.decoder(one_hot)
    return unmap_pixels(torch.sigmoid(stats[:, :3]))


@pytest.fixture
def local_files(published: Published, tmp_path: Path) -> dict[str, Path]:
    return published.write(tmp_path / "published")


@pytest.fixture
def vae(local_files: dict[str, Path]) -> OpenAIDiscreteVAE:
    return OpenAIDiscreteVAE(local_files["encoder.pkl"], local_files["decoder.pkl"], image_size=IMAGE_SIZE)


class TestConformanceFromURLs(VAEConformance):
    """Files downloaded from a loopback server; a checkpoint records URLs and digests."""

    @pytest.fixture
    def vae(self, server: FileServer) -> OpenAIDiscreteVAE:
        return OpenAIDiscreteVAE(server.url("encoder.pkl"), server.url("decoder.pkl"), image_size=IMAGE_SIZE)


class TestConformanceWithWeights(VAEConformance):
    """Local files, saved with the weights (reloading needs neither the files nor a network)."""

    @pytest.fixture
    def vae(self, local_files: dict[str, Path]) -> OpenAIDiscreteVAE:
        return OpenAIDiscreteVAE(local_files["encoder.pkl"], local_files["decoder.pkl"],
                                 image_size=IMAGE_SIZE, save_weights=True)


def test_attributes(vae: OpenAIDiscreteVAE) -> None:
    attributes = (vae.image_size, vae.channels, vae.num_tokens, vae.fmap_size)
    assert attributes == (IMAGE_SIZE, 3, VOCAB, IMAGE_SIZE // 8)
    assert vae.num_layers == 3
    assert not any(p.requires_grad for p in vae.parameters())


def test_parameter_names_are_openais(published: Published, vae: OpenAIDiscreteVAE) -> None:
    assert list(vae.enc.state_dict()) == list(published.encoder.state_dict())
    assert list(vae.dec.state_dict()) == list(published.decoder.state_dict())
    # the full-size architecture has OpenAI's parameter names and shapes too
    with torch.device("meta"):
        full_encoder, full_decoder = fake_dall_e.Encoder(), fake_dall_e.Decoder()
        ours_encoder, ours_decoder = Encoder(), Decoder()
    for theirs, ours in ((full_encoder, ours_encoder), (full_decoder, ours_decoder)):
        assert {k: v.shape for k, v in theirs.state_dict().items()} == {
            k: v.shape for k, v in ours.state_dict().items()
        }


@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_matches_the_original_modules(
    published: Published, local_files: dict[str, Path], file_format: str
) -> None:
    encoder_file, decoder_file = FORMATS[file_format]
    vae = OpenAIDiscreteVAE(local_files[encoder_file], local_files[decoder_file], image_size=IMAGE_SIZE)
    x = images()
    codes = vae.get_codebook_indices(x)
    assert torch.equal(codes, reference_codes(published, x))
    assert codes.unique().numel() > 1  # the tiny model does not collapse onto one code
    torch.testing.assert_close(vae.decode(codes), reference_decode(published, codes), atol=1e-5, rtol=1e-5)


def test_encode_decode_round_trip(vae: OpenAIDiscreteVAE, published: Published) -> None:
    x = images(batch=4)
    codes = vae.get_codebook_indices(x)  # [4, 16]
    decoded = vae.decode(codes)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert 0 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(decoded, reference_decode(published, reference_codes(published, x)),
                               atol=1e-5, rtol=1e-5)
    # re-encoding the decoded images is deterministic and agrees with the original encoder
    assert torch.equal(vae.get_codebook_indices(decoded), reference_codes(published, decoded))


def test_decode_without_one_hot_matches_forward(vae: OpenAIDiscreteVAE) -> None:
    codes = torch.randint(0, VOCAB, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(codes, VOCAB).permute(0, 3, 1, 2).float()  # [2, VOCAB, 4, 4]
    with torch.no_grad():
        torch.testing.assert_close(vae.dec.decode_codes(codes), vae.dec(one_hot), atol=1e-5, rtol=1e-5)


def test_batches_give_the_same_codes(local_files: dict[str, Path], vae: OpenAIDiscreteVAE) -> None:
    small = OpenAIDiscreteVAE(local_files["encoder.pkl"], local_files["decoder.pkl"],
                              image_size=IMAGE_SIZE, batch_size=2)
    x = images(batch=5)
    codes = vae.get_codebook_indices(x)
    assert torch.equal(small.get_codebook_indices(x), codes)
    torch.testing.assert_close(small.decode(codes), vae.decode(codes), atol=1e-6, rtol=1e-6)
    assert vae.get_codebook_indices(x[:0]).shape == (0, vae.fmap_size**2)


def test_fp32_under_autocast_and_no_grad(vae: OpenAIDiscreteVAE) -> None:
    x = images(batch=2)
    codes = vae.get_codebook_indices(x)
    decoded = vae.decode(codes)
    x_grad = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_codes = vae.get_codebook_indices(x_grad.bfloat16())
        autocast_decoded = vae.decode(codes)
    # bf16 input pixels are rounded, so compare against fp32 encoding of the same rounded pixels
    assert torch.equal(autocast_codes, vae.get_codebook_indices(x.bfloat16().float()))
    assert autocast_decoded.dtype == torch.float32 and not autocast_decoded.requires_grad
    assert torch.equal(autocast_decoded, decoded)
    # even a VAE cast to half precision computes in fp32
    half = vae.half()
    assert torch.equal(half.get_codebook_indices(x), reference_codes_half(vae, x))


def reference_codes_half(vae: OpenAIDiscreteVAE, x: torch.Tensor) -> torch.Tensor:
    """Codes of fp32 copies of the (half-rounded) weights."""
    encoder = Encoder(**vae.enc.config())
    encoder.load_state_dict({k: v.float() for k, v in vae.enc.state_dict().items()})
    with torch.no_grad():
        return encoder(map_pixels(x)).argmax(dim=1).flatten(1)


def test_bad_inputs_name_what_is_expected(vae: OpenAIDiscreteVAE) -> None:
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\]"):
        vae.get_codebook_indices(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="floating point"):
        vae.get_codebook_indices(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 32\)"):
        vae.decode(torch.full((1, 16), VOCAB))
    with pytest.raises(ValueError, match="square"):
        vae.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vae.decode(torch.zeros(1, 16))


def test_decode_other_square_grids(vae: OpenAIDiscreteVAE) -> None:
    assert vae.decode(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 3, 64, 64)


def test_swapped_files_are_named(local_files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="swapped"):
        OpenAIDiscreteVAE(local_files["decoder.pkl"], local_files["encoder.pkl"], image_size=IMAGE_SIZE)


def test_bad_image_size(local_files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        OpenAIDiscreteVAE(local_files["encoder.pkl"], local_files["decoder.pkl"], image_size=36)


def test_not_a_model_file(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pkl"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=f"{path}.*not a readable dall_e encoder"):
        load_published(path, Encoder)


@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_old_pickles_are_repaired(
    published: Published, local_files: dict[str, Path], file_format: str
) -> None:
    path = local_files[FORMATS[file_format][0]]
    data = path.read_bytes()
    # like the released files: no group_count, none of the hook dictionaries newer torch adds
    assert b"group_count" not in data and b"_forward_hooks_with_kwargs" not in data
    if file_format == "zip":
        with torch.serialization.safe_globals(allow_list()):
            loaded = torch.load(path, weights_only=True)
    else:
        with open(path, "rb") as handle:
            loaded = LegacyReader(handle).read()
    assert isinstance(loaded, Encoder) and loaded.group_count == 4
    assert loaded.config() == {"group_count": 4, **TINY_ENCODER}
    x = map_pixels(images())
    with torch.no_grad():  # the repaired module runs on current torch
        torch.testing.assert_close(loaded(x), published.encoder(x), atol=1e-5, rtol=1e-5)


class Evil:
    """Unpickling this would create a directory (pickle's code execution)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_foreign_globals_are_refused_not_run(tmp_path: Path, legacy_format: bool) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    torch.save({"w": torch.zeros(2), "x": Evil(target)}, path,
               _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(ValueError, match="posix.mkdir|os.mkdir|not allowed|Unsupported global"):
        load_published(path, Encoder)
    assert not target.exists()


def test_from_networks_saves_weights(published: Published, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = OpenAIDiscreteVAE.from_networks(Encoder(**TINY_ENCODER), Decoder(**TINY_DECODER),
                                          image_size=IMAGE_SIZE)
    vae.save_pretrained(tmp_path / "vae")
    loaded = OpenAIDiscreteVAE.from_pretrained(tmp_path / "vae")
    x = images()
    assert torch.equal(loaded.get_codebook_indices(x), vae.get_codebook_indices(x))
