"""Conformance suites that plugin packages subclass in their own tests (needs pytest).

::

    from dalle_core.testing import VAEConformance

    class TestMyVAE(VAEConformance):
        def make_vae(self):
            return MyVAE(image_size=32)

The base classes have no ``Test`` prefix, so pytest collects only the subclasses.
"""

import pytest

# before the imports below, so that failing asserts inside the suites are explained
pytest.register_assert_rewrite(
    "dalle_core.testing.attention",
    "dalle_core.testing.backend",
    "dalle_core.testing.tokenizer",
    "dalle_core.testing.vae",
)

from dalle_core.testing.attention import (  # noqa: E402
    AttentionKernelConformance,
    brute_force_allowed,
    brute_force_mask,
    reference_attention,
)
from dalle_core.testing.backend import BackendConformance  # noqa: E402
from dalle_core.testing.tokenizer import TokenizerConformance  # noqa: E402
from dalle_core.testing.vae import VAEConformance  # noqa: E402

__all__ = [
    "AttentionKernelConformance",
    "BackendConformance",
    "TokenizerConformance",
    "VAEConformance",
    "brute_force_allowed",
    "brute_force_mask",
    "reference_attention",
]
