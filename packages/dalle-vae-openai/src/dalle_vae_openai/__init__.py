"""OpenAI's pretrained DALL-E discrete VAE as a dalle image VAE plugin (``--vae openai``).

::

    from dalle_core import DALLE
    from dalle_vae_openai import OpenAIDiscreteVAE

    dalle = DALLE(vae=OpenAIDiscreteVAE(), dim=1024, num_text_tokens=10000, text_seq_len=256, depth=12)
"""

from dalle_core.download import ChecksumError, DownloadError, default_cache_dir
from dalle_vae_openai.networks import Decoder, Encoder, map_pixels, unmap_pixels
from dalle_vae_openai.vae import OPENAI_DECODER_URL, OPENAI_ENCODER_URL, OpenAIDiscreteVAE

__all__ = [
    "OPENAI_DECODER_URL",
    "OPENAI_ENCODER_URL",
    "ChecksumError",
    "Decoder",
    "DownloadError",
    "Encoder",
    "OpenAIDiscreteVAE",
    "default_cache_dir",
    "map_pixels",
    "unmap_pixels",
]
