"""Pre-encoded shards: ``dalle-train encode`` and ``dalle-train dalle --tokens``."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DALLE, losses
from shard_writer import img2dataset_shards, jpeg
from test_resume_guarantees import latest

from dalle_core import DALLE, DiscreteVAE
from dalle_core.tokenizers import ByteTokenizer
from dalle_train.cli import main
from dalle_train.data.folder import ImageTextFolder
from dalle_train.data.report import SkipReport
from dalle_train.data.tokens import (
    CAPTIONS,
    CODES,
    MANIFEST,
    CodeDecoder,
    check_vae,
    codes_bytes,
    identity,
    read_codes,
    read_manifest,
    weights_sha256,
)
from dalle_train.errors import TrainError
from dalle_train.training.reload_check import CHECK_IMAGES


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs") / "pairs"
    root.mkdir()
    for number in range(12):
        (root / f"p{number:02d}.jpg").write_bytes(jpeg((number * 20, 80, 250 - number * 20), size=32))
        (root / f"p{number:02d}.txt").write_text(f"picture {number}\nanother line {number}\n")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "broken.txt").write_text("broken")
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, folder: Path, vae_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    assert main(["encode", "--image-text-folder", str(folder), "--vae-path", str(vae_dir), "--tokenizer",
                 "bytes", "--output", str(out), "--samples-per-shard", "5", "--batch-size", "4",
                 "--device", "cpu"]) == 0
    return out


def test_encode_writes_codes_captions_tokens_and_a_manifest(encoded, vae_dir, folder):
    manifest = json.loads((encoded / MANIFEST).read_text())
    vae = DiscreteVAE.from_pretrained(vae_dir)
    assert manifest["vae"]["name"] == "discrete" and manifest["vae"]["weights_sha256"] == weights_sha256(vae)
    assert manifest["tokenizer"]["name"] == "bytes" and manifest["tokenizer"]["config"] == {}
    assert manifest["image_seq_len"] == 16 and manifest["vae"]["config"] == vae.config
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2] and manifest["samples"] == 12
    assert manifest["skipped"]["corrupt_image"] == 1
    with tarfile.open(encoded / "00000.tar") as archive:
        files = {member.name: archive.extractfile(member).read() for member in archive}
    assert files["000000000.txt"] == b"picture 0\nanother line 0\n"
    tokens = json.loads(files["000000000.tokens.json"])
    assert tokens == [ByteTokenizer().encode("picture 0"), ByteTokenizer().encode("another line 0")]
    # the codes are the VAE's for the centred image, as DALLE would compute them in training
    image = ImageTextFolder(folder, 32, resize_ratio=1.0).load(1, 0).image  # p00, after broken: [3, 32, 32]
    codes = read_codes(files["000000000.codes.npy"])  # [16]
    assert torch.equal(codes, vae.get_codebook_indices(image[None])[0])
    # so a DALLE's loss from the stored codes is its loss from the pixels, encoded on the fly
    model = DALLE(vae=vae, num_text_tokens=259, text_seq_len=48, dim=16, depth=2, heads=2, dim_head=8)
    text = ByteTokenizer().tokenize(["picture 0"], 48)
    from_codes = model(text, codes[None], return_loss=True)
    assert torch.equal(from_codes, model(text, image[None], return_loss=True))


def test_training_from_tokens_never_runs_the_vae_encoder(tmp_path, encoded, vae_dir, monkeypatch):
    common = [*TINY_DALLE, "--vae-path", str(vae_dir), "--threads", "1", "--sample-every", "0", "--max-steps",
              "3", "--log-every", "1", "--lr-schedule", "constant"]
    assert main(["dalle", "--tokens", str(encoded), *common, "--output-dir", str(tmp_path / "t")]) == 0
    encoded_batches: list[int] = []
    encode = DiscreteVAE.get_codebook_indices

    def recording(self, images):
        encoded_batches.append(images.shape[0])
        return encode(self, images)

    monkeypatch.setattr(DiscreteVAE, "get_codebook_indices", recording)
    assert main(["dalle", "--tokens", str(encoded), *common, "--output-dir", str(tmp_path / "t2")]) == 0
    # only the first checkpoint's reload check encodes: its random images, once per model (saved, reloaded)
    assert encoded_batches == [CHECK_IMAGES, CHECK_IMAGES]
    assert losses(tmp_path / "t") == losses(tmp_path / "t2")
    assert latest(tmp_path / "t") == "step-3"


def test_a_dalle_with_another_vae_is_refused_naming_both(tmp_path, encoded, capsys):
    torch.manual_seed(1)
    other = tmp_path / "other-vae"
    vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8)
    vae.save_pretrained(other)
    args = ["dalle", "--tokens", str(encoded), *TINY_DALLE, "--vae-path", str(other), "--max-steps", "1",
            "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"--tokens {encoded} was encoded by VAE 'discrete'" in error and "but this DALLE's VAE is" in error


@pytest.mark.parametrize(("flags", "message"), [
    (["--tokens", "/no/such/tokens"], "--tokens /no/such/tokens is not a folder"),
    (["--tokens", "{tmp}", "--image-text-folder", "x"], "--image-text-folder and --tokens both name"),
    (["--tokens", "{tmp}"], "has no manifest.json"),
])
def test_bad_token_sources_are_refused(tmp_path, flags, message, capsys):
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert main(["dalle", *flags, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_encode_reads_shards_too(tmp_path, vae_dir):
    img2dataset_shards(tmp_path / "shards", shards=2, per_shard=5)
    out = tmp_path / "tokens"
    assert main(["encode", "--wds", "jpg,json", "--image-text-folder", str(tmp_path / "shards"),
                 "--vae-path", str(vae_dir), "--output", str(out)]) == 0
    assert json.loads((out / MANIFEST).read_text())["samples"] == 8


def test_a_shard_missing_from_the_manifest_is_named(tmp_path, encoded, vae_dir, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(encoded, partial)
    (partial / "00001.tar").unlink()
    args = ["dalle", "--tokens", str(partial), *TINY_DALLE, "--vae-path", str(vae_dir), "--max-steps", "1",
            "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    assert f"1 shards of its manifest.json are missing ({partial / '00001.tar'})" in capsys.readouterr().err


def raw_sample(**files: bytes) -> dict:
    return {"__key__": "k7", "__url__": "/data/00003.tar", **files}


def test_the_code_decoder_draws_a_line_and_skips_what_it_cannot_read(caplog):
    decoder = CodeDecoder(image_seq_len=4, seed=5)
    codes = codes_bytes(torch.tensor([1, 2, 3, 4]))
    lines = b"first line\nsecond line\n"
    sample = decoder(raw_sample(**{CODES: codes, CAPTIONS: lines}), epoch=2, shard=3, index=7)
    assert sample.source == "k7 in /data/00003.tar" and torch.equal(sample.image, torch.tensor([1, 2, 3, 4]))
    assert sample.image.dtype == torch.long

    def captions(where: list[tuple[int, int, int]], seed: int = 5) -> set[str]:
        raw = raw_sample(**{CODES: codes, CAPTIONS: lines})
        return {CodeDecoder(4, seed=seed)(raw, *at).caption for at in where}

    # one line a sample, drawn from (seed, epoch, shard, index): each of them changes the draw
    assert captions([(2, 3, 7)] * 3) == {sample.caption}
    both = {"first line", "second line"}
    assert captions([(epoch, 3, 7) for epoch in range(16)]) == both
    assert captions([(2, shard, 7) for shard in range(16)]) == both
    assert captions([(2, 3, index) for index in range(16)]) == both
    assert set().union(*(captions([(0, 0, 0)], seed) for seed in range(16))) == both
    many = raw_sample(**{CODES: codes, CAPTIONS: "\n".join(f"line {n}" for n in range(16)).encode()})
    draws = [(0, shard, index) for shard in range(4) for index in range(4)]
    assert [CodeDecoder(4)(many, *at).caption for at in draws] == [CodeDecoder(4, seed=0)(many, *at).caption
                                                                  for at in draws]  # the default seed is 0

    bad = {
        "missing_image": raw_sample(**{CAPTIONS: lines}),
        "missing_caption": raw_sample(**{CODES: codes}),
        "corrupt_image": raw_sample(**{CODES: b"not npy", CAPTIONS: lines}),
        "empty_caption": raw_sample(**{CODES: codes, CAPTIONS: b" \n"}),
    }
    reasons = {"missing_image": "no codes.npy file in the sample",
               "missing_caption": "no txt file in the sample",
               "corrupt_image": "unreadable codes (", "empty_caption": "the caption is empty"}
    for kind, raw in bad.items():
        report = SkipReport()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dalle_train.data"):
            assert CodeDecoder(4, report=report)(raw, 0, 0, 0) is None
        assert report.count(kind) == 1 and report.sources(kind) == ["k7 in /data/00003.tar"], kind
        assert f"skipping k7 in /data/00003.tar: {reasons[kind]}" in caplog.text, kind
    report = SkipReport()
    short = raw_sample(**{CODES: codes_bytes(torch.tensor([1, 2, 3])), CAPTIONS: lines})
    with caplog.at_level(logging.WARNING, logger="dalle_train.data"):
        assert CodeDecoder(4, report=report)(short, 0, 0, 0) is None
    assert report.count("corrupt_image") == 1
    assert "skipping k7 in /data/00003.tar: 3 codes, not 4" in caplog.text


def test_codes_round_trip_as_int32_npy_and_other_arrays_are_refused():
    data = codes_bytes(torch.tensor([0, 511, 7]))
    assert np.load(io.BytesIO(data), allow_pickle=False).dtype == np.int32
    assert read_codes(data).tolist() == [0, 511, 7]
    for array in (np.zeros((2, 2), np.int32), np.zeros(3, np.float32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        with pytest.raises(ValueError, match="expected a 1-d integer array"):
            read_codes(buffer.getvalue())
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        read_codes(pickled.getvalue())


def test_identity_names_class_config_and_weights(vae_dir):
    vae = DiscreteVAE.from_pretrained(vae_dir)
    assert identity(None) is None
    assert identity(vae) == {"name": "discrete", "class": "dalle_core.vae.DiscreteVAE", "config": vae.config,
                             "weights_sha256": weights_sha256(vae)}
    assert identity(ByteTokenizer()) == {"name": "bytes", "class": "dalle_core.tokenizers.ByteTokenizer",
                                         "config": {}, "weights_sha256": None}
    changed = DiscreteVAE.from_pretrained(vae_dir)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    assert weights_sha256(changed) != weights_sha256(vae)


def test_the_vae_check_names_both_vaes(tmp_path, vae_dir):
    vae = DiscreteVAE.from_pretrained(vae_dir)
    manifest = {"vae": {"name": "vqgan", "class": "dalle_vae_taming.VQGan", "weights_sha256": "ab" * 32}}
    with pytest.raises(TrainError) as error:
        check_vae(manifest, vae, tmp_path)
    assert str(error.value) == (
        f"--tokens {tmp_path} was encoded by VAE 'vqgan' (dalle_vae_taming.VQGan, weights sha256 "
        f"abababababab...), but this DALLE's VAE is 'discrete' (dalle_core.vae.DiscreteVAE, weights sha256 "
        f"{weights_sha256(vae)[:12]}...): train with the VAE that encoded them (--vae-path), or encode again "
        f"with this one")
    check_vae({"vae": identity(vae)}, vae, tmp_path)  # the same VAE passes


def test_manifests_that_are_not_ours_are_refused(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(TrainError, match=f"--tokens: {tmp_path / MANIFEST} cannot be read"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(TrainError, match="is not a manifest of dalle-train encode"):
        read_manifest(tmp_path)
