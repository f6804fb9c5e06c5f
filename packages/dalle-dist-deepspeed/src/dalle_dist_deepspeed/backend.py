"""``deepspeed``: DeepSpeed's engine with ZeRO stage 1, 2 or 3 (optionally the optimizer's state
offloaded to the CPU), launched by ``deepspeed`` (or ``torchrun``).

The engine owns backward, gradient reduction, clipping and the optimizer step; the trainer's
torch optimizer (AdamW) steps ZeRO's fp32 partitions, and the learning rate the trainer writes
into its ``param_groups`` is the one ZeRO uses (the groups are shared). Precision runs as
DeepSpeed's ``torch_autocast`` (fp32 weights, 16-bit compute; see `dalle_dist_deepspeed.config`),
so the consolidated checkpoint holds fp32 weights. ZeRO-3 shards the weights themselves:
`gathered` assembles them for the root to save, and the run is not `replicated`.

deepspeed is imported only when the backend is initialised, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import json
import os
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dalle_core.backends import local_device
from dalle_core.interfaces import DistributedBackend, StepPlan
from dalle_dist_deepspeed import engine_state, optimizer_state
from dalle_dist_deepspeed.config import build_config, offloads_optimizer, read_config_file, resolve_zero_stage

#: what the deepspeed launcher and torchrun set for every process
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = (
    "deepspeed --num_gpus N $(which dalle-train) COMMAND ... --distributed-backend deepspeed "
    "(or torchrun --nproc_per_node N $(which dalle-train) COMMAND ... --distributed-backend deepspeed)"
)


class DeepSpeedBackend(DistributedBackend):
    """DeepSpeed ZeRO data parallelism.

    Args:
        zero_stage: ZeRO stage 1 (optimizer state sharded), 2 (and gradients) or 3 (and
            weights); None: the ``--deepspeed-config`` file's stage, else 1.
        offload: keep the optimizer's state (and its step) on the CPU (ZeRO-Offload); False:
            as the configuration file says (off when it says nothing).
        config_file: a DeepSpeed JSON configuration merged with what the flags say
            (`dalle_dist_deepspeed.config.build_config`).
        timeout_s: collectives time out after this many seconds.
    """

    plugin_name = "deepspeed"

    def __init__(
        self,
        zero_stage: int | None = None,
        offload: bool = False,
        config_file: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.file_config = read_config_file(config_file) if config_file else {}
        self.zero_stage = resolve_zero_stage(zero_stage, self.file_config)
        self._zero_stage_flag = zero_stage
        self.offload = offload
        self.timeout = timedelta(seconds=timeout_s)
        self._device = torch.device("cpu")
        self._control: Any = None  # the process group of CPU-side agreement (gloo)
        self._joined = False
        self._engine: Any = None
        self._client: torch.optim.Optimizer | None = None
        self._groups: list[list[nn.Parameter]] = []
        self._plan: StepPlan | None = None
        self.config: dict[str, Any] | None = None

    # -- joining -----------------------------------------------------------------------------

    def initialize(self) -> None:
        """Join the launcher's process group: gloo when DeepSpeed's accelerator is the CPU,
        else the accelerator's own (NCCL on CUDA) plus a gloo group for the per-step agreement."""
        missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"the deepspeed backend runs under a launcher that sets {', '.join(missing)}: "
                f"start it with {LAUNCH_HINT}"
            )
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        on_cpu = get_accelerator().device_name() == "cpu"
        deepspeed.init_distributed(
            dist_backend="gloo" if on_cpu else None,  # None: the accelerator's (NCCL on CUDA)
            auto_mpi_discovery=False,
            timeout=self.timeout,
            verbose=False,
        )
        self._control = None if on_cpu else dist.new_group(backend="gloo", timeout=self.timeout)
        self._joined = True

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def local_rank(self) -> int:
        return int(os.environ["LOCAL_RANK"])

    @property
    def replicated(self) -> bool:  # type: ignore[override]
        """False under ZeRO-3: each process holds a shard of every weight."""
        return self.zero_stage != 3

    def device(self, requested: torch.device) -> torch.device:
        """``cuda:<local_rank>`` when a CUDA device is asked for, else the CPU (DeepSpeed's
        accelerator must agree: a run on the CPU of a machine with GPUs sets
        ``DS_ACCELERATOR=cpu``)."""
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        self._device = local_device(requested, self.local_rank)
        if self._device.type != accelerator:
            raise RuntimeError(
                f"--device {requested}: DeepSpeed trains on its accelerator, {accelerator!r}; "
                f"pass --device {accelerator} (or set DS_ACCELERATOR={self._device.type})"
            )
        return self._device

    # -- training ----------------------------------------------------------------------------

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan: StepPlan
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """DeepSpeed's engine around ``model`` and ZeRO's optimizer around ``optimizer`` (whose
        ``param_groups``, and so the learning rate written into them, ZeRO uses). Without an
        optimizer there is nothing to shard: the model is returned as it is."""
        if optimizer is None:
            return model, None
        import deepspeed

        self._plan = plan
        self.config = build_config(
            plan, self.world_size, self._zero_stage_flag, self.offload, self.file_config
        )
        self._groups = [list(group["params"]) for group in optimizer.param_groups]
        self._client = optimizer
        if self.is_root:  # what DeepSpeed is given, once: the merge of flags and file, auditable
            given = json.dumps(self.config, sort_keys=True)
            print(f"deepspeed: ZeRO stage {self.zero_stage}, configuration {given}")
        engine, zero_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False
        )
        self._engine = engine
        return engine, zero_optimizer

    def accumulating(self, model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
        """Marks whether this micro-batch ends the accumulation (its backward reduces)."""
        if model is self._engine:
            model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, scaler: torch.amp.GradScaler) -> None:
        """Through the engine (which scales fp16 losses itself; ``scaler`` is not used); the
        loss is already divided by the accumulation steps, so DeepSpeed does not divide again."""
        if self._engine is None:
            raise RuntimeError("deepspeed backend: backward before wrap() with an optimizer")
        self._engine.backward(loss, scale_wrt_gas=False)

    def step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad_norm: float | None
    ) -> None:
        """The engine's step: it clips to the plan's ``clip_grad_norm``, steps and zeroes."""
        if self._engine is None or self._plan is None:
            raise RuntimeError("deepspeed backend: step before wrap() with an optimizer")
        if (clip_grad_norm or 0.0) != (self._plan.clip_grad_norm or 0.0):
            raise ValueError(
                f"deepspeed backend: clip_grad_norm {clip_grad_norm} differs from the plan's "
                f"{self._plan.clip_grad_norm}, which the engine was configured with"
            )
        self._engine.step()

    # -- agreeing ----------------------------------------------------------------------------

    def barrier(self) -> None:
        dist.barrier(group=self._control)

    def average(self, tensor: Tensor) -> Tensor:
        # a sum, then a division: gloo's AVG has been reported to sum (pytorch issue 162338)
        device = torch.device("cpu") if self._control is not None else self._device
        total = tensor.detach().to(device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._control)
        return (total / self.world_size).to(tensor.device)

    def any(self, flag: bool) -> bool:
        """Reduced on the CPU (gloo): agreeing to stop never waits for a GPU."""
        count = torch.tensor(float(flag))
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self._control)
        return bool(count.item() > 0)

    def gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self._control)
        return gathered

    def shutdown(self) -> None:
        """Release the engine and leave the process group; DeepSpeed's process-wide autocast
        setting is forgotten too, so that a later engine in this process starts clean."""
        if self._engine is not None:
            self._engine.destroy()
            self._engine = None
            from deepspeed.runtime import torch_autocast

            if hasattr(torch_autocast, "TORCH_AUTOCAST_INITIALIZED"):
                torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
        if self._joined and dist.is_initialized():
            import deepspeed.comm

            self._joined, self._control = False, None
            deepspeed.comm.destroy_process_group()  # also forgets DeepSpeed's cached groups

    # -- saving and resuming -----------------------------------------------------------------

    def gathered(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Under ZeRO-3, every process gathers every weight (``modifier_rank=None``: read
        only) for the duration; the weights are fp32 (``torch_autocast``). Else nothing to do."""
        if self._engine is None or self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Collective: the trainer's optimizer state assembled from ZeRO's partitions in
        ``torch.optim`` form, on the root (None on the others)."""
        if self._engine is None:
            return optimizer.state_dict()
        return optimizer_state.consolidate(self._engine.optimizer, self._client, self._groups, self.is_root)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a ``torch.optim`` state (saved by any backend and number of processes) into
        ZeRO's partitions."""
        if self._engine is None:
            optimizer.load_state_dict(state)
            return
        optimizer_state.restore(self._engine.optimizer, self._client, self._groups, state)

    def save_engine_state(self, directory: Path) -> bool:
        """Collective: DeepSpeed's sharded checkpoint (and a manifest) under ``directory``."""
        if self._engine is None:
            return False
        engine_state.save(self._engine, Path(directory), self._manifest(), self.is_root)
        self.barrier()
        return True

    def load_engine_state(self, directory: Path) -> bool:
        """Collective: restore DeepSpeed's checkpoint from ``directory`` when it was written with
        this ZeRO stage, number of processes, precision and offload; else False."""
        if self._engine is None:
            return False
        reason = engine_state.why_not_readable(Path(directory), self._manifest())
        if self.any(reason is not None):  # every process decides the same (a file may be missing on one)
            if self.is_root and (Path(directory) / engine_state.MANIFEST).is_file():
                reason = reason or "unreadable on a process"
                print(f"deepspeed: not resuming from DeepSpeed's own files: {reason}")
            return False
        engine_state.load(self._engine, Path(directory))
        if self.is_root:
            print(f"deepspeed: resumed exactly from DeepSpeed's own files in {directory}")
        return True

    def _manifest(self) -> dict[str, Any]:
        assert self._plan is not None and self.config is not None
        return engine_state.manifest(
            self.zero_stage, self.world_size, self._plan.precision, offloads_optimizer(self.config)
        )
