"""The ``deepspeed`` distributed backend for dalle-train: DeepSpeed's ZeRO stages 1-3, optimizer
offload, DeepSpeed's own checkpoint for exact resumes beside the ordinary consolidated one.

Importing this package never imports deepspeed (`DeepSpeedBackend` does when initialised).
"""

from dalle_dist_deepspeed.backend import DeepSpeedBackend
from dalle_dist_deepspeed.config import DeepSpeedConfigError, build_config

__all__ = ["DeepSpeedBackend", "DeepSpeedConfigError", "build_config"]
