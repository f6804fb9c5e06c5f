"""Checkpoints of the upstream project (lucidrains' dalle-pytorch), made with its own classes and
saved as its scripts save them, for the conversion tests.

`import_upstream` imports the real ``dalle_pytorch``. Its package imports modules that cannot be
imported here: ``taming.models.vqgan`` (taming's Lightning models; Lightning is not installed)
and ``pkg_resources`` (a version lookup); where they do not import, stand-ins are put in
``sys.modules`` first (the VQGanVAE test sets the inference half of taming's ``VQModel`` there).
The models compared (DALLE, DiscreteVAE, OpenAIDiscreteVAE, VQGanVAE, their transformer,
attention, token shift, reversible layers, axial embeddings) are upstream's real code.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: what the scripts wrote as 'version' (dalle_pytorch.version.__version__ of the release tested)
UPSTREAM_VERSION = "1.6.6"


def _stand_in(name: str, **attributes: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def import_upstream() -> types.ModuleType | None:
    """The real ``dalle_pytorch`` package, or None when it is not installed."""
    if importlib.util.find_spec("dalle_pytorch") is None:
        return None
    try:
        importlib.import_module("taming.models.vqgan")
    except Exception:  # not installed, or its pytorch_lightning missing (see test_convert_upstream.py)
        for name in ("taming", "taming.models"):
            try:
                importlib.import_module(name)
            except Exception:
                _stand_in(name)
        _stand_in(
            "taming.models.vqgan",
            VQModel=type("VQModel", (nn.Module,), {}),
            GumbelVQ=type("GumbelVQ", (nn.Module,), {}),
        )
    if importlib.util.find_spec("pkg_resources") is None:  # setuptools >= 81 dropped it
        _stand_in("pkg_resources", get_distribution=lambda name: None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("dalle_pytorch")


def randomize(model: nn.Module, seed: int) -> None:
    """Every parameter drawn again (LayerScale's tiny factors included), so that each weight
    moves the logits and a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("vae."):
                continue
            if name.endswith(".scale"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def client_state(dalle: nn.Module, hparams: dict[str, Any], vae_params: dict[str, Any] | None,
                 epoch: int) -> dict[str, Any]:
    """What upstream's train_dalle.py saves beside the weights (its ``save_obj``)."""
    return {"hparams": hparams, "vae_params": vae_params, "epoch": epoch, "version": UPSTREAM_VERSION,
            "vae_class_name": type(dalle.vae).__name__}


def save_dalle_pt(
    path: Path,
    dalle: nn.Module,
    hparams: dict[str, Any],
    vae_params: dict[str, Any] | None,
    epoch: int = 3,
    with_training_state: bool = True,
) -> Path:
    """``torch.save`` as train_dalle.py's ``save_model`` does without DeepSpeed."""
    optimizer = torch.optim.Adam([p for p in dalle.parameters() if p.requires_grad], lr=3e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5)
    obj = {**client_state(dalle, hparams, vae_params, epoch), "weights": dalle.state_dict()}
    if with_training_state:
        obj.update(opt_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict())
    torch.save(obj, path)
    return path


def save_vae_pt(path: Path, vae: nn.Module, vae_params: dict[str, Any]) -> Path:
    """``torch.save`` as train_vae.py's ``save_model`` does without DeepSpeed."""
    torch.save({"hparams": vae_params, "weights": vae.state_dict()}, path)
    return path


def save_deepspeed_dir(
    directory: Path,
    dalle: nn.Module,
    hparams: dict[str, Any],
    vae_params: dict[str, Any] | None,
    *,
    tag: str = "global_step7",
    stage: int = 2,
    dtype: torch.dtype = torch.float32,
    epoch: int = 1,
) -> Path:
    """What train_dalle.py's DeepSpeed branch leaves: DeepSpeed's ``save_checkpoint(cp_dir,
    client_state=...)`` files (names and keys as DeepSpeed's engine writes them) and upstream's
    ``auxiliary.pt``. Stage 3 writes the partitioned model-states file names instead."""
    client = client_state(dalle, hparams, vae_params, epoch)
    folder = directory / tag
    folder.mkdir(parents=True)
    module = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in dalle.state_dict().items()
    }
    states = dict(
        module=module,
        buffer_names=[],
        optimizer=None,
        param_shapes=[{name: p.shape for name, p in dalle.named_parameters() if p.requires_grad}],
        frozen_param_shapes=None,
        shared_params=None,
        frozen_param_fragments=None,
        lr_scheduler=None,
        data_sampler=None,
        random_ltd=None,
        sparse_tensor_module_names=set(),
        skipped_steps=0,
        global_steps=7,
        global_samples=56,
        dp_world_size=1,
        mp_world_size=1,
        ds_config={"train_batch_size": 8, "zero_optimization": {"stage": stage}, "fp16": {"enabled": False}},
        ds_version="0.14.0",
        **client,
    )
    if stage >= 3:
        states["module"] = {key: torch.empty(0) for key in module}
        torch.save(states, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    else:
        torch.save(states, folder / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": {"zero_stage": stage}, "ds_version": "0.14.0"},
        folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    (directory / "latest").write_text(tag)
    aux = {
        **client,
        "weights": "To get a working standard checkpoint, look into consolidating DeepSpeed checkpoints.",
    }
    torch.save(aux, directory / "auxiliary.pt")
    return directory
