"""Taming Transformers' pretrained VQGAN and Gumbel-VQGAN as dalle image VAEs.

``from dalle_vae_taming import VQGanVAE``; registered as ``--vae vqgan`` (and ``gumbel-vqgan``).
Importing this package does not import taming, which is needed only to build a model.
"""

from dalle_vae_taming.vae import VQGanVAE

__all__ = ["VQGanVAE"]
