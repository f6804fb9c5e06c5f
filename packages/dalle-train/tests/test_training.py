"""The training commands end to end on tiny models: checkpoints, exact resume, interruptions,
refusals. Everything runs on the CPU in a few seconds per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHAPES, TINY_DALLE, TINY_VAE, assert_same_weights, dalle_args, losses

from dalle_core import DiscreteVAE
from dalle_train.cli import main
from dalle_train.training.checkpoints import STATE_FILE
from dalle_train.training.layout import CHECKPOINTS, LATEST, TRAINING_STATE


def test_vae_run_writes_checkpoints_metrics_and_pictures(tmp_path: Path) -> None:
    out = tmp_path / "vae"
    argv = ["vae", *SHAPES, *TINY_VAE, "--max-steps", "4", "--save-every-n-steps", "2",
            "--keep-n-checkpoints", "1", "--log-every", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    checkpoints = out / CHECKPOINTS
    assert sorted(p.name for p in checkpoints.iterdir()) == [LATEST, "step-4"]  # step-2 pruned
    assert (checkpoints / LATEST).read_text().strip() == "step-4"
    assert (checkpoints / "step-4" / TRAINING_STATE / STATE_FILE).is_file()
    assert DiscreteVAE.from_pretrained(checkpoints / "step-4").num_tokens == 16
    assert sorted(losses(out)) == [1, 2, 3, 4]
    pictures = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert pictures == ["codebook-step-0000004.png", "vae-step-0000004.png"]


def test_resume_reaches_the_same_weights_and_losses(tmp_path: Path, vae_dir: Path) -> None:
    flags = ["--lr-schedule", "constant", "--log-every", "1", "--save-every-n-steps", "3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(dalle_args(whole, vae_dir, *flags, "--max-steps", "6")) == 0
    assert main(dalle_args(split, vae_dir, *flags, "--max-steps", "3")) == 0
    # a resume takes every flag it is not given from the checkpoint
    assert main(["dalle", "--resume", "--output-dir", str(split), "--max-steps", "6"]) == 0
    assert_same_weights(whole / CHECKPOINTS / "step-6", split / CHECKPOINTS / "step-6")
    assert losses(whole) == losses(split)


def test_resume_refuses_different_model_flags(tmp_path: Path, vae_dir: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(dalle_args(out, vae_dir, "--max-steps", "1")) == 0
    code = main(["dalle", "--resume", "--output-dir", str(out), "--dim", "32", "--depth", "3"])
    error = capsys.readouterr().err
    assert code == 2
    assert "--dim 32 (checkpoint: 16)" in error and "--depth 3 (checkpoint: 2)" in error
    assert "--start-fresh" in error


def test_existing_checkpoints_need_resume_or_start_fresh(tmp_path: Path, vae_dir: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(dalle_args(out, vae_dir, "--max-steps", "1")) == 0
    assert main(dalle_args(out, vae_dir, "--max-steps", "1")) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(dalle_args(out, vae_dir, "--max-steps", "2", "--start-fresh")) == 0
    assert (out / CHECKPOINTS / LATEST).read_text().strip() == "step-2"


def test_corrupt_training_state_is_refused(tmp_path: Path, vae_dir: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(dalle_args(out, vae_dir, "--max-steps", "1")) == 0
    state = out / CHECKPOINTS / "step-1" / TRAINING_STATE / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    assert main(["dalle", "--resume", "--output-dir", str(out), "--max-steps", "2"]) == 2
    assert "not a readable training state" in capsys.readouterr().err


def test_half_written_checkpoint_is_never_picked_up(tmp_path: Path, vae_dir: Path) -> None:
    out = tmp_path / "run"
    assert main(dalle_args(out, vae_dir, "--max-steps", "1")) == 0
    partial = out / CHECKPOINTS / ".tmp-step-7-999"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    assert main(["dalle", "--resume", "--output-dir", str(out), "--max-steps", "2"]) == 0
    assert not partial.exists()
    assert (out / CHECKPOINTS / LATEST).read_text().strip() == "step-2"


def run_in_subprocess(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "DALLE_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dalle_train", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, vae_dir: Path, how: str) -> None:
    flags = ["--max-steps", "40", "--save-every-n-steps", "2", "--log-every", "1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(dalle_args(whole, vae_dir, *flags)) == 0

    process = run_in_subprocess(dalle_args(cut, vae_dir, *flags))
    wait_for(cut / CHECKPOINTS / LATEST, process)
    process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    if how == "SIGTERM":
        assert process.returncode == 128 + signal.SIGTERM, stderr
        assert "continue with: --resume" in stdout
    else:
        assert process.returncode == -signal.SIGKILL
    stopped_at = (cut / CHECKPOINTS / LATEST).read_text().strip()
    assert stopped_at != "step-40", "the run ended before the signal: nothing was tested"

    assert main(["dalle", "--resume", "--output-dir", str(cut)]) == 0
    assert_same_weights(whole / CHECKPOINTS / "step-40", cut / CHECKPOINTS / "step-40")
    resumed = losses(cut)
    assert all(resumed[step] == loss for step, loss in losses(whole).items() if step in resumed)


def test_caption_too_long_names_the_file(tmp_path: Path, vae_dir: Path, capsys) -> None:
    from PIL import Image

    data = tmp_path / "data" / "nested"
    data.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square\n" if i else "x" * 100 + "\n")
    argv = ["dalle", "--image-text-folder", str(tmp_path / "data"), *TINY_DALLE, "--vae-path", str(vae_dir),
            "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--sample-every", "0"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "0.png" in error and "--truncate-captions" in error
    assert main([*argv, "--truncate-captions", "--start-fresh"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["vae", "--image-folder", "/does/not/exist"], "/does/not/exist"),
    (["vae"], "--image-folder DIR or --dataset shapes"),
    (["vae", "--dataset", "shapes", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["dalle", "--dataset", "shapes", "--vae", "no-such-vae", "--tokenizer", "bytes"], "no-such-vae"),
    (["dalle", "--dataset", "shapes", "--fp16", "--precision", "bf16"], "--fp16"),
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, argv: list[str], message: str, capsys) -> None:
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and "Traceback" not in error


def test_clip_reports_retrieval_on_held_out_pairs(tmp_path: Path) -> None:
    out = tmp_path / "clip"
    argv = ["clip", *SHAPES, "--tokenizer", "bytes", "--text-seq-len", "48", "--visual-image-size", "32",
            "--visual-patch-size", "16", "--dim-text", "16", "--dim-image", "16", "--dim-latent", "16",
            "--text-enc-depth", "1", "--visual-enc-depth", "1", "--text-heads", "2", "--visual-heads", "2",
            "--batch-size", "8", "--max-steps", "2", "--eval-size", "8", "--output-dir", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("text_to_image_top1" in r for r in records)
    assert (out / "samples" / "clip-step-0000002.png").is_file()
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()


EMOJI = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "emoji-twemoji"


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/datasets/emoji-twemoji is not beside the repo")
def test_dalle_trains_on_the_real_emoji_folder(tmp_path: Path, vae_dir: Path, capsys) -> None:
    out = tmp_path / "emoji"
    argv = ["dalle", "--image-text-folder", str(EMOJI), *TINY_DALLE, "--vae-path", str(vae_dir),
            "--truncate-captions", "--max-steps", "2", "--sample-every", "2", "--threads", "1",
            "--output-dir", str(out)]
    assert main(argv) == 0
    assert "1911 image-text pairs" in capsys.readouterr().out
    assert (out / "samples" / "dalle-step-0000002.png").is_file()


class NanTask:
    """A loss that turns NaN at step 3 (after a checkpoint at step 2)."""

    name, tokens_per_sample = "nan", 0

    def __init__(self) -> None:
        self.model = torch.nn.Linear(2, 1)

    def loss(self, batch, step):
        value = self.model(torch.ones(1, 2)).sum()
        return value * float("nan") if step >= 2 else value

    def batch_size(self, batch):
        return 1

    def status(self, step):
        return {}


class Endless:
    """Batches for NanTask: nothing in them matters."""

    batches_per_epoch, epoch = 100, 0

    def __iter__(self):
        while True:
            yield None

    def state_dict(self):
        return {}


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    from dalle_core.pretrained import PretrainedMixin
    from dalle_train.errors import TrainError
    from dalle_train.training.loop import LoopSettings, train
    from dalle_train.training.metrics import MetricsLog
    from dalle_train.training.optim import Schedule, build_optimizer
    from dalle_train.training.precision import Precision

    class Linear(PretrainedMixin, torch.nn.Linear):
        def __init__(self):
            super().__init__(2, 1)
            self.config = {}

    task = NanTask()
    task.model = Linear()
    optimizer = build_optimizer(task.model, 1e-3, 0.0)
    settings = LoopSettings(Precision("fp32", torch.device("cpu")), max_steps=10, save_every=2, log_every=5)
    with pytest.raises(TrainError, match=r"loss became nan by step 4; the last good checkpoint is .*step-2"):
        train(task, Endless(), optimizer, Schedule(optimizer, "constant", 10), settings, tmp_path,
              MetricsLog(tmp_path), {"config": {}})
    assert (tmp_path / CHECKPOINTS / LATEST).read_text().strip() == "step-2"


def test_tensorboard_log(tmp_path: Path, vae_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(dalle_args(out, vae_dir, "--max-steps", "2", "--tensorboard", "--log-every", "1")) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
