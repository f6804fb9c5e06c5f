"""``--distributed-backend horovod`` through the real launcher: ``horovodrun -np 2 -H localhost:2
--gloo`` starting 2 CPU processes on this machine.

- 2 processes at batch b reach the weights of 1 process at batch 2b (float tolerance) with the
  same losses, also accumulating 2 micro-batches with clipped gradients (so the gradients are
  averaged across processes before they are clipped); every save succeeding shows that both
  processes held the same weights (the trainer compares them before each save);
- a run of 2 processes resumes exactly in 2; a checkpoint of 1 process (``none``) continues in 2
  horovod processes as it does in 1, and one of 2 horovod processes continues alike in 1 process
  and in 2 ddp processes (``torchrun``): the optimizer's state and the learning-rate schedule
  survive the change of backend;
- the VAE command trains under horovod too;
- two "hosts" of one slot each (``-H localhost:1,127.0.0.1:1``) train as one run;
- a process killed with SIGKILL ends the whole run, non-zero, within a bounded time;
- SIGTERM to horovodrun reaches every process: they agree on a step, save it and stop, and the
  run resumes from it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_close_weights,
    dalle,
    environment,
    horovodrun,
    horovodrun_command,
    losses,
    ok,
    one_process,
    requires_horovod,
    torchrun,
    vae,
)

from dalle_core.testing.processes import worker_rank, workers

pytestmark = requires_horovod


def test_two_processes_at_b_are_one_process_at_2b_and_resume_exactly(tmp_path: Path, vae_dir: Path) -> None:
    # a constant rate: an exact resume to step 5 of a run that stopped at 3 needs the same rates
    constant = ["--lr-schedule", "constant"]
    two, one = tmp_path / "two", tmp_path / "one"
    out = ok(horovodrun(dalle(two, vae_dir, *constant, "--batch-size", "2", "--max-steps", "3"))).stdout
    one_process(dalle(one, vae_dir, *constant, "--batch-size", "4", "--max-steps", "3"))
    assert out.count("done: step 3") == 1, out  # the root alone says how it ended
    assert "distributed: horovod, 2 processes x --batch-size 2 x --ga-steps 1 = 4 samples" in out
    assert_close_weights(two / "checkpoints/step-3", one / "checkpoints/step-3", atol=1e-5)
    assert list(losses(two)) == [1, 2, 3]  # one record per step: only the root writes
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)

    straight = tmp_path / "straight"
    ok(horovodrun(dalle(straight, vae_dir, *constant, "--batch-size", "2", "--max-steps", "5")))
    ok(horovodrun(dalle(two, vae_dir, "--resume", "--max-steps", "5")))
    assert_close_weights(two / "checkpoints/step-5", straight / "checkpoints/step-5", atol=0)
    assert losses(two) == losses(straight)
    state = torch.load(two / "checkpoints/step-5/training/state.pt", weights_only=True)
    assert len(state["rng_by_rank"]) == 2 and state["data"]["position"] == 20

    # the horovod run continues alike in 1 process and in 2 ddp processes
    in_one = tmp_path / "in-one"
    shutil.copytree(straight, in_one)
    one_process(dalle(in_one, vae_dir, "--resume", "--max-steps", "6", "--batch-size", "4"))
    ok(torchrun(dalle(two, vae_dir, "--resume", "--max-steps", "6")))
    assert_close_weights(in_one / "checkpoints/step-6", two / "checkpoints/step-6", atol=1e-5)


def test_a_one_process_checkpoint_continues_in_two_horovod_processes_as_in_one(
        tmp_path: Path, vae_dir: Path) -> None:
    """A cosine schedule and AdamW's moments: both must reach the distributed optimizer."""
    start = tmp_path / "start"
    one_process(dalle(start, vae_dir, "--batch-size", "4", "--max-steps", "2"))
    in_one, in_two = tmp_path / "in-one", tmp_path / "in-two"
    shutil.copytree(start, in_one)
    shutil.copytree(start, in_two)
    one_process(dalle(in_one, vae_dir, "--resume", "--max-steps", "4"))
    ok(horovodrun(dalle(in_two, vae_dir, "--resume", "--max-steps", "4", "--batch-size", "2")))
    assert_close_weights(in_two / "checkpoints/step-4", in_one / "checkpoints/step-4", atol=1e-5)
    assert losses(in_two) == pytest.approx(losses(in_one), abs=1e-5)


