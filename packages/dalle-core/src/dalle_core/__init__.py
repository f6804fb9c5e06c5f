"""dalle-core: DALLE, DiscreteVAE and CLIP, and the plugin system that extends them.

Plugins add tokenizers, image VAEs, attention kernels and distributed backends through the
hooks in `dalle_core.hookspecs`; see the package README for the plugin API.
"""

from dalle_core.clip import CLIP
from dalle_core.dalle import DALLE
from dalle_core.hookspecs import hookimpl
from dalle_core.interfaces import DistributedBackend, ImageVAE, StepPlan, Tokenizer
from dalle_core.vae import DiscreteVAE

__all__ = [
    "CLIP", "DALLE", "DiscreteVAE", "DistributedBackend", "ImageVAE", "StepPlan", "Tokenizer", "hookimpl",
]
