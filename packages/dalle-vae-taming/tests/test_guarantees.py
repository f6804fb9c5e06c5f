"""Guarantees of VQGanVAE, each a test that fails when the promise breaks.

- Model: ``decode(get_codebook_indices(x))`` is what the loaded network's own modules compute:
  encoder -> quant_conv -> its quantizer's forward (VectorQuantizer2; GumbelQuantize with hard
  codes) -> post_quant_conv -> decoder, clamped and mapped to [0, 1] (within 1e-5), for the
  VQModel, the Gumbel-VQGAN and an f8 RGBA model.
- Defaults the upstream README states: "The default VQGan is the codebook size 1024 one trained
  on imagenet" with "an extra layer of downsampling, so the image sequence length is 256
  instead of 1024".
- Safe loading: a ``.ckpt`` (local, downloaded, or in the cache as a published model, the
  Gumbel one included; zip or legacy format) holding a pickled object whose unpickling would
  call a function is refused with an error naming the file; a class the pickle would construct
  becomes an inert stand-in (Lightning callbacks) in zip files; no code ever runs. A saved
  VQGanVAE whose ``model.safetensors`` is a pickle is refused too. A Lightning checkpoint whose
  hyper-parameters are dict and list subclasses (``AttributeDict``) of a module that is not
  installed loads, and that module is never imported.
"""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from vqgan_files import (
    UNINSTALLED,
    VQGanFiles,
    lightning_checkpoint,
    random_state_dict,
    taming_yaml,
    write_uninstalled_lightning_vqgan,
    write_vqgan,
)

from dalle_core import DALLE
from dalle_core.download import OFFLINE_ENV, OfflineError
from dalle_core.plugins import create_vae, load_vae
from dalle_core.testing.fileserver import FileServer
from dalle_core.testing.pickles import (
    CALLS,
    PAYLOADS,
    ConstructOnUnpickle,
    TouchOnUnpickle,
    write_code_pickle,
)
from dalle_vae_taming import VQGanVAE
from dalle_vae_taming.checkpoint import load_lightning_state_dict

IMAGENET_CONFIG_URL = "https://heibox.uni-heidelberg.de/f/6ecf2af6c658432c8298/?dl=1"
IMAGENET_MODEL_URL = "https://heibox.uni-heidelberg.de/f/140747ba53464f49b476/?dl=1"


def load(files: VQGanFiles) -> VQGanVAE:
    return VQGanVAE(vqgan_model_path=files.model, vqgan_config_path=files.config)


