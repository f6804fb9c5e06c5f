"""``dalle-train dalle``'s model set-up, checked in-process without training:

- ``--dalle-path`` of a run's checkpoint resumes it (it becomes the checkpoint to resume from);
  of a model directory it gives the starting weights, and model flags given with it are refused,
  each named in its dashed spelling; without ``--dalle-path`` there is no starting point;
- a new DALLE has the tokenizer's vocabulary as its text tokens and, without a VAE flag, the
  ``openai`` VAE (as upstream); a model the flags cannot build is a one-line error with the
  model's own message; a loaded one takes ``--checkpointing`` from the command line;
- `run` trains the model on ``--device``, with the task on that device.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHAPES, TINY_DALLE

from dalle_core import DALLE, DiscreteVAE
from dalle_core.backends import SingleProcessBackend
from dalle_train import choices
from dalle_train.cli import build_parser, given_flags
from dalle_train.commands import dalle
from dalle_train.errors import TrainError
from dalle_train.training.checkpoints import save_checkpoint
from dalle_train.training.layout import CHECKPOINTS


def namespace(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["dalle", *argv])
    args.given = given_flags(["dalle", *argv])
    return args


def parse(*argv: str) -> dalle.DalleConfig:
    return dalle.DalleConfig.from_args(namespace(*argv))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, vae_dir: Path) -> Path:
    """A tiny DALLE saved as a model directory (no training state)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dalle") / "model"
    dalle.build_model(parse(*TINY_DALLE, "--vae-path", str(vae_dir)), None).save_pretrained(path)
    return path


def test_dalle_path_of_a_run_resumes_it(tmp_path: Path, model_dir: Path) -> None:
    config = parse(*SHAPES)
    assert dalle.start_point(config) == (config, None)
    out = tmp_path / "run"
    save_checkpoint(out / CHECKPOINTS, 3, DALLE.from_pretrained(model_dir), {"step": 3}, keep=None)
    config = parse(*SHAPES, "--dalle-path", str(out), "--dim", "16")
    resumed, start_from = dalle.start_point(config)
    assert start_from is None and resumed.launch.resume_from == out / CHECKPOINTS / "step-3"
    assert resumed == replace(config, launch=replace(config.launch, resume_from=resumed.launch.resume_from))


def test_dalle_path_of_a_model_starts_from_it_and_refuses_model_flags(model_dir: Path) -> None:
    args = parse(*SHAPES, "--dalle-path", str(model_dir), "--learning-rate", "0.1", "--batch-size", "2")
    assert dalle.start_point(args) == (args, model_dir)
    args = parse(*SHAPES, "--dalle-path", str(model_dir), "--vae_path", "v", "--learning-rate", "0.1",
                 "--text-seq-len", "9")
    with pytest.raises(TrainError) as caught:
        dalle.start_point(args)
    assert str(caught.value) == (
        f"--text-seq-len, --vae-path cannot be combined with --dalle-path {model_dir}: "
        f"the model, its VAE and tokenizer come from that checkpoint")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_loaded_model_takes_checkpointing_from_the_flag(model_dir: Path, checkpointing: bool) -> None:
    args = parse(*SHAPES, *(["--checkpointing"] if checkpointing else []))
    model = dalle.build_model(args, model_dir)
    assert model.transformer.activation_checkpointing is checkpointing


def test_new_model_uses_the_tokenizer_vocabulary_and_the_openai_vae_by_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8)

    def create_vae(name: str, **kwargs: Any) -> DiscreteVAE:
        asked.append(name)
        return vae

    monkeypatch.setattr(choices, "create_vae", create_vae)
    model = dalle.build_model(parse(*SHAPES, *TINY_DALLE), None)
    assert asked == ["openai"] and model.vae is vae
    assert model.num_text_tokens == model.tokenizer.vocab_size == model.config["num_text_tokens"]


@pytest.mark.parametrize("flag", ["--attn-types", "--attn-kernel"])  # a ValueError, an UnknownPluginError
def test_a_model_the_flags_cannot_build_is_a_one_line_error(vae_dir: Path, flag: str) -> None:
    args = parse(*SHAPES, *TINY_DALLE, "--vae-path", str(vae_dir), flag, "nonsense")
    with pytest.raises((ValueError, LookupError)) as direct:
        DALLE(vae=DiscreteVAE.from_pretrained(vae_dir), num_text_tokens=300, **dalle.model_kwargs(args.model))
    with pytest.raises(TrainError) as caught:
        dalle.build_model(args, None)
    assert str(caught.value) == str(direct.value) and "'nonsense'" in str(direct.value)


class SecondOfThree(SingleProcessBackend):
    """Stands in for process 1 of 3."""

    rank, world_size = 1, 3


def test_run_trains_on_the_device_and_reads_this_process_batches(tmp_path: Path, vae_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    meta = torch.device("meta")  # stands in for another device than the one the model is built on
    prepare_run = dalle.prepare_run

    def on_meta(config: dalle.DalleConfig) -> Any:
        run = prepare_run(config)
        run.device, run.backend = meta, SecondOfThree()
        return run

    seen: list[Any] = []
    monkeypatch.setattr(dalle, "prepare_run", on_meta)
    monkeypatch.setattr(dalle, "fit", lambda task, batches, run: seen.append((task, batches, run)) or 7)
    args = namespace(*SHAPES, *TINY_DALLE, "--vae-path", str(vae_dir), "--output-dir", str(tmp_path))
    assert dalle.run(args) == 7
    task, batches, run = seen[0]
    assert run.device == meta and task.device == meta
    assert {p.device for p in task.model.parameters()} == {meta}
    assert batches.world_size == 3 and batches.rank_slice == slice(4, 8)  # --batch-size 4, process 1


@pytest.mark.parametrize("flag", ["--shared-attn-ids", "--shared-ff-ids"])
def test_shared_ids_that_are_not_integers_are_a_one_line_error(vae_dir: Path, flag: str) -> None:
    args = parse(*SHAPES, *TINY_DALLE, "--vae-path", str(vae_dir), flag, "0,one")
    message = "^shared ids must be comma-separated integers like 0,1,0,1, got '0,one'$"
    with pytest.raises(TrainError, match=message):
        dalle.model_kwargs(args.model)
