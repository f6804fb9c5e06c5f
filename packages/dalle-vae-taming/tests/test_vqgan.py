"""VQGanVAE from local config + checkpoint files: conformance, config-derived sizes, precision,
checkpoint safety and errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from vqgan_files import VQGanFiles, lightning_checkpoint, random_state_dict, taming_yaml

from dalle_core.pretrained import CONFIG_NAME
from dalle_core.testing import VAEConformance
from dalle_vae_taming import VQGanVAE


def load(files: VQGanFiles) -> VQGanVAE:
    return VQGanVAE(vqgan_model_path=files.model, vqgan_config_path=files.config)


class TestVQModelConformance(VAEConformance):
    @pytest.fixture
    def vae(self, vq_files: VQGanFiles) -> VQGanVAE:
        return load(vq_files)


class TestGumbelVQConformance(VAEConformance):
    @pytest.fixture
    def vae(self, gumbel_files: VQGanFiles) -> VQGanVAE:
        return load(gumbel_files)


class TestF8RGBAConformance(VAEConformance):
    @pytest.fixture
    def vae(self, f8_files: VQGanFiles) -> VQGanVAE:
        return load(f8_files)


def test_sizes_come_from_the_config(
    vq_files: VQGanFiles, gumbel_files: VQGanFiles, f8_files: VQGanFiles
) -> None:
    vq, gumbel, f8 = load(vq_files), load(gumbel_files), load(f8_files)
    assert (vq.image_size, vq.channels, vq.downsampling_factor, vq.fmap_size, vq.num_tokens) == (
        32,
        3,
        4,
        8,
        64,
    )
    assert not vq.is_gumbel and gumbel.is_gumbel and gumbel.num_tokens == 128
    # ch_mult has 4 entries: f = 8 (upstream's resolution / attn_resolutions[0] gives 32 / 2 = 16)
    assert (f8.image_size, f8.channels, f8.downsampling_factor, f8.num_layers) == (32, 4, 8, 3)
    assert f8.fmap_size == 4
    codes = f8.get_codebook_indices(torch.rand(1, 4, 32, 32))
    assert codes.shape == (1, 16)


def test_weights_are_those_of_the_checkpoint(vq_files: VQGanFiles) -> None:
    state = random_state_dict(vq_files.config.read_text(), seed=0)
    loaded = load(vq_files).model.state_dict()
    assert loaded.keys() == {key for key in state if not key.startswith("loss.")}
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)


def test_encoding_is_deterministic_and_batched(vq_files: VQGanFiles, gumbel_files: VQGanFiles) -> None:
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for files in (vq_files, gumbel_files):
        vae = load(files)
        whole = vae.get_codebook_indices(images)
        vae.encode_batch_size = 2  # 3 chunks
        assert torch.equal(vae.get_codebook_indices(images), whole)
        assert torch.equal(vae.decode(whole), torch.cat([vae.decode(whole[:2]), vae.decode(whole[2:])]))


def test_pixels_are_mapped_to_minus_one_one(vq_files: VQGanFiles) -> None:
    vae = load(vq_files)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    expected = vae.model.encode_codes(images * 2 - 1).flatten(1)
    assert torch.equal(vae.get_codebook_indices(images), expected)
    decoded = vae.decode(expected)
    reference = (vae.model.decode_codes(expected.view(2, 8, 8)).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(decoded, reference, rtol=0, atol=1e-6)


def test_fp32_under_autocast(vq_files: VQGanFiles) -> None:
    vae = load(vq_files)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    codes = vae.get_codebook_indices(images)
    decoded = vae.decode(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vae.get_codebook_indices(images), codes)
        under_autocast = vae.decode(codes)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, decoded)


def test_encoding_keeps_no_graph(vq_files: VQGanFiles) -> None:
    vae = load(vq_files)
    codes = vae.get_codebook_indices(torch.rand(1, 3, 32, 32, requires_grad=True))
    assert not codes.requires_grad


def test_bad_codes_raise(vq_files: VQGanFiles) -> None:
    vae = load(vq_files)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vae.decode(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match=r"\[batch, 64\]"):
        vae.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="floats"):
        vae.get_codebook_indices(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_source_is_recorded_and_survives_save(vq_files: VQGanFiles, tmp_path: Path) -> None:
    vae = load(vq_files)
    vae.save_pretrained(tmp_path / "vae")
    meta = json.loads((tmp_path / "vae" / CONFIG_NAME).read_text())
    assert meta["name"] == "vqgan" and meta["package"] == "dalle-vae-taming"
    assert meta["config"]["vqgan_config"] == vq_files.config.read_text()
    source = meta["config"]["source"]
    assert source["model"]["path"] == str(vq_files.model.resolve())
    assert source["model"]["sha256"] == hashlib.sha256(vq_files.model_bytes).hexdigest()
    assert source["config"]["path"] == str(vq_files.config.resolve())
    reloaded = VQGanVAE.from_pretrained(tmp_path / "vae")
    assert reloaded.config == vae.config


# ----------------------------------------------------------------------- checkpoint safety


def test_pickled_callbacks_are_skipped_not_run(vq_files: VQGanFiles, tmp_path: Path) -> None:
    # ModelCheckpoint.__setstate__ raises: were the class imported and used, loading would fail
    assert "vqgan_files.ModelCheckpoint" in torch.serialization.get_unsafe_globals_in_checkpoint(
        vq_files.model
    )
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(vq_files.model, weights_only=True)  # and plain weights_only refuses it
    load(vq_files)


class Touch:
    """Unpickling this would call Path.touch (as a malicious checkpoint could call anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Created:
    """Unpickling this would construct it, which creates the marker file."""

    marker_path: Path

    def __init__(self, marker: Path):
        marker.touch()

    def __reduce__(self):
        return (Created, (self.marker_path,))


def test_code_in_a_checkpoint_never_runs(vq_files: VQGanFiles, tmp_path: Path) -> None:
    state = random_state_dict(vq_files.config.read_text(), seed=0)
    marker = tmp_path / "marker"
    created = Created.__new__(Created)
    created.marker_path = marker
    skipped = tmp_path / "skipped.ckpt"
    torch.save({**lightning_checkpoint(state), "hyper_parameters": {"obj": created}}, skipped)
    VQGanVAE(vqgan_model_path=skipped, vqgan_config_path=vq_files.config)  # stand-in built instead
    assert not marker.exists()

    refused = tmp_path / "refused.ckpt"
    torch.save({**lightning_checkpoint(state), "hyper_parameters": Touch(marker)}, refused)
    with pytest.raises(ValueError, match="could not be loaded safely"):
        VQGanVAE(vqgan_model_path=refused, vqgan_config_path=vq_files.config)
    assert not marker.exists()


def test_not_a_checkpoint(vq_files: VQGanFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PyTorch file"):
        VQGanVAE(vqgan_model_path=vq_files.config, vqgan_config_path=vq_files.config)
    no_state = tmp_path / "weights.pt"
    torch.save({"model": random_state_dict(vq_files.config.read_text(), seed=0)}, no_state)
    with pytest.raises(ValueError, match="'state_dict'.*found \\['model'\\]"):
        VQGanVAE(vqgan_model_path=no_state, vqgan_config_path=vq_files.config)


def test_checkpoint_of_another_config(vq_files: VQGanFiles, f8_files: VQGanFiles) -> None:
    with pytest.raises(ValueError, match="does not hold the VQGAN described by .*model.yaml.*missing keys"):
        VQGanVAE(vqgan_model_path=f8_files.model, vqgan_config_path=vq_files.config)
    bigger_codebook = vq_files.config.parent / "n_embed_128.yaml"
    bigger_codebook.write_text(taming_yaml(n_embed=128))
    with pytest.raises(ValueError, match=r"quantize.embedding.weight \[64, 32\] \(config: \[128, 32\]\)"):
        VQGanVAE(vqgan_model_path=vq_files.model, vqgan_config_path=bigger_codebook)


# ------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("VQModel", "VQSegmentationModel"), "model.target is 'taming.models.vqgan.VQSegmentationModel'"),
        (("n_embed: 64", "n_embed: -1"), "model.params.n_embed must be a positive int"),
        (("      resolution: 32\n", ""), r"ddconfig lacks resolution"),
        (("double_z: false", "double_z: true"), "double_z must be false"),
        (("out_ch: 3", "out_ch: 1"), r"in_channels \(3\) and out_ch \(1\) differ"),
        (("resolution: 32", "resolution: 30"), "not a multiple of the downsampling factor 4"),
        (("ch_mult: [1, 1, 2]", "ch_mult: []"), "ch_mult must be a non-empty list"),
        (("model:", "- model:"), "has no 'model' mapping"),
        (("  target", "  target: [\n"), "is not valid YAML"),
    ],
)
def test_bad_config_names_file_and_field(vq_files: VQGanFiles, tmp_path: Path, change, message) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(taming_yaml().replace(*change, 1))
    with pytest.raises(ValueError, match=message) as error:
        VQGanVAE(vqgan_model_path=vq_files.model, vqgan_config_path=config)
    assert str(config) in str(error.value)


def test_paths_come_in_pairs(vq_files: VQGanFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass both vqgan_model_path"):
        VQGanVAE(vqgan_model_path=vq_files.model)
    with pytest.raises(FileNotFoundError, match="vqgan_model_path=.*no such file"):
        VQGanVAE(vqgan_model_path=tmp_path / "missing.ckpt", vqgan_config_path=vq_files.config)
    with pytest.raises(ValueError, match="unknown pretrained VQGAN 'nope'"):
        VQGanVAE(pretrained="nope")


def test_gumbel_vq_reads_its_own_quantizer(gumbel_files: VQGanFiles, tmp_path: Path) -> None:
    vae = load(gumbel_files)
    assert type(vae.model.quantize).__name__ == "GumbelQuantize"
    # the same weights described as a VQModel do not fit: the quantizers differ
    as_vq = tmp_path / "as_vq.yaml"
    as_vq.write_text(gumbel_files.config.read_text().replace("GumbelVQ", "VQModel"))
    with pytest.raises(ValueError, match="quantize.embed.weight|quantize.proj"):
        VQGanVAE(vqgan_model_path=gumbel_files.model, vqgan_config_path=as_vq)
