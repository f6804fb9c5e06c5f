"""dalle-core's backend conformance suite, with Horovod in this process as a world of one (gloo
without a rendezvous: what ``horovodrun -np 1`` would give, without the launcher's start-up)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import requires_horovod

from dalle_core.interfaces import DistributedBackend
from dalle_core.testing.backend import BackendConformance
from dalle_dist_horovod import HorovodBackend

pytestmark = requires_horovod


class TestHorovodBackend(BackendConformance):
    def make_backend(self) -> DistributedBackend:
        return HorovodBackend()

    @pytest.fixture
    def backend(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[DistributedBackend]:
        # what horovodrun -np 1 sets: the backend refuses to start without a launcher's variables
        for name in ("HOROVOD_RANK", "HOROVOD_LOCAL_RANK", "HOROVOD_CROSS_RANK"):
            monkeypatch.setenv(name, "0")
        for name in ("HOROVOD_SIZE", "HOROVOD_LOCAL_SIZE", "HOROVOD_CROSS_SIZE"):
            monkeypatch.setenv(name, "1")
        backend = self.make_backend()
        backend.initialize()
        yield backend
        backend.shutdown()  # Horovod initializes again in the next test
