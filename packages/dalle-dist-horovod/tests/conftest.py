"""Shared by the tests: whether Horovod is here, ``horovodrun`` and ``torchrun`` running
dalle-train, a tiny saved VAE, and readers of a run's checkpoints and metrics.

Every test that needs Horovod is skipped, saying how to get it, when ``horovod.torch`` does not
import or ``horovodrun`` is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle_core import DiscreteVAE


def _horovod_problem() -> str | None:
    """Why the Horovod tests cannot run here, or None."""
    try:
        import horovod.torch  # noqa: F401
    except ImportError as error:
        return f"horovod.torch does not import ({error}): build it with 'dalle-build-horovod --install'"
    if not HOROVODRUN.exists():
        return f"{HOROVODRUN} is missing (horovod is installed without its launcher)"
    return None


HOROVODRUN = Path(sys.executable).with_name("horovodrun")
HOROVOD_PROBLEM = _horovod_problem()
requires_horovod = pytest.mark.skipif(HOROVOD_PROBLEM is not None, reason=str(HOROVOD_PROBLEM))

SHAPES = ["--dataset", "shapes", "--dataset-size", "64", "--threads", "1", "--sample-every", "0"]
TINY = ["--tokenizer", "bytes", "--text-seq-len", "48", "--dim", "16", "--depth", "2", "--heads", "2",
        "--dim-head", "8", "--log-every", "1"]
TINY_VAE = ["--image-size", "32", "--num-layers", "2", "--num-tokens", "16", "--emb-dim", "8",
            "--hidden-dim", "8", "--num-resnet-blocks", "0"]
#: what a worker of a launcher needs beyond the test's environment: one thread, no progress bars
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiscreteVAE (32 px, 4x4 codes) saved as a model directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8)
    vae.save_pretrained(path)
    return path


def dalle(out: Path, vae_dir: Path, *extra: str) -> list[str]:
    """``dalle-train dalle`` arguments of a tiny run on the built-in shapes."""
    return ["dalle", *SHAPES, *TINY, "--vae-path", str(vae_dir), "--output-dir", str(out), *extra]


def vae(out: Path, *extra: str) -> list[str]:
    """``dalle-train vae`` arguments of a tiny run on the built-in shapes."""
    return ["vae", *SHAPES, *TINY_VAE, "--log-every", "1", "--output-dir", str(out), *extra]


def horovodrun_command(args: list[str], processes: int = 2, hosts: str | None = None) -> list[str]:
    """``hosts``: horovodrun's ``-H`` (default ``localhost:<processes>``)."""
    return [str(HOROVODRUN), "-np", str(processes), "-H", hosts or f"localhost:{processes}", "--gloo",
            sys.executable, "-m", "dalle_train", *args, "--distributed-backend", "horovod"]


def environment() -> dict[str, str]:
    return {**os.environ, **WORKER_ENV}


def horovodrun(args: list[str], processes: int = 2, timeout: float = 180, hosts: str | None = None
               ) -> subprocess.CompletedProcess:
    """``horovodrun -np N -H localhost:N --gloo python -m dalle_train ARGS --distributed-backend
    horovod`` (``hosts``: another ``-H``)."""
    return subprocess.run(horovodrun_command(args, processes, hosts), capture_output=True, text=True,
                          timeout=timeout, env=environment())


def torchrun(args: list[str], processes: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m dalle_train ARGS --distributed-backend ddp``."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "dalle_train", *args, "--distributed-backend", "ddp"],
                          capture_output=True, text=True, timeout=timeout, env=environment())


def one_process(args: list[str]) -> None:
    """dalle-train in this process (backend ``none``), checked to succeed."""
    from dalle_train import cli

    assert cli.main(args) == 0


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dir / "model.safetensors")


def losses(out: Path) -> dict[int, float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)
