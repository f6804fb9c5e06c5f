"""The first checkpoint of a run is reloaded once and compared with the model that wrote it.

A run must not spend hours writing checkpoints that cannot be used: a model (or its VAE, from
a plugin) whose ``save_pretrained`` and ``from_pretrained`` do not agree is caught at the first
save, before that checkpoint is published. The reloaded model must hold the same weights, and
its VAE (the model itself for a VAE run) must give the same codes for the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_train.errors import TrainError
from dalle_train.training.rng import rng_state, set_rng_state

CHECK_IMAGES = 2  # random images whose codes are compared


def reload_problem(model: nn.Module, reloaded: nn.Module) -> str | None:
    """What differs between ``model`` and ``reloaded`` (its checkpoint read back), or None."""
    state, again = model.state_dict(), reloaded.state_dict()
    lost, gained = sorted(state.keys() - again.keys()), sorted(again.keys() - state.keys())
    if lost or gained:
        return f"the weights {lost or 'none'} are missing and {gained or 'none'} are new after reloading"
    for key, tensor in state.items():
        # an engine may keep half-precision weights, read back into a float32 model: compared as saved
        if not torch.equal(tensor.detach().cpu(), again[key].detach().cpu().to(tensor.dtype)):
            return f"the weight {key} has other values after reloading"
    vae, vae_again = _vae_of(model), _vae_of(reloaded)
    if vae is None:
        return None
    if vae_again is None:
        return f"the reloaded model has no VAE ({type(vae).__name__} before)"
    device = next(iter(state.values())).device if state else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(CHECK_IMAGES, vae.channels, vae.image_size, vae.image_size, generator=generator)
    images = images.to(device)  # [N, C, H, W] in [0, 1]
    codes, codes_again = _codes(vae, images), _codes(vae_again, images)  # [N, m] each
    if not torch.equal(codes.cpu(), codes_again.cpu()):
        differ = int((codes.cpu() != codes_again.cpu()).sum())
        return (f"its VAE ({type(vae).__name__}) gives other codes for the same images after reloading "
                f"({differ} of {codes.numel()} differ): its save_pretrained and from_pretrained do not agree")
    return None


def check_first_checkpoint(model: nn.Module, load: Callable[[Path], nn.Module], directory: Path) -> None:
    """Reload the checkpoint being written in ``directory`` with ``load`` and compare it with
    ``model``; a `TrainError` saying what differs. The random generators are left as they were
    (building the reloaded model draws from them), so checking never changes a run."""
    saved = rng_state()
    try:
        try:
            reloaded = load(directory)
        except Exception as error:  # any failure to read it back is the finding
            problem: str | None = f"it cannot be read back ({type(error).__name__}: {error})"
        else:
            problem = reload_problem(model, reloaded)
    finally:
        set_rng_state(saved)
    if problem:
        raise TrainError(
            f"the run's first checkpoint does not reload as it was saved: {problem}. The run stops now "
            f"rather than write checkpoints that cannot be used (what was written is in {directory} "
            f"until the next run starts)"
        )


def _vae_of(model: nn.Module) -> Any | None:
    """The image VAE a model carries (a DALLE's), the model itself when it is one, else None."""
    for candidate in (model, getattr(model, "vae", None)):
        if callable(getattr(candidate, "get_codebook_indices", None)):
            return candidate
    return None


def _codes(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """``images [N, C, H, W]`` -> codes ``[N, m]`` in eval mode, the VAE's mode put back."""
    was_training = getattr(vae, "training", False)
    if isinstance(vae, nn.Module):
        vae.eval()
    try:
        with torch.no_grad():
            return vae.get_codebook_indices(images)
    finally:
        if isinstance(vae, nn.Module):
            vae.train(was_training)
