"""Reading the checkpoints of the upstream project (lucidrains' DALLE-pytorch).

Upstream's scripts ``torch.save`` a dict:

- ``train_vae.py`` -> ``vae.pt``: ``hparams`` (the `DiscreteVAE` keywords) and ``weights``
  (its state dict);
- ``train_dalle.py`` -> ``dalle.pt``: ``hparams`` (the `DALLE` keywords but ``vae``),
  ``vae_params`` (the DiscreteVAE's keywords, or None for a pretrained VAE), ``vae_class_name``
  (``DiscreteVAE``, ``OpenAIDiscreteVAE`` or ``VQGanVAE``), ``weights`` (the DALLE's state dict,
  its VAE's under ``vae.``), ``opt_state``, ``scheduler_state``, ``epoch`` and ``version``.

Files are read with ``torch.load(weights_only=True)`` only: tensors and plain data. A pickle
that would build other objects is refused, naming the file, and never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dalle_core.pretrained import load_failure
from dalle_train.errors import TrainError

#: upstream's VAE classes, as ``vae_class_name`` names them
DISCRETE, OPENAI, VQGAN = "DiscreteVAE", "OpenAIDiscreteVAE", "VQGanVAE"
VAE_CLASSES = (DISCRETE, OPENAI, VQGAN)

#: the keys of a dalle.pt beside ``hparams`` and ``weights``
DALLE_KEYS = ("vae_params", "vae_class_name", "opt_state", "scheduler_state", "epoch", "version")


@dataclass
class UpstreamCheckpoint:
    """One upstream checkpoint, read and checked.

    ``kind`` is ``"vae"`` (a ``vae.pt``) or ``"dalle"`` (a ``dalle.pt``); ``weights`` maps state-dict
    keys to tensors; ``source`` names where it was read from (for messages); ``dropped`` lists the
    parts that are not converted (optimizer, scheduler), said to the user.
    """

    kind: str
    source: str
    hparams: dict[str, Any]
    weights: dict[str, torch.Tensor]
    vae_params: dict[str, Any] | None = None
    vae_class_name: str | None = None
    epoch: int | None = None
    version: str | None = None
    dropped: list[str] = field(default_factory=list)


def load_pickle(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; anything else is a `TrainError` naming
    ``path`` (a missing file, a file that is not a torch pickle, one that holds objects)."""
    if not path.is_file():
        raise TrainError(f"{path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise TrainError(
            f"{path} is not an upstream checkpoint that can be read safely ({load_failure(error)}); "
            f"it is read with torch.load(weights_only=True) only: tensors and plain data"
        ) from error


def checkpoint_from_dict(obj: Any, source: str) -> UpstreamCheckpoint:
    """Check the dict an upstream script saved and sort it into an `UpstreamCheckpoint`.

    A dict with ``vae_params`` or ``vae_class_name`` (or DALLE weights) is a dalle.pt, else a
    vae.pt. Missing ``hparams``/``weights``, weights that are not a state dict of tensors, an
    unknown ``vae_class_name`` are errors naming ``source`` and the key.
    """
    if not isinstance(obj, dict):
        raise TrainError(
            f"{source} holds a {type(obj).__name__}, not the dict upstream's train_vae.py / "
            f"train_dalle.py save (with 'hparams' and 'weights')"
        )
    for key in ("hparams", "weights"):
        if key not in obj:
            found = ", ".join(sorted(map(str, obj))) or "nothing"
            raise TrainError(
                f"{source} has no '{key}': it is not an upstream vae.pt or dalle.pt "
                f"(they hold 'hparams' and 'weights'; this holds {found})"
            )
    hparams, weights = obj["hparams"], obj["weights"]
    if isinstance(weights, str):  # upstream's DeepSpeed aux file: a note instead of weights
        raise TrainError(
            f"{source} holds no weights ('weights' is the note {weights!r}): it is the auxiliary file "
            f"of a DeepSpeed checkpoint; convert the DeepSpeed directory that holds it instead"
        )
    if not isinstance(hparams, dict):
        raise TrainError(f"{source}: 'hparams' is a {type(hparams).__name__}, not a dict of keywords")
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise TrainError(f"{source}: 'weights' is not a state dict (names -> tensors)")
    is_dalle = any(key in obj for key in ("vae_params", "vae_class_name")) or any(
        key.startswith(("transformer.", "to_logits.")) for key in weights
    )
    if not is_dalle:
        return UpstreamCheckpoint("vae", source, dict(hparams), dict(weights))
    vae_params = obj.get("vae_params")
    if vae_params is not None and not isinstance(vae_params, dict):
        raise TrainError(f"{source}: 'vae_params' is a {type(vae_params).__name__}, not a dict or None")
    class_name = obj.get("vae_class_name")
    if class_name is None:  # checkpoints of upstream versions before 'vae_class_name' existed
        class_name = DISCRETE if vae_params is not None else OPENAI
    if class_name not in VAE_CLASSES:
        raise TrainError(
            f"{source}: vae_class_name {class_name!r} is not an upstream VAE class; "
            f"valid: {', '.join(VAE_CLASSES)}"
        )
    if (class_name == DISCRETE) != (vae_params is not None):
        raise TrainError(
            f"{source}: vae_class_name {class_name!r} does not fit vae_params "
            f"({'given' if vae_params is not None else 'None'}): a DiscreteVAE comes with its "
            f"vae_params, a pretrained VAE without"
        )
    dropped = [key for key in ("opt_state", "scheduler_state") if obj.get(key) is not None]
    epoch = obj.get("epoch")
    return UpstreamCheckpoint(
        "dalle",
        source,
        dict(hparams),
        dict(weights),
        vae_params=vae_params,
        vae_class_name=class_name,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        version=str(obj["version"]) if obj.get("version") is not None else None,
        dropped=dropped,
    )


def read_checkpoint(path: Path) -> UpstreamCheckpoint:
    """An upstream ``vae.pt`` / ``dalle.pt`` file, read safely and checked."""
    return checkpoint_from_dict(load_pickle(path), str(path))