def networks_reconstruction(vae: VQGanVAE, images: torch.Tensor) -> torch.Tensor:
    """taming's encode -> quantize -> decode through the loaded modules (VQModel.forward)."""
    model = vae.model
    with torch.no_grad():
        quant, _, _ = model.quantize(model.quant_conv(model.encoder(images * 2 - 1)))
        pixels = model.decoder(model.post_quant_conv(quant))
    return (pixels.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("model", ["vq_files", "gumbel_files", "f8_files"])
def test_decoded_codes_are_the_networks_reconstruction(model: str, request: pytest.FixtureRequest) -> None:
    vae = load(request.getfixturevalue(model))
    vae.encode_batch_size = 2
    if vae.is_gumbel:  # logits far apart: Gumbel noise cannot move the quantizer's hard sample
        with torch.no_grad():
            vae.model.quantize.proj.weight.mul_(1e7)
            vae.model.quantize.proj.bias.mul_(1e7)
    images = torch.rand(5, vae.channels, vae.image_size, vae.image_size,
                        generator=torch.Generator().manual_seed(3))
    codes = vae.get_codebook_indices(images)  # 3 chunks of at most 2 images
    grids = codes.view(5, vae.fmap_size, vae.fmap_size)
    assert not torch.equal(grids, grids.transpose(1, 2))  # a transposed layout would show

    model = vae.model
    with torch.no_grad():
        h = model.quant_conv(model.encoder(images * 2 - 1))
        if vae.is_gumbel:
            top2 = model.quantize.proj(h).topk(2, dim=1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 100  # Gumbel noise differs by less than 41
        indices = model.quantize(h)[2][2]
    assert torch.equal(codes, indices.reshape(5, -1))

    torch.manual_seed(0)
    decoded = vae.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, networks_reconstruction(vae, images), atol=1e-5, rtol=0)


def test_default_is_the_imagenet_1024_codes_model(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``VQGanVAE()`` loads upstream's published ImageNet model (its URLs, its cache file names);
    a config of that model's layout (256 px, f16, 1024 codes) gives 16 x 16 = 256 codes."""
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(OfflineError, match=re.escape(IMAGENET_CONFIG_URL)):
        VQGanVAE()
    layout = taming_yaml(resolution=256, ch_mult=(1, 1, 2, 2, 4), n_embed=1024, attn_resolutions=(16,))
    files = write_vqgan(tmp_path / "imagenet", layout)
    cache.mkdir()
    (cache / "vqgan.1024.config.yml").write_bytes(files.config_bytes)
    with pytest.raises(OfflineError, match=re.escape(IMAGENET_MODEL_URL)):
        VQGanVAE()
    (cache / "vqgan.1024.model.ckpt").write_bytes(files.model_bytes)

    vae = VQGanVAE()
    source = vae.config["source"]
    assert (source["config"]["url"], source["model"]["url"]) == (IMAGENET_CONFIG_URL, IMAGENET_MODEL_URL)
    assert (vae.num_tokens, vae.image_size, vae.downsampling_factor, vae.fmap_size) == (1024, 256, 16, 16)
    dalle = DALLE(vae=vae, dim=16, num_text_tokens=10000, text_seq_len=256, depth=1, heads=1, dim_head=16)
    assert (dalle.image_seq_len, dalle.num_image_tokens) == (256, 1024)


# ----------------------------------------------------------------------------- safe loading
















def code_checkpoint(files: VQGanFiles, marker: Path, payload: type, legacy_format: bool = False) -> bytes:
    """``files``' Lightning checkpoint with ``payload(marker)`` beside the weights (pickled
    first, before the callbacks)."""
    checkpoint = lightning_checkpoint(random_state_dict(files.config.read_text(), seed=0))
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": {"obj": payload(marker)}, **checkpoint}, buffer,
               _use_new_zipfile_serialization=not legacy_format)
    return buffer.getvalue()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_code_checkpoints_run_their_code_when_unpickled_unsafely(
    vq_files: VQGanFiles, tmp_path: Path, payload: type
) -> None:
    """What the tests below refuse is real: an unrestricted ``torch.load`` runs the code (and
    then the callbacks' own, which vqgan_files makes fail)."""
    marker = tmp_path / "marker"
    for legacy_format in (False, True):
        data = code_checkpoint(vq_files, marker, payload, legacy_format)
        with pytest.raises(AssertionError, match="a pickled callback was unpickled with its own code"):
            torch.load(io.BytesIO(data), weights_only=False)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("legacy_format", [False, True])
@pytest.mark.parametrize("payload", CALLS)
def test_local_checkpoint_calling_code_is_refused_unrun(
    vq_files: VQGanFiles, tmp_path: Path, payload: type, legacy_format: bool
) -> None:
    marker, path = tmp_path / "marker", tmp_path / "last.ckpt"
    path.write_bytes(code_checkpoint(vq_files, marker, payload, legacy_format))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} could not be loaded safely"):
        VQGanVAE(vqgan_model_path=path, vqgan_config_path=vq_files.config)
    assert not marker.exists()


def test_constructed_objects_are_inert_stand_ins_or_refused(vq_files: VQGanFiles, tmp_path: Path) -> None:
    """Zip checkpoints (all of Lightning's): the class is never imported or run, the weights
    load; a legacy file, whose globals cannot be listed beforehand, is refused."""
    marker, path = tmp_path / "marker", tmp_path / "last.ckpt"
    path.write_bytes(code_checkpoint(vq_files, marker, ConstructOnUnpickle))
    vae = VQGanVAE(vqgan_model_path=path, vqgan_config_path=vq_files.config)
    assert not marker.exists()
    state = random_state_dict(vq_files.config.read_text(), seed=0)
    assert all(torch.equal(value, state[key]) for key, value in vae.model.state_dict().items())

    path.write_bytes(code_checkpoint(vq_files, marker, ConstructOnUnpickle, legacy_format=True))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} could not be loaded safely"):
        VQGanVAE(vqgan_model_path=path, vqgan_config_path=vq_files.config)
    assert not marker.exists()


@pytest.mark.parametrize("payload", CALLS)
def test_downloaded_checkpoint_calling_code_is_refused_unrun(
    server: FileServer, vq_files: VQGanFiles, tmp_path: Path, payload: type
) -> None:
    marker = tmp_path / "marker"
    server.files["run/model.yaml"] = vq_files.config_bytes
    server.files["run/last.ckpt"] = code_checkpoint(vq_files, marker, payload)
    cached = f"{re.escape(str(tmp_path / 'cache' / 'urls'))}/[0-9a-f]{{16}}/last.ckpt"
    with pytest.raises(ValueError, match=f"{cached} could not be loaded safely"):
        VQGanVAE(vqgan_model_path=server.url("run/last.ckpt"), vqgan_config_path=server.url("run/model.yaml"),
                 cache_dir=tmp_path / "cache")
    assert server.requests["run/last.ckpt"] == 1
    assert not marker.exists()


