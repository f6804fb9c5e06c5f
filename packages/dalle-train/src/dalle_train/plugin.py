"""dalle-train's plugin: the distributed backends that need nothing but torch."""

from __future__ import annotations

from dalle_core import hookimpl
from dalle_core.hookspecs import Register


@hookimpl
def dalle_register_backends(register: Register) -> None:
    from dalle_train.backends.ddp import DDPBackend

    register(DDPBackend.plugin_name, DDPBackend,
             description="torch DistributedDataParallel, one process per device, launched by torchrun")
