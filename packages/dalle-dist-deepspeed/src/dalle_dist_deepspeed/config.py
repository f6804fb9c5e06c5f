"""The DeepSpeed configuration of a run: what the trainer's flags say, merged with the user's
JSON file (``--deepspeed-config``).

Merge rules:

- every key the flags decide (batch sizes, accumulation, clipping, precision, the ZeRO stage
  when ``--zero-stage`` is given, the optimizer offload when ``--offload`` is given) is set from
  the flags; the file may repeat it with the same value, and a different value is an error that
  lists every conflict at once (``"gradient_accumulation_steps": file says 4, --ga-steps says 2``);
- every other key of the file is kept as it is (``zero_optimization.offload_param``, bucket
  sizes, ``activation_checkpointing``, ...);
- a few defaults apply unless the file sets them (DeepSpeed's progress printing off, any torch
  optimizer allowed under ZeRO, the ZeRO stage 1);
- the file may not build the optimizer or the schedule (``optimizer``, ``scheduler``): the
  trainer owns both, from its own flags.

Precision: ``--precision bf16``/``fp16`` runs as DeepSpeed's ``torch_autocast`` (fp32 weights in
the module and the optimizer, bf16/fp16 compute; fp16 with a loss scaler inside ZeRO), never as
DeepSpeed's ``bf16``/``fp16`` sections, which would cast the whole module (the DALLE's VAE
included) to 16 bits and leave the ordinary checkpoint with 16-bit weights.

Nothing here imports deepspeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle_core.interfaces import StepPlan

#: the ZeRO stages this backend runs (stage 0, DeepSpeed without ZeRO, is ddp's job)
ZERO_STAGES = (1, 2, 3)
DEFAULT_ZERO_STAGE = 1
#: sections the file may not have: the trainer builds the optimizer and schedule from its flags
OWNED_BY_THE_TRAINER = {
    "optimizer": "the trainer builds AdamW from --learning-rate and --weight-decay",
    "scheduler": "the trainer sets the learning rate of every step (--lr-schedule, --warmup-steps)",
}
#: DeepSpeed's names of the autocast dtypes (any alias DeepSpeed accepts compares equal)
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
DTYPE_ALIASES = {
    "bfloat16": {"bfloat16", "bf16", "torch.bfloat16"},
    "float16": {"float16", "fp16", "half", "torch.float16"},
}
#: applied unless the file sets them
DEFAULTS: dict[str, Any] = {
    "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own progress lines are noise
    "wall_clock_breakdown": False,
    # any torch optimizer the trainer builds (the conformance suite uses SGD)
    "zero_allow_untested_optimizer": True,
}


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed configuration file that cannot be read, or that contradicts the flags."""


@dataclass(frozen=True)
class Setting:
    """One key the flags decide: its dotted path in the configuration, the value, and the flag
    (with what was given) that decided it."""

    path: tuple[str, ...]
    value: Any
    flag: str
    note: str = ""

    @property
    def key(self) -> str:
        return ".".join(self.path)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; an unreadable file or one that is not a JSON object is a
    `DeepSpeedConfigError` naming it."""
    path = Path(path)
    try:
        loaded = json.loads(path.read_text())
    except OSError as error:
        raise DeepSpeedConfigError(
            f"--deepspeed-config {path}: cannot read it ({error.strerror or error})"
        ) from error
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(f"--deepspeed-config {path}: not valid JSON ({error})") from error
    if not isinstance(loaded, dict):
        raise DeepSpeedConfigError(
            f"--deepspeed-config {path}: expected a JSON object, got {type(loaded).__name__}"
        )
    return loaded


def resolve_zero_stage(zero_stage: int | None, file_config: dict[str, Any]) -> int:
    """The ZeRO stage of the run: ``--zero-stage``, else the file's, else 1."""
    stage = zero_stage
    if stage is None:
        stage = _lookup(file_config, ("zero_optimization", "stage"), DEFAULT_ZERO_STAGE)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        origin = (
            "--zero-stage" if zero_stage is not None else '"zero_optimization.stage" of --deepspeed-config'
        )
        raise DeepSpeedConfigError(
            f"{origin}: ZeRO stage {stage!r} is not one of {', '.join(map(str, ZERO_STAGES))}"
        )
    return int(stage)


