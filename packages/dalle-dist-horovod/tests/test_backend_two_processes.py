"""`HorovodBackend` in two processes under ``horovodrun -np 2 -H localhost:2 --gloo``
(backend_worker.py), compared with the same computation in one process: weights broadcast from
rank 0, gradients averaged (not summed) across processes before they are clipped, accumulation
over ``ga_steps`` micro-batches, an optimizer's state broadcast and loaded back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import HOROVODRUN, environment, requires_horovod

pytestmark = requires_horovod

WORKER = Path(__file__).with_name("backend_worker.py")
CHECKS = ["world", "average any gather", "broadcast", "step ga_steps=1 clip=None",
          "step ga_steps=2 clip=None", "step ga_steps=2 clip=0.05", "step ga_steps=3 clip=0.05",
          "optimizer state", "shutdown"]


def test_the_backend_in_two_processes_matches_one() -> None:
    result = subprocess.run([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                             str(WORKER)], capture_output=True, text=True, timeout=120, env=environment())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for rank in (0, 1):
        passed = [line.split("ok ", 1)[1] for line in result.stdout.splitlines()
                  if line.startswith(f"[{rank}]<stdout>:ok ")]
        assert passed == CHECKS, result.stdout
