"""Shared by the training tests: tiny model flags, a tiny saved VAE, and readers of a run's
checkpoints and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle_core import DiscreteVAE

TINY_VAE = ["--image-size", "32", "--num-layers", "3", "--num-tokens", "16", "--emb-dim", "8",
            "--hidden-dim", "8", "--num-resnet-blocks", "0", "--batch-size", "4"]
TINY_DALLE = ["--tokenizer", "bytes", "--text-seq-len", "48", "--dim", "16", "--depth", "2", "--heads", "2",
              "--dim-head", "8", "--batch-size", "4"]
SHAPES = ["--dataset", "shapes", "--dataset-size", "64", "--threads", "1", "--sample-every", "0"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiscreteVAE (32 px, 4x4 codes) saved as a model directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8)
    vae.save_pretrained(path)
    return path


def dalle_args(out: Path, vae_dir: Path, *extra: str) -> list[str]:
    return ["dalle", *SHAPES, *TINY_DALLE, "--vae-path", str(vae_dir), "--output-dir", str(out), *extra]


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dir / "model.safetensors")


def losses(out: Path) -> dict[int, float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)
