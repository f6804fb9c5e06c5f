"""dalle plugin: registers the ``horovod`` distributed backend (entry point ``dalle_dist_horovod``)."""

from __future__ import annotations

from dalle_core import hookimpl
from dalle_core.hookspecs import Register
from dalle_dist_horovod.backend import HorovodBackend


@hookimpl
def dalle_register_backends(register: Register) -> None:
    register(
        HorovodBackend.plugin_name,
        HorovodBackend,
        requires=("horovod",),
        install="dalle-build-horovod --install",
        description="Horovod allreduce over gloo, launched by horovodrun",
    )
