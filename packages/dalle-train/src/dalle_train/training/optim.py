"""AdamW with weight decay on matrices only, and the learning-rate schedules.

Schedules (``--lr-schedule``): ``cosine`` (linear warm-up, then cosine decay to a tenth of the
peak), ``constant`` (warm-up, then flat), ``plateau`` (upstream ``--lr_decay``: halve the rate
when the loss stops improving) and ``exponential`` (upstream ``train_vae.py``: multiply by
``--lr-decay-rate`` every 100 steps).
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "constant", "plateau", "exponential")
#: devices with a fused AdamW kernel in torch
FUSED_DEVICES = frozenset({"cpu", "cuda"})
#: upstream train_vae.py decayed the rate once per 100 steps
EXPONENTIAL_EVERY = 100


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: matrices (ndim >= 2) decay, vectors do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    # one fused kernel for all parameters (CPU and CUDA): a third of the per-tensor loop's time
    fused = all(p.device.type in FUSED_DEVICES for p in trainable)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str, decay_rate: float) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based) of ``total``."""
    if schedule == "exponential":
        return decay_rate ** (step // EXPONENTIAL_EVERY)
    if step < warmup:
        return (step + 1) / warmup
    if schedule in ("constant", "plateau"):
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """The learning rate of every step: a step-indexed factor, times a plateau factor.

    Stateless except for the plateau part, which `state_dict` saves for exact resumes.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: str,
        total_steps: int,
        warmup_steps: int = 0,
        decay_rate: float = 0.98,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
        self.optimizer = optimizer
        self.schedule, self.total, self.warmup = schedule, total_steps, warmup_steps
        self.decay_rate = decay_rate
        self.peaks = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, peak in zip(optimizer.param_groups, self.peaks):
            group["initial_lr"] = peak
        # plateau, as upstream's ReduceLROnPlateau(factor=0.5, patience=10, cooldown=10, min_lr=1e-6)
        self.plateau = {"factor": 1.0, "best": math.inf, "bad": 0, "cooldown": 0}

    def apply(self, step: int) -> float:
        """Set the rate for optimizer step ``step``; returns it (of the first group)."""
        factor = lr_factor(step, self.total, self.warmup, self.schedule, self.decay_rate)
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = max(peak * factor * self.plateau["factor"], 0.0)
            if self.schedule == "plateau":
                group["lr"] = max(group["lr"], min(1e-6, peak))
        return self.optimizer.param_groups[0]["lr"]

    def observe(self, loss: float) -> None:
        """Feed an averaged loss (once per log interval) to the plateau rule."""
        if self.schedule != "plateau":
            return
        state = self.plateau
        if state["cooldown"] > 0:
            state["cooldown"] -= 1
        if loss < state["best"] * (1 - 1e-4):
            state["best"], state["bad"] = loss, 0
        elif state["cooldown"] == 0:
            state["bad"] += 1
            if state["bad"] > 10:
                state["factor"] *= 0.5
                state["bad"], state["cooldown"] = 0, 10

    def state_dict(self) -> dict:
        return {"plateau": dict(self.plateau)}

    def load_state_dict(self, state: dict) -> None:
        self.plateau = dict(state["plateau"])
