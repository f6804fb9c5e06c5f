"""Shared by the deepspeed tests: skipping without deepspeed, one-process launcher variables,
the launchers, a tiny saved VAE, tiny DALLE runs, and readers of a run's checkpoints."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason='deepspeed is not installed: pip install "dalle-dist-deepspeed[deepspeed]"'
)


#: DeepSpeed's CPU allreduce keeps 67 MB per process in these shared-memory files and removes
#: them only at a clean exit: the runs these tests kill leave theirs behind in /dev/shm (RAM)
SHARED_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def no_shared_buffers_left() -> None:
    """Delete the shared-memory buffers that the session's DeepSpeed runs leave behind."""
    shm = Path("/dev/shm")
    before = set(shm.glob(SHARED_BUFFERS)) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for left in set(shm.glob(SHARED_BUFFERS)) - before:
            left.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables a launcher sets, for one process on a free port."""
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiscreteVAE (32 px, 4x4 codes) saved as a model directory."""
    from dalle_core import DiscreteVAE

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    DiscreteVAE(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8).save_pretrained(
        path
    )
    return path


SHAPES = ["--dataset", "shapes", "--dataset-size", "64", "--threads", "1", "--sample-every", "0"]
TINY = [
    "--tokenizer",
    "bytes",
    "--text-seq-len",
    "48",
    "--dim",
    "16",
    "--depth",
    "2",
    "--heads",
    "2",
    "--dim-head",
    "8",
    "--log-every",
    "1",
]
_BIN = Path(sys.executable).parent
DEEPSPEED = (
    [str(_BIN / "deepspeed")]
    if (_BIN / "deepspeed").exists()
    else [sys.executable, "-m", "deepspeed.launcher.runner"]
)
TORCHRUN = (
    [str(_BIN / "torchrun")]
    if (_BIN / "torchrun").exists()
    else [sys.executable, "-m", "torch.distributed.run"]
)


def dalle(out: Path, vae_dir: Path, *extra: str) -> list[str]:
    """``dalle-train dalle`` arguments of a tiny DALLE on the built-in shapes."""
    return ["dalle", *SHAPES, *TINY, "--vae-path", str(vae_dir), "--output-dir", str(out), *extra]


def deepspeed_command(args: list[str], *launcher: str) -> list[str]:
    """``deepspeed --num_gpus 2`` (or ``launcher``) on a free port running ``python -m dalle_train
    ARGS`` (the launcher puts ``--local_rank=N`` before dalle-train's command)."""
    launcher = launcher or ("--num_gpus", "2")
    return [*DEEPSPEED, "--master_port", str(free_port()), *launcher, "--module", "dalle_train", *args]


def launch(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def deepspeed_run(args: list[str], *launcher: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return launch(deepspeed_command(args, *launcher), timeout)


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return launch([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "dalle_train", *args], timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    """The run's output; a failed run fails the test with its last lines."""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(step_dir / "model.safetensors")


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].dtype == wb[key].dtype == torch.float32, key
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max(float((wa[key] - wb[key]).abs().max()) for key in wa)


def losses(out: Path) -> dict[int, float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}
