"""``--distributed-backend deepspeed`` through the real launchers: ``deepspeed --num_gpus 2`` (and
``torchrun``) starting 2 CPU processes that talk over gloo, running ``python -m dalle_train``.

- ZeRO 1 (with --ga-steps 2, upstream's ``--deepspeed`` spelling) and ZeRO 2 (stage and extra
  keys from a --deepspeed-config file): 2 processes at batch b reach the weights and losses of
  1 process at batch 2b;
- ZeRO-3 with bf16 under torchrun: the consolidated checkpoint holds fp32 weights equal to
  DeepSpeed's own fp32 partitions, loads in one process (``dalle-train generate``), and the
  root's sample pictures come from it;
- a ZeRO-2 run resumes exactly from DeepSpeed's files, and resumes with its optimizer's moments
  under ``none`` in 1 process and under ZeRO-3 (another stage: DeepSpeed's files are refused, the
  ordinary checkpoint is used); a run of ``none`` continues under ZeRO-1;
- a configuration file that contradicts the flags is an error listing every conflict;
- a process killed with SIGKILL ends the whole run within a bounded time;
- two torchrun launchers as two "nodes" rendezvousing on 127.0.0.1 train ZeRO-2 as one run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import (
    TORCHRUN,
    assert_close_weights,
    dalle,
    deepspeed_command,
    deepspeed_run,
    free_port,
    launch,
    losses,
    needs_deepspeed,
    ok,
    torchrun,
    weights,
)

from dalle_core.testing.processes import worker_rank, workers
from dalle_train import cli

pytestmark = [needs_deepspeed, pytest.mark.slow]
#: 2 processes at batch b against 1 at 2b: the same sums in another order
ATOL = 1e-6


def one_process(args: list[str]) -> None:
    assert cli.main(args) == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_at_b_are_one_process_at_2b(stage: int, tmp_path: Path, vae_dir: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    if stage == 1:  # the upstream spelling, the stage from the flag, gradient accumulation
        flags, ga = ["--deepspeed", "--zero-stage", "1"], ["--ga-steps", "2"]
        per_process, whole = ["--batch-size", "1", *ga], ["--batch-size", "2", *ga]
    else:  # the stage and DeepSpeed-only keys from a file; a key repeating a flag is fine
        config = tmp_path / "ds.json"
        config.write_text(
            json.dumps(
                {
                    "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                    "gradient_accumulation_steps": 1,
                }
            )
        )
        flags = ["--distributed-backend", "deepspeed", "--deepspeed-config", str(config)]
        per_process, whole = ["--batch-size", "2"], ["--batch-size", "4"]
    out = ok(deepspeed_run([*dalle(two, vae_dir, *per_process, "--max-steps", "3"), *flags]))
    one_process(dalle(one, vae_dir, *whole, "--max-steps", "3"))
    assert out.count("done: step 3") == 1  # the root alone says how it ended
    assert "distributed: deepspeed, 2 processes x --batch-size" in out
    assert_close_weights(two / "checkpoints/step-3", one / "checkpoints/step-3", atol=ATOL)
    two_losses, one_losses = losses(two), losses(one)
    assert list(two_losses) == [1, 2, 3]  # one record per step: only the root writes
    assert two_losses == pytest.approx(one_losses, abs=1e-5)
    engine = two / "checkpoints/step-3/engine"
    assert json.loads((engine / "dalle_engine.json").read_text())["zero_stage"] == stage
    given = json.loads(out.split("deepspeed: ZeRO stage ")[1].split(", configuration ", 1)[1].splitlines()[0])
    assert given["zero_optimization"]["stage"] == stage
    assert given["gradient_accumulation_steps"] == (2 if stage == 1 else 1)
    if stage == 2:  # the file's own key reached DeepSpeed
        assert given["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_zero3_consolidated_checkpoint_is_deepspeeds_fp32_weights_and_loads_in_one_process(
    tmp_path: Path, vae_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run, one = tmp_path / "zero3", tmp_path / "one"
    bf16 = ["--precision", "bf16", "--max-steps", "3"]
    out = ok(
        torchrun(
            [
                *dalle(run, vae_dir, "--batch-size", "2", *bf16),
                "--distributed-backend",
                "deepspeed",
                "--zero-stage",
                "3",
            ]
        )
    )
    assert "done: step 3" in out
    step = run / "checkpoints/step-3"
    saved = weights(step)
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # bf16 compute, fp32 weights
    partitions = get_fp32_state_dict_from_zero_checkpoint(str(step / "engine"), tag="zero")
    trained = {key: value for key, value in partitions.items() if not key.startswith("vae.")}  # vae/: its own
    assert trained and set(trained) <= set(saved)
    for key, value in trained.items():
        torch.testing.assert_close(saved[key], value.float(), rtol=0, atol=0, msg=key)
    # the root's sample picture, from the checkpoint reloaded whole
    assert (run / "samples/dalle-step-0000003.png").is_file()
    # bf16 sums in another order: the same training, not the same bits
    one_process(dalle(one, vae_dir, "--batch-size", "4", *bf16))
    assert losses(run) == pytest.approx(losses(one), abs=1e-2)
    capsys.readouterr()
    assert (
        cli.main(
            [
                "generate",
                "--dalle_path",
                str(step),
                "--text",
                "a red circle",
                "--outputs_dir",
                str(tmp_path / "images"),
                "--num_images",
                "2",
                "--batch_size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "images/a-red-circle").glob("*.png")) == [
        "0.png",
        "1.png",
        "grid.png",
    ]


def test_exact_resume_and_resume_elsewhere(tmp_path: Path, vae_dir: Path) -> None:
    """(a constant rate: the cosine schedule would depend on --max-steps)"""
    constant = ["--batch-size", "2", "--lr-schedule", "constant"]
    zero2 = ["--distributed-backend", "deepspeed", "--zero-stage", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(deepspeed_run([*dalle(straight, vae_dir, *constant, "--max-steps", "5"), *zero2]))
    ok(deepspeed_run([*dalle(resumed, vae_dir, *constant, "--max-steps", "3"), *zero2]))
    for other in ("in_none", "in_zero3"):
        shutil.copytree(resumed, tmp_path / other)
    out = ok(deepspeed_run([*dalle(resumed, vae_dir, "--resume", "--max-steps", "5"), *zero2]))
    assert (
        f"deepspeed: resumed exactly from DeepSpeed's own files in {resumed}/checkpoints/step-3/engine" in out
    )
    assert_close_weights(resumed / "checkpoints/step-5", straight / "checkpoints/step-5", atol=0)
    state = torch.load(resumed / "checkpoints/step-5/training/state.pt", weights_only=True)
    assert len(state["rng_by_rank"]) == 2 and state["data"]["position"] == 20
    assert state["optimizer"]["state"], "the ordinary checkpoint holds the optimizer's state too"

    # 1 process, no DeepSpeed: the weights and the optimizer's moments (not just the weights:
    # a restarted AdamW moves each weight by about the learning rate, 3e-4, in its first step)
    one_process(dalle(tmp_path / "in_none", vae_dir, "--resume", "--max-steps", "5", "--batch-size", "4"))
    assert_close_weights(tmp_path / "in_none/checkpoints/step-5", straight / "checkpoints/step-5", atol=ATOL)

    # another ZeRO stage: DeepSpeed's files do not fit, the ordinary checkpoint does
    out = ok(
        deepspeed_run(
            [
                *dalle(tmp_path / "in_zero3", vae_dir, "--resume", "--max-steps", "5"),
                "--deepspeed",
                "--zero-stage",
                "3",
            ]
        )
    )
    assert (
        "not resuming from DeepSpeed's own files: "
        "DeepSpeed's checkpoint was written with zero_stage 2 (now 3)" in out
    )
    assert_close_weights(tmp_path / "in_zero3/checkpoints/step-5", straight / "checkpoints/step-5", atol=ATOL)

    # and a run of one process continues under ZeRO-1 in 2
    alone = tmp_path / "alone"
    one_process(dalle(alone, vae_dir, "--batch-size", "4", "--lr-schedule", "constant", "--max-steps", "3"))
    ok(
        deepspeed_run(
            [*dalle(alone, vae_dir, "--resume", "--max-steps", "5", "--batch-size", "2"), "--deepspeed"]
        )
    )
    assert_close_weights(alone / "checkpoints/step-5", straight / "checkpoints/step-5", atol=ATOL)


def test_a_conflicting_configuration_file_lists_every_conflict(
    tmp_path: Path, vae_dir: Path, world_of_one, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a world of one process (the check runs when the engine is built, in every process)."""
    from dalle_dist_deepspeed import DeepSpeedConfigError

    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps(
            {
                "gradient_accumulation_steps": 4,
                "train_micro_batch_size_per_gpu": 8,
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "Adam"},
            }
        )
    )
    args = [
        *dalle(tmp_path / "run", vae_dir, "--batch-size", "2", "--ga-steps", "2"),
        "--deepspeed",
        "--zero-stage",
        "2",
        "--deepspeed-config",
        str(config),
    ]
    try:  # a TrainError (exit 2) once the loop turns a backend's ValueError from wrap into one (NEEDS.md)
        assert cli.main(args) == 2
        message = capsys.readouterr().err
    except DeepSpeedConfigError as error:
        message = str(error)
    assert '"optimizer": the trainer builds AdamW' in message
    config.write_text(
        json.dumps(
            {
                "gradient_accumulation_steps": 4,
                "train_micro_batch_size_per_gpu": 8,
                "zero_optimization": {"stage": 3},
            }
        )
    )
    try:
        assert cli.main(args) == 2
        message = capsys.readouterr().err
    except DeepSpeedConfigError as error:
        message = str(error)
    assert "--deepspeed-config contradicts the flags" in message
    assert '"gradient_accumulation_steps": file says 4, --ga-steps says 2' in message
    assert '"train_micro_batch_size_per_gpu": file says 8, --batch-size says 2' in message
    assert '"zero_optimization.stage": file says 3, --zero-stage says 2' in message
    assert not dist.is_initialized()  # the run left the process group


