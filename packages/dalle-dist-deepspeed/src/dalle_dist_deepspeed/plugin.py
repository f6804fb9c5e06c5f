"""dalle plugin: registers the ``deepspeed`` distributed backend (entry point ``dalle_dist_deepspeed``)."""

from __future__ import annotations

from dalle_core import hookimpl
from dalle_core.hookspecs import Register
from dalle_dist_deepspeed.backend import DeepSpeedBackend


@hookimpl
def dalle_register_backends(register: Register) -> None:
    register(
        DeepSpeedBackend.plugin_name,
        DeepSpeedBackend,
        requires=("deepspeed",),
        install='pip install "dalle-dist-deepspeed[deepspeed]"',
        description="DeepSpeed ZeRO stages 1-3 (--zero-stage, --offload, --deepspeed-config), "
        "under deepspeed or torchrun",
    )
