"""dalle-train's plugin: the distributed backends that need nothing but torch."""

from __future__ import annotations

from dalle_core import hookimpl
from dalle_core.hookspecs import Register


@hookimpl
def dalle_register_backends(register: Register) -> None:
    from dalle_train.backends.ddp import DDPBackend
    from dalle_train.backends.fsdp import FSDPBackend

    register(DDPBackend.plugin_name, DDPBackend,
             description="torch DistributedDataParallel, one process per device, launched by torchrun")
    register(FSDPBackend.plugin_name, FSDPBackend,
             description="torch FSDP2: weights, gradients and optimizer state sharded, launched by torchrun")
