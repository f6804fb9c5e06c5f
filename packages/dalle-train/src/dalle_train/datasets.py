"""The dataset a training command reads, from its flags: a folder or ``--dataset shapes``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_core.interfaces import DistributedBackend
from dalle_train.config import CaptionedData, Data, ImageData, Optimization
from dalle_train.data.folder import ImageFolder, ImageTextFolder
from dalle_train.data.loader import Batches
from dalle_train.data.report import SkipReport
from dalle_train.data.shapes import ShapesDataset
from dalle_train.errors import TrainError


def _source(data: Data) -> str:
    if data.folder is not None and data.dataset:
        raise TrainError(f"{data.folder_flag} and --dataset {data.dataset} both name a dataset: give one")
    if data.folder is None and not data.dataset:
        raise TrainError(f"no data: give {data.folder_flag} DIR or --dataset shapes (built in, no download)")
    return "shapes" if data.dataset else "folder"


def _shapes(data: Data, seed: int, image_size: int, channels: int) -> ShapesDataset:
    if channels != 3:
        raise TrainError(f"--dataset shapes has RGB pictures; the model wants {channels} channels")
    try:
        return ShapesDataset(data.dataset_size, seed=seed, image_size=image_size)
    except ValueError as error:
        raise TrainError(f"--dataset shapes: {error}") from error


def _announce(dataset: Any, what: str, report: SkipReport) -> None:
    skipped = f" ({report.summary()})" if report.count() else ""
    print(f"{len(dataset)} {what} in {dataset.root}{skipped}")


def captioned_dataset(data: CaptionedData, seed: int, image_size: int, channels: int) -> Any:
    """``--image-text-folder`` or ``--dataset shapes``, at the model's image size."""
    if _source(data) == "shapes":
        return _shapes(data, seed, image_size, channels)
    report = SkipReport()
    dataset = ImageTextFolder(Path(data.image_text_folder), image_size, channels,
                              data.random_resize_crop_lower_ratio, seed=seed, report=report)
    _announce(dataset, "image-text pairs", report)
    return dataset


def image_dataset(data: ImageData, seed: int, image_size: int, channels: int) -> Any:
    """``--image-folder`` or ``--dataset shapes`` (captions unused), for the VAE."""
    if _source(data) == "shapes":
        return _shapes(data, seed, image_size, channels)
    report = SkipReport()
    dataset = ImageFolder(Path(data.image_folder), image_size, channels, resize_ratio=1.0, seed=seed,
                          report=report)
    _announce(dataset, "images", report)
    return dataset


class Part:
    """Items ``indices`` of a dataset with ``load(index, epoch)``, indexed from 0."""

    def __init__(self, dataset: Any, indices: range) -> None:
        self.dataset, self.indices = dataset, indices
        self.report = getattr(dataset, "report", None)  # where the loader merges workers' skips

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int, epoch: int) -> Any:
        return self.dataset.load(self.indices[index], epoch)

    def __getitem__(self, index: int) -> Any:
        return self.load(index, 0)


def split_held_out(dataset: Any, count: int) -> tuple[Any, list[Any]]:
    """The dataset without its last ``count`` items, and those items (epoch 0, usable ones)."""
    count = max(0, min(count, len(dataset) // 5))
    train = Part(dataset, range(len(dataset) - count))
    held = [dataset.load(i, 0) for i in range(len(dataset) - count, len(dataset))]
    return train, [sample for sample in held if sample is not None]


def make_batches(dataset: Any, optim: Optimization, data: Data,
                 backend: DistributedBackend | None = None) -> Batches:
    """Shuffled (with the run's seed), resumable micro-batches of ``--batch-size`` per process,
    read by ``--num-workers`` processes; each process of a distributed ``backend`` reads its
    slice of every global batch."""
    rank, world_size = (backend.rank, backend.world_size) if backend is not None else (0, 1)
    if len(dataset) < optim.batch_size * world_size:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise TrainError(
            f"--batch-size {optim.batch_size}{processes} is larger than the dataset ({len(dataset)} samples)"
        )
    return Batches(dataset, optim.batch_size, seed=optim.seed, num_workers=data.num_workers, rank=rank,
                   world_size=world_size)