def flag_settings(plan: StepPlan, world_size: int, zero_stage: int | None, offload: bool) -> list[Setting]:
    """What the trainer's flags decide, as DeepSpeed configuration keys."""
    settings = [
        Setting(("train_micro_batch_size_per_gpu",), plan.micro_batch_size, "--batch-size"),
        Setting(("gradient_accumulation_steps",), plan.ga_steps, "--ga-steps"),
        Setting(
            ("train_batch_size",),
            plan.micro_batch_size * plan.ga_steps * world_size,
            f"--batch-size {plan.micro_batch_size} x --ga-steps {plan.ga_steps} x {world_size} processes",
        ),
        Setting(("gradient_clipping",), float(plan.clip_grad_norm or 0.0), "--clip-grad-norm"),
    ]
    precision = f"--precision {plan.precision}"
    runs_as = " (it runs as DeepSpeed's torch_autocast: fp32 weights, 16-bit compute)"
    autocast = AUTOCAST_DTYPES.get(plan.precision)
    settings += [
        Setting(("torch_autocast", "enabled"), autocast is not None, precision),
        Setting(("bf16", "enabled"), False, precision, runs_as),
        Setting(("fp16", "enabled"), False, precision, runs_as),
    ]
    if autocast is not None:
        settings.append(Setting(("torch_autocast", "dtype"), autocast, precision))
    if zero_stage is not None:
        settings.append(Setting(("zero_optimization", "stage"), zero_stage, "--zero-stage"))
    if offload:
        settings.append(Setting(("zero_optimization", "offload_optimizer", "device"), "cpu", "--offload"))
    return settings


def build_config(
    plan: StepPlan,
    world_size: int,
    zero_stage: int | None = None,
    offload: bool = False,
    file_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration given to ``deepspeed.initialize``: the flags' settings over the
    file's keys over the defaults (see the module docstring). ``zero_stage`` None: the file's
    stage, else 1; ``offload`` False: as the file says (off when it says nothing)."""
    file_config = file_config or {}
    owned = [f'"{key}": {why}' for key, why in OWNED_BY_THE_TRAINER.items() if key in file_config]
    if owned:
        raise DeepSpeedConfigError(
            "--deepspeed-config must not build these (remove them from the file): " + "; ".join(owned)
        )
    settings = flag_settings(plan, world_size, zero_stage, offload)
    conflicts = [
        f'"{s.key}": file says {_show(found)}, {s.flag} says {_show(s.value)}{s.note}'
        for s in settings
        if (found := _lookup(file_config, s.path, _MISSING)) is not _MISSING and not _same(found, s.value)
    ]
    if conflicts:
        raise DeepSpeedConfigError(
            "--deepspeed-config contradicts the flags (change the file or the flags):\n  "
            + "\n  ".join(conflicts)
        )
    config = {**DEFAULTS, **json.loads(json.dumps(file_config))}  # a deep copy of the file
    for setting in settings:
        _put(config, setting.path, setting.value)
    _put(config, ("zero_optimization", "stage"), resolve_zero_stage(zero_stage, file_config))
    if offloads_optimizer(config):
        # the trainer's own torch optimizer (AdamW, fused on the CPU) steps the offloaded
        # partitions; DeepSpeedCPUAdam would replace it (its moments, its param_groups)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """Whether ``config`` keeps the optimizer's state off the accelerator (ZeRO-Offload)."""
    device = _lookup(config, ("zero_optimization", "offload_optimizer", "device"), "none")
    return device not in (None, "none")


_MISSING = object()


def _lookup(config: dict[str, Any], path: tuple[str, ...], default: Any) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _put(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = config
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _same(found: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(found, bool):
        return found is wanted
    if isinstance(wanted, str) and wanted in DTYPE_ALIASES:
        return isinstance(found, str) and found.lower() in DTYPE_ALIASES[wanted]
    if isinstance(wanted, str) and isinstance(found, str):
        return found.lower() == wanted
    return found == wanted


def _show(value: Any) -> str:
    return json.dumps(value)
