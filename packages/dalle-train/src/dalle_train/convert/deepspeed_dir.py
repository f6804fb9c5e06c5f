"""Consolidating a DeepSpeed checkpoint directory of the upstream scripts into one checkpoint dict.

With ``--deepspeed``, upstream's ``train_dalle.py`` called ``save_checkpoint(cp_dir,
client_state=...)`` of the DeepSpeed engine on ``dalle-ds-cp/`` and wrote
``auxiliary.pt`` (``hparams``, ``vae_params``, ``epoch``, ``version``, ``vae_class_name`` and a note
in place of the weights) beside it; ``train_vae.py`` did the same on ``vae-ds-cp/`` without the
auxiliary file. DeepSpeed writes, per save::

    cp_dir/latest                                   the newest tag, e.g. "global_step1000"
    cp_dir/<tag>/mp_rank_00_model_states.pt         {"module": state dict, ..., **client_state}
    cp_dir/<tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   (ZeRO: optimizer partitions)

Up to ZeRO stage 2 the model states file holds every weight (in the training precision: fp16 or
bf16 weights are widened to fp32 here; the fp32 master copies stay in the optimizer partitions,
which are not read). ZeRO stage 3 partitions the weights themselves into
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` files: that is refused, naming DeepSpeed's
``zero_to_fp32.py``, which gathers them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dalle_train.convert.upstream import UpstreamCheckpoint, checkpoint_from_dict, load_pickle
from dalle_train.errors import TrainError

LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
AUX_FILE = "auxiliary.pt"  # upstream train_dalle.py's DEEPSPEED_CP_AUX_FILENAME
ZERO3_MODEL_STATES = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
#: upstream's client_state keys (train_dalle.py's and train_vae.py's save_model)
CLIENT_KEYS = ("hparams", "vae_params", "vae_class_name", "epoch", "version")


def is_deepspeed_dir(path: Path) -> bool:
    """Whether ``path`` looks like a DeepSpeed checkpoint directory (a ``latest`` file, or a tag
    folder with model states)."""
    return path.is_dir() and (
        (path / LATEST).is_file()
        or any(path.glob(f"*/{MODEL_STATES}"))
        or any(path.glob("*/*zero_pp_rank_*_model_states.pt"))
    )


def checkpoint_tag(directory: Path) -> str:
    """The tag ``latest`` names, or else the ``global_step<N>`` folder with the largest N."""
    latest = directory / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (directory / tag).is_dir():
            raise TrainError(f"{latest} names the tag {tag!r}, but {directory / tag} is not a folder")
        return tag
    steps = [
        (int(m[1]), p.name)
        for p in directory.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"global_step(\d+)", p.name))
    ]
    if not steps:
        raise TrainError(
            f"{directory} has neither a '{LATEST}' file nor global_step<N> folders: "
            f"it is not a DeepSpeed checkpoint directory"
        )
    return max(steps)[1]


def read_deepspeed_dir(directory: Path) -> UpstreamCheckpoint:
    """Consolidate an upstream DeepSpeed checkpoint directory (ZeRO stage 0 to 2) into the
    checkpoint its ``save_model`` would have written without DeepSpeed."""
    tag = checkpoint_tag(directory)
    folder = directory / tag
    states_path = folder / MODEL_STATES
    if not states_path.is_file():
        zero3 = sorted(p.name for p in folder.iterdir() if ZERO3_MODEL_STATES.match(p.name))
        if zero3:
            raise TrainError(
                f"{folder} is a ZeRO stage 3 checkpoint (its weights are partitioned into {zero3[0]}, ...): "
                f"gather them first with DeepSpeed's zero_to_fp32.py ({directory / 'zero_to_fp32.py'}, or "
                f"deepspeed/utils/zero_to_fp32.py: python zero_to_fp32.py {directory} weights.pt), then "
                f"convert a dalle.pt holding those weights"
            )
        raise TrainError(f"{folder} has no {MODEL_STATES}: not a DeepSpeed checkpoint of a single model")
    if (folder / MODEL_STATES.replace("00", "01")).exists():
        raise TrainError(
            f"{folder} holds model-parallel shards (mp_rank_01): only one model rank is supported"
        )
    states = load_pickle(states_path)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise TrainError(f"{states_path} has no 'module' state dict: not DeepSpeed's model states file")
    stage = _zero_stage(states.get("ds_config"))
    if stage >= 3:
        raise TrainError(
            f"{states_path} was written with ZeRO stage {stage}: its 'module' holds partition placeholders; "
            f"gather the weights with DeepSpeed's zero_to_fp32.py first"
        )
    client: dict[str, Any] = {key: states[key] for key in CLIENT_KEYS if key in states}
    aux = directory / AUX_FILE
    if aux.is_file():
        saved = load_pickle(aux)
        if isinstance(saved, dict):
            client.update({key: saved[key] for key in CLIENT_KEYS if key in saved})
    weights = {key: _widen(value) for key, value in states["module"].items()}
    checkpoint = checkpoint_from_dict({**client, "weights": weights}, f"{directory} (tag {tag})")
    return checkpoint


def _widen(value: Any) -> Any:
    """fp16/bf16 weights of mixed-precision training -> fp32 (other tensors as they are)."""
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _zero_stage(ds_config: Any) -> int:
    """The ZeRO stage a saved DeepSpeed configuration names (0 without one)."""
    if not isinstance(ds_config, dict):
        return 0
    zero = ds_config.get("zero_optimization", {})
    if isinstance(zero, dict):
        return int(zero.get("stage", 0) or 0)
    return 0
