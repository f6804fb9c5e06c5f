"""``dalle-train dalle --wds``: training from WebDataset shards in img2dataset's layout, exact
resume mid-epoch, and the errors a bad source gets before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_DALLE
from shard_writer import img2dataset_shards, jpeg, write_shard
from test_resume_guarantees import SIGTERM_EXIT, assert_same_run, latest, sigterm_during

from dalle_train.cli import main
from dalle_train.config import CaptionedData, Optimization
from dalle_train.datasets import captioned_dataset, make_batches
from dalle_train.tasks.dalle import DalleTask


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wds") / "shards"
    img2dataset_shards(folder, shards=4, per_shard=10)  # 8 samples a shard
    return folder


def from_shards(out: Path, vae_dir: Path, source: str, *extra: str) -> list[str]:
    return ["dalle", "--wds", "jpg,txt", "--image-text-folder", source, *TINY_DALLE, "--vae-path",
            str(vae_dir),
            "--threads", "1", "--sample-every", "0", "--output-dir", str(out), *extra]


def test_dalle_trains_from_img2dataset_shards_for_an_epoch(tmp_path, vae_dir, shards, capsys):
    out = tmp_path / "run"
    assert main(from_shards(out, vae_dir, str(shards), "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert f"4 shards of 32 samples in {shards} (images: jpg, captions: txt)" in printed
    assert latest(out) == "step-8"  # 32 samples in batches of 4


def test_dalle_resumes_mid_epoch_from_shards_exactly(tmp_path, vae_dir, shards, monkeypatch):
    run = ["--max-steps", "6", "--log-every", "1", "--num-workers", "2", "--null-cond-prob", "0.3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(from_shards(whole, vae_dir, str(shards), *run)) == 0
    sigterm_during(monkeypatch, DalleTask, {3})
    assert main(from_shards(split, vae_dir, str(shards), *run)) == SIGTERM_EXIT
    assert latest(split) == "step-3"
    assert main(["dalle", "--resume", "--output-dir", str(split)]) == 0
    assert_same_run(whole, split, 6)


def test_shards_of_unknown_size_need_max_steps(tmp_path, vae_dir, shards, capsys):
    piped = f"pipe:cat {shards}/{{00000..00003}}.tar"
    assert main(from_shards(tmp_path / "piped", vae_dir, piped)) == 2
    assert "the data's size is unknown" in capsys.readouterr().err
    assert main(from_shards(tmp_path / "piped", vae_dir, piped, "--max-steps", "2")) == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--image-text-folder", "/no/such/dir"], "/no/such/dir does not exist: give a folder of images with"),
    (["--wds", "jpg,txt", "--image-text-folder", "/no/such/{0..3}.tar"], "4 of 4 shards do not exist"),
    (["--wds", "jpg", "--image-text-folder", "/no/such.tar"], "--wds 'jpg' must be IMAGE_KEY,CAPTION_KEY"),
    (["--dataset", "shapes", "--resample-shards"], "--resample-shards draws WebDataset shards: it needs"),
])
def test_a_bad_source_is_an_error_before_the_default_vae_is_fetched(tmp_path, flags, message, capsys,
                                                                    monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a VAE was fetched before the data was checked")

    monkeypatch.setattr("dalle_train.commands.dalle.vae_from_args", no_download)
    assert main(["dalle", *flags, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_clip_says_it_does_not_read_shards_yet(tmp_path, shards, capsys):
    args = ["clip", "--wds", "jpg,txt", "--image-text-folder", str(shards), "--output-dir", str(tmp_path)]
    assert main(args) == 2
    assert "dalle-train clip reads folders" in capsys.readouterr().err


def test_skipped_samples_are_counted_in_the_metrics_and_summed_up_each_epoch(tmp_path, vae_dir, capsys):
    shards = tmp_path / "shards"
    good = [(f"{n}", {"jpg": jpeg((n * 20, 90, 40)), "txt": f"picture {n}".encode()}) for n in range(10)]
    write_shard(shards / "00000.tar", [*good[:5], ("bad", {"jpg": b"not a jpeg", "txt": b"broken"})])
    write_shard(shards / "00001.tar", [*good[5:], ("alone", {"jpg": jpeg((1, 2, 3))})])
    out = tmp_path / "run"
    flags = ["--batch-size", "2", "--epochs", "2", "--log-every", "1"]
    assert main(from_shards(out, vae_dir, str(shards), *flags)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert (last["skipped"], last["skipped_corrupt_image"], last["skipped_missing_caption"]) == (2, 1, 1)
    assert "epoch 0 done at step" in capsys.readouterr().out


def test_batches_are_pinned_for_a_cuda_device_only(shards):
    data = CaptionedData(dataset=None, dataset_size=0, transparent=False, image_text_folder=str(shards),
                         wds="jpg,txt")
    optim = Optimization(seed=0, epochs=1, max_steps=None, batch_size=2, ga_steps=1, learning_rate=1e-3,
                         weight_decay=0.0, clip_grad_norm=None, lr_schedule="constant")
    stream = captioned_dataset(data, 0, image_size=16, channels=3)
    assert make_batches(stream, optim, data, device=torch.device("cuda")).pin_memory
    assert not make_batches(stream, optim, data, device=torch.device("cpu")).pin_memory