def test_a_killed_process_ends_the_run(tmp_path: Path, vae_dir: Path) -> None:
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        deepspeed_command(
            [*dalle(out, vae_dir, "--batch-size", "2", "--max-steps", "100000"), "--deepspeed"]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the run did not start: " + launcher.communicate(timeout=30)[0][-3000:])
            time.sleep(0.2)
        ranks = workers(launcher.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output = launcher.communicate(timeout=90)[0]
        ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's own session: only what this test started
            launcher.wait()
    print(f"the run ended {ended_after:.1f} s after rank 1 was killed")
    assert launcher.returncode != 0
    assert ended_after < 60, f"the run went on for {ended_after:.0f} s after a process was killed"
    # the launcher names the first process it sees end: the killed one, or rank 0, whose collective
    # failed because its peer was gone (a race; seen once in CI)
    peer_gone = "Connection reset by peer" in output and "exits with return code = 1" in output
    assert "exits with return code = -9" in output or peer_gone, output[-3000:]
    assert all(worker_rank(pid) is None for pid in ranks.values())  # no process left behind


def test_the_deepspeed_launchers_own_command_line(tmp_path: Path, vae_dir: Path) -> None:
    """``deepspeed --num_gpus 2 $(which dalle-train) ...``, as the README says: the launcher puts
    ``--local_rank=N`` before dalle-train's command."""
    script = shutil.which("dalle-train", path=str(Path(sys.executable).parent)) or shutil.which("dalle-train")
    assert script, "the dalle-train console script is installed with dalle-train"
    command = deepspeed_command([], "--num_gpus", "2")
    command = [
        *command[: command.index("--module")],
        script,
        *dalle(tmp_path / "run", vae_dir, "--batch-size", "2", "--max-steps", "1"),
        "--deepspeed",
    ]
    assert "done: step 1" in ok(launch(command))


def test_two_nodes_on_loopback_train_as_one_run(tmp_path: Path, vae_dir: Path) -> None:
    nodes, one = tmp_path / "nodes", tmp_path / "one"
    args = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "loopback", "-m", "dalle_train",
            *dalle(nodes, vae_dir, "--batch-size", "2", "--max-steps", "3"), "--deepspeed",
            "--zero-stage", "2"]
    launchers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], [o[-3000:] for o in outputs]
    one_process(dalle(one, vae_dir, "--batch-size", "4", "--max-steps", "3"))
    assert_close_weights(nodes / "checkpoints/step-3", one / "checkpoints/step-3", atol=ATOL)
