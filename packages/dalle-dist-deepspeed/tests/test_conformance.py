"""dalle-core's backend conformance suite, in a world of one process (the launcher's variables
set by hand, gloo on a free port), at every ZeRO stage."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from conftest import needs_deepspeed

from dalle_core.testing import BackendConformance
from dalle_dist_deepspeed import DeepSpeedBackend

pytestmark = needs_deepspeed


class ZeroConformance(BackendConformance):
    stage = 1

    def make_backend(self) -> DeepSpeedBackend:
        return DeepSpeedBackend(zero_stage=self.stage)

    @pytest.fixture
    def backend(self, world_of_one):
        backend = self.make_backend()
        backend.initialize()
        yield backend
        backend.shutdown()
        assert not dist.is_initialized()


class TestZero1(ZeroConformance):
    stage = 1


class TestZero2(ZeroConformance):
    stage = 2


class TestZero3(ZeroConformance):
    stage = 3

    def test_weights_are_sharded(self, backend):
        assert backend.replicated is False
