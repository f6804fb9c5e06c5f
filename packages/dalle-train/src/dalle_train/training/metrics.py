"""Where training metrics go: ``OUT/metrics.jsonl`` always, TensorBoard and W&B on request.

TensorBoard and Weights & Biases are imported only when asked for; W&B runs offline unless an
API key is configured, so it never needs a network or an account.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dalle_train.errors import TrainError

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only metric records (one JSON object per line, flushed as written)."""

    def __init__(
        self,
        out: Path,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_FILE
        self.file = self.path.open("a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise TrainError("--tensorboard needs tensorboard: pip install tensorboard") from error
            self.tensorboard = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as error:
                raise TrainError("--wandb needs wandb: pip install wandb") from error
            offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None
            self.wandb = wandb.init(
                project=wandb_project, entity=wandb_entity, dir=str(out), config=config or {},
                mode="offline" if offline else None, resume="allow",
            )

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` at optimizer step ``step``."""
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        """Send a PNG already written under ``OUT/samples`` to TensorBoard / W&B."""
        if self.tensorboard is None and self.wandb is None:
            return
        from PIL import Image

        from dalle_train.imageio import to_tensor

        with Image.open(path) as image:
            pixels = image.convert("RGB")
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, to_tensor(pixels), step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class SilentMetrics(MetricsLog):
    """The metrics of a process that is not the root of a distributed run: nothing is written."""

    def __init__(self) -> None:
        self.tensorboard = self.wandb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Nothing: the root process writes the (averaged) metrics."""

    def image(self, step: int, name: str, path: Path) -> None:
        """Nothing: only the root writes pictures."""

    def close(self) -> None:
        """Nothing was opened."""