@pytest.mark.parametrize(("files", "prefix", "vae_name"), [
    ("vq_files", "vqgan.1024", "vqgan"), ("gumbel_files", "vqgan.gumbel.f8.8192", "gumbel-vqgan"),
])
def test_published_checkpoint_in_the_cache_calling_code_is_refused_unrun(
    files: str, prefix: str, vae_name: str, cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
) -> None:
    """``VQGanVAE()`` / ``create_vae("gumbel-vqgan")``: the files of a published model, in the
    cache under upstream's names."""
    monkeypatch.setenv(OFFLINE_ENV, "1")
    model_files, marker = request.getfixturevalue(files), tmp_path / "marker"
    cache.mkdir()
    (cache / f"{prefix}.config.yml").write_bytes(model_files.config_bytes)
    (cache / f"{prefix}.model.ckpt").write_bytes(code_checkpoint(model_files, marker, TouchOnUnpickle))
    path = re.escape(str(cache / f"{prefix}.model.ckpt"))
    with pytest.raises(ValueError, match=f"{path} could not be loaded safely"):
        create_vae(vae_name)
    assert not marker.exists()


@pytest.mark.parametrize("saved", ["vae", "dalle"])
def test_saved_weights_that_are_a_code_pickle_are_refused_unrun(
    gumbel_files: VQGanFiles, tmp_path: Path, saved: str
) -> None:
    """A saved VQGanVAE (alone, or in a DALLE checkpoint) whose ``model.safetensors`` is a pickle."""
    vae = load(gumbel_files)
    torch.manual_seed(0)
    dalle = DALLE(vae=vae, dim=16, num_text_tokens=50, text_seq_len=4, depth=1, heads=1, dim_head=16)
    dalle.save_pretrained(tmp_path / "dalle")
    weights, marker = tmp_path / "dalle" / "vae" / "model.safetensors", tmp_path / "marker"
    write_code_pickle(weights, marker, tensors={"model.quant_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is not a safetensors file"):
        if saved == "vae":
            load_vae(tmp_path / "dalle" / "vae")
        else:
            DALLE.from_pretrained(tmp_path / "dalle")
    assert not marker.exists()


@pytest.fixture
def uninstalled_files(tmp_path: Path) -> VQGanFiles:
    """The tiny VQModel of ``vq_files`` (same config, same weights) in a checkpoint whose
    hyper-parameters and callbacks are of classes that cannot be imported."""
    return write_uninstalled_lightning_vqgan(tmp_path / "run", taming_yaml(), seed=0)


def imports_of_uninstalled(files: VQGanFiles) -> int:
    return len((files.model.parent / "imports.log").read_text().splitlines())


@pytest.mark.parametrize("importable", [False, True])
def test_lightning_hyper_parameters_of_dict_and_list_subclasses_load_unimported(
    uninstalled_files: VQGanFiles, importable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``AttributeDict`` hyper-parameters (dict and list subclasses, an object, a defaultdict)
    and callbacks keyed by a class: the weights load and the classes' module is never imported,
    whether it is absent (Lightning not installed) or could be imported."""
    assert imports_of_uninstalled(uninstalled_files) == 1  # while saving
    if importable:
        monkeypatch.syspath_prepend(str(uninstalled_files.model.parent))
    assert (importlib.util.find_spec(UNINSTALLED) is not None) == importable
    state = load_lightning_state_dict(uninstalled_files.model)
    expected = random_state_dict(taming_yaml(), seed=0)
    assert state.keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in state.items())
    assert UNINSTALLED not in sys.modules
    assert imports_of_uninstalled(uninstalled_files) == 1


def test_vqgan_from_a_lightning_checkpoint_of_uninstalled_classes(
    uninstalled_files: VQGanFiles, vq_files: VQGanFiles
) -> None:
    """``VQGanVAE(vqgan_model_path=..., vqgan_config_path=...)`` on such a checkpoint is the
    VQGAN of the same weights in a plain Lightning checkpoint: same weights, codes and images."""
    vae, reference = load(uninstalled_files), load(vq_files)
    expected = reference.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in vae.model.state_dict().items())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    codes = vae.get_codebook_indices(images)
    assert torch.equal(codes, reference.get_codebook_indices(images))
    assert torch.equal(vae.decode(codes), reference.decode(codes))
    assert UNINSTALLED not in sys.modules
    assert imports_of_uninstalled(uninstalled_files) == 1