def test_accumulated_and_clipped_gradients_are_averaged_before_clipping(tmp_path: Path,
                                                                        vae_dir: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    steps = ["--ga-steps", "2", "--clip-grad-norm", "0.05", "--max-steps", "3"]
    out = ok(horovodrun(dalle(two, vae_dir, "--batch-size", "1", *steps))).stdout
    assert "2 processes x --batch-size 1 x --ga-steps 2 = 4 samples" in out
    one_process(dalle(one, vae_dir, "--batch-size", "2", *steps))
    assert_close_weights(two / "checkpoints/step-3", one / "checkpoints/step-3", atol=1e-5)
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)


def test_two_hosts_on_loopback_train_as_one_run(tmp_path: Path, vae_dir: Path) -> None:
    hosts, one = tmp_path / "hosts", tmp_path / "one"
    two_hosts = "localhost:1,127.0.0.1:1"
    ok(horovodrun(dalle(hosts, vae_dir, "--batch-size", "2", "--max-steps", "3"), hosts=two_hosts))
    one_process(dalle(one, vae_dir, "--batch-size", "4", "--max-steps", "3"))
    assert_close_weights(hosts / "checkpoints/step-3", one / "checkpoints/step-3", atol=1e-5)


def test_the_vae_trains_under_horovod(tmp_path: Path) -> None:
    out = tmp_path / "vae"
    printed = ok(horovodrun(vae(out, "--batch-size", "2", "--max-steps", "2", "--ga-steps", "2"))).stdout
    assert printed.count("done: step 2") == 1, printed
    assert (out / "checkpoints/step-2/model.safetensors").is_file()
    assert list(losses(out)) == [1, 2]


def start_long_run(out: Path, vae_dir: Path) -> subprocess.Popen:
    """A run of 2 processes that would go on for hours, once it has logged its first step (in
    its own process group, so that a failed test can end all of it)."""
    launcher = subprocess.Popen(
        horovodrun_command(dalle(out, vae_dir, "--batch-size", "2", "--max-steps", "100000")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        if launcher.poll() is not None or time.monotonic() > deadline:
            os.killpg(launcher.pid, signal.SIGKILL)
            pytest.fail("the run did not start: " + launcher.communicate()[0][-3000:])
        time.sleep(0.2)
    return launcher


def test_a_killed_process_ends_the_run(tmp_path: Path, vae_dir: Path) -> None:
    out = tmp_path / "killed"
    launcher = start_long_run(out, vae_dir)
    try:
        ranks = workers(launcher.pid, "HOROVOD_RANK")
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output = launcher.communicate(timeout=120)[0]
        ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0, output[-3000:]
    assert "Process name: 1\nExit code: 137" in output, output[-3000:]  # horovodrun names the killed one
    assert ended_after < 60, f"the run went on for {ended_after:.0f} s after a process was killed"
    time.sleep(1)
    assert all(worker_rank(pid, "HOROVOD_RANK") is None for pid in ranks.values()), "a worker outlived"


def test_sigterm_to_horovodrun_saves_a_checkpoint_and_the_run_resumes(tmp_path: Path, vae_dir: Path) -> None:
    out = tmp_path / "stopped"
    launcher = start_long_run(out, vae_dir)
    try:
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    # the workers end with 128 + 15 after saving; horovodrun's own exit code varies (0 or 1,
    # depending on whether it saw them exit before its own signal handling ended it)
    latest = (out / "checkpoints/latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert f"stopped by signal 15 at step {step}" in output, output[-3000:]
    ok(horovodrun(dalle(out, vae_dir, "--resume", "--max-steps", str(step + 2))))
    assert (out / f"checkpoints/step-{step + 2}/model.safetensors").is_file()
