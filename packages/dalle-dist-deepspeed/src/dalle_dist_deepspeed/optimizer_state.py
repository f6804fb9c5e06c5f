"""The optimizer's state in torch's ordinary form, to and from ZeRO's partitions.

Under ZeRO the trainer's torch optimizer steps flat fp32 partitions (one or a few per parameter
group), so its own ``state_dict`` describes tensors that exist nowhere else. These functions
translate: `consolidate` assembles, parameter by parameter, each partitioned state (AdamW's
``exp_avg``, ``exp_avg_sq``) whole with DeepSpeed's ``safe_get_full_optimizer_state`` and numbers
the parameters as ``torch.optim.Optimizer.state_dict`` would have (groups in order); `restore`
writes such a state back into the partitions of any ZeRO stage and number of processes. So a
checkpoint of a DeepSpeed run resumes with its moments under ``none``, ``ddp`` or another
number of DeepSpeed processes, and the other way round.

A state is "partitioned" when it has the shape of its flat partition (moments); anything else
(AdamW's ``step``, one per partition) is the same for every parameter of a group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

State = dict[str, Any]


def consolidate(
    zero_optimizer: Any, client: torch.optim.Optimizer, groups: list[list[nn.Parameter]], is_root: bool
) -> State | None:
    """Collective: the state of ``client`` (the trainer's optimizer, stepping ZeRO's partitions)
    as ``state_dict`` gives it in one process, on the root; None elsewhere. ``groups``: the
    trainer's parameters of each group, as they were before ZeRO flattened them."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_fragments(zero_optimizer)
    state: dict[int, State] = {}
    param_groups = []
    index = 0
    for number, (group, params) in enumerate(zip(client.param_groups, groups, strict=True)):
        partitioned, shared = _split(client, partitions(zero_optimizer, number))
        param_groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": list(range(index, index + len(params))),
            }
        )
        for param in params:
            whole = {key: safe_get_full_optimizer_state(param, key) for key in partitioned}
            if is_root and (partitioned or shared):
                state[index] = {
                    **{key: _copy(value) for key, value in shared.items()},
                    **{
                        key: value.detach().reshape(shape(param)).cpu().clone()
                        for key, value in whole.items()
                        if value is not None
                    },
                }
            index += 1
    return {"state": state, "param_groups": param_groups} if is_root else None


def restore(
    zero_optimizer: Any, client: torch.optim.Optimizer, groups: list[list[nn.Parameter]], saved: State
) -> None:
    """Load ``saved`` (torch's form, from any backend) into ZeRO's partitions and the group
    settings of ``client``; every process is given the same ``saved``."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _check_shapes(saved, groups)
    by_index = {int(key): value for key, value in saved["state"].items()}
    index = 0
    for number, (group, params, saved_group) in enumerate(
        zip(client.param_groups, groups, saved["param_groups"], strict=True)
    ):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        first = next((by_index[i] for i in range(index, index + len(params)) if i in by_index), None)
        if first is not None:
            _create_partition_state(client, group, partitions(zero_optimizer, number), first, params[0])
        index += len(params)
    _link_fragments(zero_optimizer)
    index = 0
    for params in groups:
        for param in params:
            for key, value in by_index.get(index, {}).items():
                if torch.is_tensor(value) and tuple(value.shape) == shape(param):
                    value = value.to(param.device, torch.float32)
                    if hasattr(param, "ds_id"):
                        _set_zero3_state(param, value, key)
                    else:
                        safe_set_full_optimizer_state(param, value, key)
            index += 1


def partitions(zero_optimizer: Any, group: int) -> list[torch.Tensor]:
    """The flat fp32 partitions the trainer's optimizer steps for its parameter group ``group``
    (ZeRO 1/2: one; ZeRO-3: one per sub-group, handed to the optimizer only while it steps)."""
    if hasattr(zero_optimizer, "sub_group_to_group_id"):  # ZeRO-3
        return [
            flat
            for sub, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)
            if zero_optimizer.sub_group_to_group_id[sub] == group
        ]
    return [zero_optimizer.single_partition_of_fp32_groups[group]]


def _set_zero3_state(param: nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This process's slice of ``value`` into ZeRO-3's partition of state ``key`` of ``param``
    (DeepSpeed's ``safe_set_full_optimizer_state`` reads past the end of a parameter whose size
    does not divide by the number of processes)."""
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero._get_param_partition_rank(param)
    piece = value.flatten()[start : start + part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)


def shape(param: nn.Parameter) -> tuple[int, ...]:
    """A parameter's whole shape (ZeRO-3 leaves each process an empty placeholder)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _split(client: torch.optim.Optimizer, flats: list[torch.Tensor]) -> tuple[list[str], State]:
    """The keys of a group's partitioned states, and its shared (per-partition) values."""
    if not flats:
        return [], {}
    flat = flats[0]
    found = client.state.get(flat, {})
    partitioned = sorted(k for k, v in found.items() if torch.is_tensor(v) and v.shape == flat.shape)
    shared = {k: v for k, v in found.items() if k not in partitioned}
    return partitioned, shared


def _create_partition_state(
    client: torch.optim.Optimizer,
    group: State,
    flats: list[torch.Tensor],
    example: State,
    param: nn.Parameter,
) -> None:
    """Give each flat partition of ``group`` the keys of ``example`` (one parameter's saved
    state): zeros for the partitioned ones (filled in afterwards), copies of the others."""
    to_device = bool(group.get("fused") or group.get("capturable"))
    for flat in flats:
        state = {}
        for key, value in example.items():
            if torch.is_tensor(value) and tuple(value.shape) == shape(param):
                state[key] = torch.zeros_like(flat)
            elif torch.is_tensor(value):
                state[key] = value.detach().clone().to(flat.device) if to_device else value.detach().clone()
            else:
                state[key] = value
        client.state[flat] = state


def _link_fragments(zero_optimizer: Any) -> None:
    """ZeRO 1/2 map each parameter to its slice of the optimizer's partitioned states after the
    first step, once, and miss the groups that had no state yet (DeepSpeed 0.19.8, several
    parameter groups); link them all again now. ZeRO-3 needs no link."""
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _check_shapes(saved: State, groups: list[list[nn.Parameter]]) -> None:
    saved_counts = [len(group["params"]) for group in saved["param_groups"]]
    counts = [len(params) for params in groups]
    if saved_counts != counts:
        raise ValueError(
            f"the saved optimizer state has parameter groups of {saved_counts} parameters; "
            f"this model's optimizer has {counts}"
        )
    shapes = [shape(p) for params in groups for p in params]
    for index, state in saved["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != shapes[int(index)]:
                raise ValueError(
                    f"the saved optimizer state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}; the parameter has {shapes[int(index)]}"
                )


def _copy(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value
