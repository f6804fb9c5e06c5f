"""dalle-core's conformance suite for the torch-only backends, each in a world of one process
(a real gloo process group on 127.0.0.1; the suite of several processes is
test_distributed_torchrun.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from dalle_core.interfaces import DistributedBackend
from dalle_core.testing import BackendConformance
from dalle_train.backends.ddp import DDPBackend
from dalle_train.backends.fsdp import FSDPBackend


class OneProcessGroup(BackendConformance):
    """Sets the launcher's environment for a world of one, and leaves the group afterwards."""

    @pytest.fixture
    def backend(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[DistributedBackend]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        backend = self.make_backend()
        backend.initialize()
        yield backend
        if dist.is_initialized():
            dist.destroy_process_group()


class TestDDP(OneProcessGroup):
    def make_backend(self) -> DistributedBackend:
        return DDPBackend(timeout_s=60)


class TestFSDP(OneProcessGroup):
    def make_backend(self) -> DistributedBackend:
        return FSDPBackend(timeout_s=60)
