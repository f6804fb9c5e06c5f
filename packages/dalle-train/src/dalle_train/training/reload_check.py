"""The first checkpoint of a run is reloaded once and compared with the model that wrote it.

A run must not spend hours writing checkpoints that cannot be used: a model (or its VAE, from
a plugin) whose ``save_pretrained`` and ``from_pretrained`` do not agree is caught at the first
save, before that checkpoint is published. The reloaded model must hold the same weights, and
its VAE must give the same codes for the same images.

The codes of the model's own VAE are taken before training, when the VAE is frozen (a DALLE's):
then they are the codes at the first save too, and no forward runs on the model while an engine
that shards it (FSDP, ZeRO-3) has its weights gathered on the root alone. A VAE being trained
(``dalle-train vae``) is encoded at the save, where every process holds the whole model.
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


class FirstCheckpointCheck:
    """Built with the model before training (on every process); `__call__` checks the first
    checkpoint on the root."""

    def __init__(self, model: nn.Module) -> None:
        self.vae = vae_of(model)
        self.images: torch.Tensor | None = None  # [N, C, H, W] in [0, 1]
        self.frozen_codes: torch.Tensor | None = None  # [N, m]: a frozen VAE's, taken now
        if self.vae is None:
            return
        generator = torch.Generator().manual_seed(0)
        side = self.vae.image_size
        self.images = torch.rand(CHECK_IMAGES, self.vae.channels, side, side, generator=generator)
        if not any(p.requires_grad for p in getattr(self.vae, "parameters", list)()):
            self.frozen_codes = _untouched_rng(lambda: codes_of(self.vae, self.images))

    def __call__(self, model: nn.Module, load: Callable[[Path], nn.Module], directory: Path,
                 whole: bool) -> None:
        """Reload the checkpoint being written in ``directory`` with ``load`` and compare it with
        ``model`` (its weights gathered); ``whole``: every process holds the whole model, so its
        VAE may run here. A `TrainError` saying what differs; the random generators are left as
        they were (building the reloaded model draws from them), so checking never changes a run."""

        def problem() -> str | None:
            try:
                reloaded = load(directory)
            except Exception as error:  # any failure to read it back is the finding
                return f"it cannot be read back ({type(error).__name__}: {error})"
            return self.problem(model, reloaded, whole)

        found = _untouched_rng(problem)
        if found:
            raise TrainError(
                f"the run's first checkpoint does not reload as it was saved: {found}. The run stops now "
                f"rather than write checkpoints that cannot be used (what was written is in {directory} "
                f"until the next run starts)"
            )

    def problem(self, model: nn.Module, reloaded: nn.Module, whole: bool = True) -> str | None:
        """What differs between ``model`` and ``reloaded`` (its checkpoint read back), or None."""
        differ = weights_problem(model.state_dict(), reloaded.state_dict())
        if differ or self.vae is None:
            return differ
        vae_again = vae_of(reloaded)
        if vae_again is None:
            return f"the reloaded model has no VAE ({type(self.vae).__name__} before)"
        codes = self.frozen_codes
        if codes is None:
            if not whole:  # a VAE in training under a sharding engine: its weights were compared
                return None
            codes = codes_of(self.vae, self.images)
        again = codes_of(vae_again, self.images)
        if not torch.equal(codes, again):
            count = int((codes != again).sum())
            return (f"its VAE ({type(self.vae).__name__}) gives other codes for the same images after "
                    f"reloading ({count} of {codes.numel()} differ): its save_pretrained and from_pretrained "
                    f"do not agree")
        return None


def weights_problem(state: dict[str, torch.Tensor], again: dict[str, torch.Tensor]) -> str | None:
    """What differs between two state dicts (names, then values), or None."""
    lost, gained = sorted(state.keys() - again.keys()), sorted(again.keys() - state.keys())
    if lost or gained:
        return f"the weights {lost or 'none'} are missing and {gained or 'none'} are new after reloading"
    for key, tensor in state.items():
        # an engine may keep half-precision weights, read back into a float32 model: compared as saved
        if not torch.equal(tensor.detach().cpu(), again[key].detach().cpu().to(tensor.dtype)):
            return f"the weight {key} has other values after reloading"
    return None


def vae_of(model: nn.Module) -> Any | None:
    """The image VAE a model carries (a DALLE's), the model itself when it is one, else None."""
    for candidate in (model, getattr(model, "vae", None)):
        if callable(getattr(candidate, "get_codebook_indices", None)):
            return candidate
    return None


def codes_of(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """``images [N, C, H, W]`` -> codes ``[N, m]`` on the CPU, in eval mode on the VAE's device
    (its mode put back)."""
    module = vae if isinstance(vae, nn.Module) else None
    device = next(module.parameters(), images).device if module is not None else images.device
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            return vae.get_codebook_indices(images.to(device)).cpu()
    finally:
        if module is not None:
            module.train(was_training)


def _untouched_rng(work: Callable[[], Any]) -> Any:
    """``work()`` with the random generators put back afterwards."""
    saved = rng_state()
    try:
        return work()
    finally:
        set_rng_state(saved)
