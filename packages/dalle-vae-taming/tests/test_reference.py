"""Codes and images of VQGanVAE against taming's own ``VQModel`` and ``GumbelVQ`` classes, run
the way upstream dalle-pytorch ran them (``model.encode`` for codes; the codebook entries
through ``model.decode`` for images, clamped and mapped to [0, 1]).

``taming.models.vqgan`` imports ``taming.main`` (torchvision, a pytorch-lightning 1.x API) only
for ``instantiate_from_config``, which builds the training loss and the temperature schedule.
The tests put a stand-in ``taming.main`` in ``sys.modules`` whose ``instantiate_from_config``
builds an empty module instead, so the reference is taming's real LightningModule with the
real encoder, quantizer and decoder.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vqgan_files import VQGanFiles

from dalle_vae_taming import VQGanVAE
from dalle_vae_taming.checkpoint import load_lightning_state_dict

pytest.importorskip("pytorch_lightning", reason="the reference classes are LightningModules")


@pytest.fixture(scope="module")
def taming_vqgan() -> types.ModuleType:
    """``taming.models.vqgan``, imported with a stand-in ``taming.main`` (both forgotten after)."""
    stand_in = types.ModuleType("taming.main")
    stand_in.instantiate_from_config = lambda config: nn.Module()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "taming.main", stand_in)
        import taming.models.vqgan as module

        yield module
        del sys.modules["taming.models.vqgan"], sys.modules["taming.models"].vqgan


def reference(taming_vqgan: types.ModuleType, vae: VQGanVAE, files: VQGanFiles) -> nn.Module:
    """taming's own model class for ``files``, with the checkpoint's weights (as taming's
    ``init_from_ckpt`` loads them, less the training loss)."""
    spec = vae.spec
    cls = getattr(taming_vqgan, spec.target.rsplit(".", 1)[-1])
    kwargs = {"temperature_scheduler_config": {}} if spec.is_gumbel else {}
    model = cls(
        ddconfig=spec.ddconfig, lossconfig={}, n_embed=spec.n_embed, embed_dim=spec.embed_dim, **kwargs
    )
    state = load_lightning_state_dict(files.model)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("loss.")}, strict=False
    )
    assert not missing and not unexpected
    return model.eval()


def reference_decode(model: nn.Module, codes: Tensor, fmap_size: int) -> Tensor:
    """Upstream's decode: codebook entries ``[B, embed_dim, h, w]`` through ``model.decode``."""
    shape = (
        codes.shape[0],
        fmap_size,
        fmap_size,
        model.quantize.embed.embedding_dim
        if hasattr(model.quantize, "embed")
        else model.quantize.embedding.embedding_dim,
    )
    z = model.quantize.get_codebook_entry(codes.flatten(), shape)
    return (model.decode(z).clamp(-1, 1) + 1) * 0.5


def noise_free_gumbel_softmax(
    logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1, **_
) -> Tensor:
    """``F.gumbel_softmax(hard=True)`` with zero noise: the one-hot of the argmax."""
    return F.one_hot(logits.argmax(dim), logits.shape[dim]).movedim(-1, dim).to(logits.dtype)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["vq", "gumbel", "f8"])
def test_matches_taming(
    kind: str, request: pytest.FixtureRequest, taming_vqgan: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    files: VQGanFiles = request.getfixturevalue(f"{kind}_files")
    vae = VQGanVAE(vqgan_model_path=files.model, vqgan_config_path=files.config)
    model = reference(taming_vqgan, vae, files)
    images = torch.rand(
        3, vae.channels, vae.image_size, vae.image_size, generator=torch.Generator().manual_seed(7)
    )

    if vae.is_gumbel:
        # taming samples Gumbel noise even in eval mode; VQGanVAE takes the most likely code,
        # which is what taming gives without the noise
        monkeypatch.setattr(F, "gumbel_softmax", noise_free_gumbel_softmax)
    _, _, (_, _, indices) = model.encode(images * 2 - 1)
    expected = indices.view(images.shape[0], -1)
    codes = vae.get_codebook_indices(images)
    assert torch.equal(codes, expected)

    # random codes as well as encoded ones; exact up to float32 rounding (tolerance 1e-5)
    random_codes = torch.randint(0, vae.num_tokens, codes.shape, generator=torch.Generator().manual_seed(8))
    for some in (codes, random_codes):
        torch.testing.assert_close(
            vae.decode(some), reference_decode(model, some, vae.fmap_size), rtol=0, atol=1e-5
        )
