"""dalle-vae-openai's plugin: registers the VAE ``openai`` (``--vae openai``).

The factory is the class itself: ``create_vae("openai", **kwargs)`` calls
``OpenAIDiscreteVAE(**kwargs)`` (which downloads OpenAI's files on first use, not on import),
and `dalle_core.plugins.load_vae` rebuilds a saved one with ``OpenAIDiscreteVAE.from_pretrained``.
Importing this module loads no weights and needs nothing beyond torch.
"""

from __future__ import annotations

from dalle_core import hookimpl
from dalle_core.hookspecs import Register
from dalle_vae_openai.vae import OpenAIDiscreteVAE


@hookimpl
def dalle_register_vaes(register: Register) -> None:
    register(
        OpenAIDiscreteVAE.plugin_name,
        OpenAIDiscreteVAE,
        description="OpenAI's pretrained DALL-E discrete VAE: 256 px, 8192 codes, f8 "
        "(downloaded on first use)",
    )
