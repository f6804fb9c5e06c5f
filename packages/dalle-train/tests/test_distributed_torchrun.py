"""``--distributed-backend ddp`` and ``fsdp`` through the real launcher: ``torchrun`` starting 2 CPU
processes that talk over gloo on this machine.

- 2 processes at batch b reach the weights of 1 process at batch 2b (float tolerance), with the
  same losses; only the root writes metrics and says how the run ended;
- a run of 2 processes resumes exactly in 2 processes, and resumes in 1 (and a run of 1 in 2);
- two launchers as two "nodes" rendezvousing on 127.0.0.1 train as one run;
- a process killed with SIGKILL, or one whose optimizer step raises, ends the whole run within a
  bounded time, the launcher naming it (and its error);
- without a launcher, or with a backend that is not installed, the error says what to do;
- fsdp: 2 processes equal 1 with accumulated, clipped gradients; its checkpoints are ordinary
  (the root's samples reload them), resume exactly in fsdp, and continue in ddp as fsdp would,
  and fsdp continues ddp's, optimizer state included;
- when the command returns, no gloo thread is left for the interpreter's teardown (ddp, fsdp).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import losses, weights
from shard_writer import img2dataset_shards

from dalle_core.testing.processes import worker_rank, workers
from dalle_train import cli

SHAPES = ["--dataset", "shapes", "--dataset-size", "64", "--threads", "1", "--sample-every", "0"]
TINY = ["--tokenizer", "bytes", "--text-seq-len", "48", "--dim", "16", "--depth", "2", "--heads", "2",
        "--dim-head", "8", "--log-every", "1"]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun"))]
if not Path(TORCHRUN[0]).exists():  # an environment without the console script
    TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def dalle(out: Path, vae_dir: Path, *extra: str) -> list[str]:
    return ["dalle", *SHAPES, *TINY, "--vae-path", str(vae_dir), "--output-dir", str(out), *extra]


def torchrun(args: list[str], *launcher: str, backend: str = "ddp", timeout: float = 240
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2`` (or ``launcher``) running dalle-train."""
    launcher = launcher or ("--standalone", "--nproc_per_node", "2")
    command = [*TORCHRUN, *launcher, "-m", "dalle_train", *args, "--distributed-backend", backend]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def one_process(args: list[str]) -> None:
    assert cli.main(args) == 0


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_two_processes_at_b_are_one_process_at_2b_and_resume_across_world_sizes(
        tmp_path: Path, vae_dir: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    out = ok(torchrun(dalle(two, vae_dir, "--batch-size", "2", "--max-steps", "3")))
    one_process(dalle(one, vae_dir, "--batch-size", "4", "--max-steps", "3"))
    assert out.count("done: step 3") == 1  # the root alone says how it ended
    assert "distributed: ddp, 2 processes x --batch-size 2 x --ga-steps 1 = 4 samples per optimizer" in out
    assert_close_weights(two / "checkpoints/step-3", one / "checkpoints/step-3", atol=1e-6)
    two_losses, one_losses = losses(two), losses(one)
    assert list(two_losses) == [1, 2, 3]  # one record per step: only the root writes
    assert two_losses == pytest.approx(one_losses, abs=1e-5)

    # the same world size resumes exactly: 2 processes to step 3, then to 5, is a straight 5
    # (a constant rate: the cosine schedule would depend on --max-steps)
    straight = tmp_path / "straight"
    constant = ["--batch-size", "2", "--lr-schedule", "constant"]
    ok(torchrun(dalle(straight, vae_dir, *constant, "--max-steps", "5")))
    resumed = tmp_path / "resumed"
    ok(torchrun(dalle(resumed, vae_dir, *constant, "--max-steps", "3")))
    ok(torchrun(dalle(resumed, vae_dir, "--resume", "--max-steps", "5")))
    assert_close_weights(resumed / "checkpoints/step-5", straight / "checkpoints/step-5", atol=0)
    state = torch.load(resumed / "checkpoints/step-5/training/state.pt", weights_only=True)
    assert len(state["rng_by_rank"]) == 2 and state["data"]["position"] == 20

    # another world size: the run of 2 continues in 1 process, the run of 1 in 2
    one_process(dalle(two, vae_dir, "--resume", "--max-steps", "4"))
    ok(torchrun(dalle(one, vae_dir, "--resume", "--max-steps", "4", "--batch-size", "2")))
    for run in (two, one):
        assert (run / "checkpoints/step-4/model.safetensors").is_file()
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])["step"] == 4


