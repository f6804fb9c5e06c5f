"""A third-party VAE plugin, installed as a package (tests/plugins/dalle-vae-toy: a plain
``nn.Module`` with its own ``config.json`` format, importing nothing of dalle-core), through the
command line end to end: listed, conformant, trained with ``--vae toy``, checkpointed, resumed
and generated from; a VAE whose reload differs stops the run at its first checkpoint, and one
that cannot be reloaded is refused before training."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch
from conftest import SHAPES, TINY_DALLE

from dalle_core import DALLE
from dalle_core.plugins import VAE_RECORD, create_vae
from dalle_core.testing import VAEConformance
from dalle_train import cli
from dalle_train.training.layout import CHECKPOINTS, LATEST

TOY = "packages/dalle-train/tests/plugins/dalle-vae-toy"


@pytest.fixture(scope="module", autouse=True)
def toy_installed() -> None:
    try:
        version("dalle-vae-toy")
    except PackageNotFoundError:
        pytest.fail(f"the test plugin dalle-vae-toy is not installed: pip install ./{TOY} (noxfile.py's "
                    f"tests session installs it through [tool.dalle.install] of dalle-train)")


class TestToyVAE(VAEConformance):
    def make_vae(self):
        return create_vae("toy", image_size=16, num_tokens=32, shift=5)


def train(out: Path, vae: str, *extra: str) -> int:
    return cli.main(["dalle", *SHAPES, *TINY_DALLE, "--vae", vae, "--output-dir", str(out),
                     "--max-steps", "2", "--save-every", "1", *extra])


def test_listed_with_its_package(capsys):
    assert cli.main(["plugins"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["toy", "dalle-vae-toy", "0.3.0", "yes"] in [row[:4] for row in rows]


def test_trains_checkpoints_resumes_and_generates_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "toy") == 0
    step = out / CHECKPOINTS / "step-2"
    assert (out / CHECKPOINTS / LATEST).read_text().strip() == "step-2"
    own = json.loads((step / "vae" / "config.json").read_text())
    assert own == {"image_size": 32, "patch": 8, "num_tokens": 32, "dim": 8, "shift": 0}  # the plugin's own
    record = json.loads((step / "vae" / VAE_RECORD).read_text())
    assert record == {"name": "toy", "package": "dalle-vae-toy", "version": "0.3.0",
                      "class": "dalle_vae_toy.ToyVAE"}
    assert type(DALLE.from_pretrained(step).vae).__name__ == "ToyVAE"

    assert cli.main(["dalle", "--output-dir", str(out), "--resume", "--max-steps", "3"]) == 0
    assert (out / CHECKPOINTS / LATEST).read_text().strip() == "step-3"

    images = tmp_path / "images"
    assert cli.main(["generate", "--dalle-path", str(out), "--text", "a red circle", "--num-images", "2",
                     "--batch-size", "2", "--seed", "0", "--outputs-dir", str(images)]) == 0
    assert sorted(p.name for p in (images / "a-red-circle").glob("*.png")) == ["0.png", "1.png", "grid.png"]
    capsys.readouterr()
    assert cli.main(["generate", "--dalle-path", str(out), "--vae", "toy", "--text", "a red circle",
                     "--num-images", "1", "--seed", "0", "--outputs-dir", str(images / "again")]) == 0


def test_a_vae_that_reloads_differently_stops_the_run_at_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "toy-forgetful") == 2
    error = capsys.readouterr().err
    assert ("the run's first checkpoint does not reload as it was saved: its VAE (ToyVAE) gives other codes "
            "for the same images after reloading") in error
    assert not (out / CHECKPOINTS / LATEST).exists()


def test_a_vae_that_cannot_be_reloaded_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "toy-unsaveable") == 2
    error = capsys.readouterr().err
    assert ("--vae toy-unsaveable: VAE 'toy-unsaveable' (from dalle-vae-toy) registers no loader and its "
            "factory has no from_pretrained, so a saved one could not be rebuilt; its checkpoints could not "
            "be used") in error
    assert not (out / CHECKPOINTS).exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()


def test_the_recorded_plugin_reloads_a_vae_path(tmp_path):
    from dalle_core.plugins import save_vae

    torch.manual_seed(0)
    save_vae(create_vae("toy", shift=2), tmp_path / "vae")
    out = tmp_path / "run"
    assert cli.main(["dalle", *SHAPES, *TINY_DALLE, "--vae-path", str(tmp_path / "vae"), "--output-dir",
                     str(out), "--max-steps", "1"]) == 0
    assert DALLE.from_pretrained(out / CHECKPOINTS / "step-1").vae.shift == 2