@pytest.mark.slow
def test_two_processes_read_their_own_shards_and_resume_exactly(tmp_path: Path, vae_dir: Path) -> None:
    shards = tmp_path / "shards"
    img2dataset_shards(shards, shards=4, per_shard=10)  # 8 samples a shard, one reader a shard
    wds = ["--wds", "jpg,txt", "--image-text-folder", str(shards), "--batch-size", "2", "--num-workers", "2",
           "--lr-schedule", "constant"]

    def run(out: Path, *extra: str) -> str:
        args = ["dalle", *TINY, *wds, "--threads", "1", "--sample-every", "0", "--vae-path", str(vae_dir),
                "--output-dir", str(out), *extra]
        return ok(torchrun(args))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, "--max-steps", "5")
    run(resumed, "--max-steps", "3")
    state = torch.load(resumed / "checkpoints/step-3/training/state.pt", weights_only=True)
    positions = [data["positions"] for data in state["data_by_rank"]]
    assert [sorted(p) for p in positions] == [["0", "1"], ["2", "3"]]  # rank r: readers 2r, 2r + 1
    run(resumed, "--resume", "--max-steps", "5")
    assert_close_weights(resumed / "checkpoints/step-5", straight / "checkpoints/step-5", atol=0)
    assert losses(resumed) == losses(straight)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_run(tmp_path: Path, vae_dir: Path) -> None:
    port = free_port()
    nodes = tmp_path / "nodes"
    args = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "loopback", "-m", "dalle_train",
            *dalle(nodes, vae_dir, "--batch-size", "2", "--max-steps", "3"), "--distributed-backend", "ddp"]
    launchers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    one = tmp_path / "one"
    one_process(dalle(one, vae_dir, "--batch-size", "4", "--max-steps", "3"))
    assert_close_weights(nodes / "checkpoints/step-3", one / "checkpoints/step-3", atol=1e-6)


@pytest.mark.slow
def test_a_killed_process_ends_the_run(tmp_path: Path, vae_dir: Path) -> None:
    launcher = start_long_run(tmp_path / "killed", vae_dir)
    try:
        ranks = workers(launcher.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output = launcher.communicate(timeout=90)[0]
        ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert ended_after < 60, f"the run went on for {ended_after:.0f} s after a process was killed"
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]
    assert all(worker_rank(pid) is None for pid in ranks.values())  # no process left behind


#: put on PYTHONPATH: in the process of rank 1 only, the optimizer's third step raises
FAILING_RANK = """
import os
if os.environ.get("RANK") == "1":
    import torch
    real_step, steps = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("injected failure in the process of rank 1")
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_an_exception_in_one_process_ends_the_run_with_its_error(tmp_path: Path, vae_dir: Path,
                                                                 backend: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(FAILING_RANK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "dalle_train",
         *dalle(tmp_path / "run", vae_dir, "--batch-size", "2", "--max-steps", "100000"),
         "--distributed-backend", backend],
        capture_output=True, text=True, env=env, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert time.monotonic() - started < 120, "the run went on long after a process failed"
    assert "RuntimeError: injected failure in the process of rank 1" in output, output[-3000:]
    assert "rank      : 1" in output  # torchrun names the process that failed first


def start_long_run(out: Path, vae_dir: Path) -> subprocess.Popen:
    """A 2-process run that would go on for hours, once it has logged its first step."""
    launcher = subprocess.Popen(
        [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "dalle_train",
         *dalle(out, vae_dir, "--batch-size", "2", "--max-steps", "100000"), "--distributed-backend", "ddp"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            pytest.fail("the run did not start: " + launcher.communicate()[0][-3000:])
        time.sleep(0.2)
    return launcher


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_a_checkpoint_and_the_run_resumes(tmp_path: Path,
                                                                         vae_dir: Path) -> None:
    out = tmp_path / "stopped"
    launcher = start_long_run(out, vae_dir)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=90)[0]
    latest = (out / "checkpoints/latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert f"stopped by signal 15 at step {step}" in output, output[-3000:]
    ok(torchrun(dalle(out, vae_dir, "--resume", "--max-steps", str(step + 2))))
    assert (out / f"checkpoints/step-{step + 2}/model.safetensors").is_file()


def test_without_a_launcher_or_the_backend_the_error_says_what_to_do(
        tmp_path: Path, vae_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for backend in ("ddp", "fsdp"):
        assert cli.main(dalle(tmp_path / backend, vae_dir, "--distributed-backend", backend)) == 2
        error = capsys.readouterr().err
        flag = f"--distributed-backend {backend}"
        assert f"{flag}: the {backend} backend runs under a launcher that sets RANK" in error
        assert f"torchrun --nproc_per_node N $(which dalle-train) COMMAND ... {flag}" in error
    for flags in (["--distributed-backend", "deepspeed"], ["--deepspeed"]):
        assert cli.main(dalle(tmp_path / "b", vae_dir, *flags)) == 2
        assert "pip install dalle-dist-deepspeed" in capsys.readouterr().err
    assert cli.main(dalle(tmp_path / "c", vae_dir, "--deepspeed", "--distributed-backend", "ddp")) == 2
    assert "--deepspeed means --distributed-backend deepspeed" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_is_one_process_and_its_checkpoints_are_ordinary(tmp_path: Path, vae_dir: Path) -> None:
    steps = ["--batch-size", "2", "--lr-schedule", "constant", "--ga-steps", "2", "--clip-grad-norm", "0.05"]
    straight, one = tmp_path / "straight", tmp_path / "one"
    out = ok(torchrun(dalle(straight, vae_dir, *steps, "--max-steps", "5", "--sample-every", "1",
                            "--save-every-n-steps", "2"), backend="fsdp"))
    assert "distributed: fsdp, 2 processes x --batch-size 2 x --ga-steps 2 = 8 samples" in out
    one_process(dalle(one, vae_dir, *steps[2:], "--batch-size", "4", "--max-steps", "5"))
    assert_close_weights(straight / "checkpoints/step-5", one / "checkpoints/step-5", atol=1e-6)
    assert losses(straight) == pytest.approx(losses(one), abs=1e-5)
    # the root's samples come from each saved checkpoint, reloaded as an ordinary DALLE
    assert sorted(p.name for p in (straight / "samples").glob("*.png")) == [
        f"dalle-step-000000{step}.png" for step in (2, 4, 5)]

    # resumed in fsdp: exact; in ddp: the same numbers; fsdp resuming ddp's run: the same too
    straight_5 = straight / "checkpoints/step-5"
    resumes = (("fsdp", "fsdp", "fsdp"), ("to-ddp", "fsdp", "ddp"), ("from-ddp", "ddp", "fsdp"))
    for name, first, then in resumes:
        run = tmp_path / name
        ok(torchrun(dalle(run, vae_dir, *steps, "--max-steps", "3"), backend=first))
        ok(torchrun(dalle(run, vae_dir, "--resume", "--max-steps", "5"), backend=then))
        assert_close_weights(run / "checkpoints/step-5", straight_5, atol=0 if name == "fsdp" else 1e-6)


#: runs dalle-train as torchrun's script, then prints the gloo threads still alive in the process
GLOO_THREADS_AFTER_MAIN = """
import os, sys
from dalle_train import cli
code = cli.main(sys.argv[1:])
tasks = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print(f"rank {os.environ['RANK']} gloo threads after main: {sorted(t for t in tasks if 'gloo' in t)}")
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's threads from /proc")
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_the_process_group_and_its_threads_are_gone_when_the_command_returns(
        tmp_path: Path, vae_dir: Path, backend: str) -> None:
    """Left for the interpreter's teardown, gloo's threads can end a finished run with SIGABRT
    (pytorch PR 179291); fsdp's mesh used to keep the group alive in DTensor's caches, and
    torch.distributed.nn.functional's defaults kept the group once FSDP imported it."""
    script = tmp_path / "run_and_list_threads.py"
    script.write_text(GLOO_THREADS_AFTER_MAIN)
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script),
         *dalle(tmp_path / "run", vae_dir, "--batch-size", "2", "--max-steps", "2"),
         "--distributed-backend", backend],
        capture_output=True, text=True, timeout=240)
    out = ok(result)
    for rank in (0, 1):
        assert f"rank {rank} gloo threads after main: []" in out, out[-3000:]
