"""The dataset a training command reads, from its flags: a folder, WebDataset shards
(``--wds``), pre-encoded shards (``--tokens``) or ``--dataset shapes``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dalle_core.interfaces import DistributedBackend
from dalle_train.config import CaptionedData, Data, ImageData, Optimization
from dalle_train.data.folder import ImageFolder, ImageTextFolder
from dalle_train.data.loader import Batches
from dalle_train.data.report import SkipReport
from dalle_train.data.sample import Sample
from dalle_train.data.scan import check_folder
from dalle_train.data.shapes import ShapesDataset
from dalle_train.data.shards import ShardList, resolve, shard_list
from dalle_train.data.stream import PixelDecoder, ShardStream, StreamBatches, WdsKeys
from dalle_train.data.tokens import MANIFEST, CodeDecoder, check_vae, read_manifest
from dalle_train.errors import TrainError


def _source(data: Data) -> str:
    tokens = getattr(data, "tokens", None)
    sources = {data.folder_flag: data.folder, f"--dataset {data.dataset}": data.dataset, "--tokens": tokens}
    named = [flag for flag, value in sources.items() if value]
    if len(named) > 1:
        raise TrainError(f"{' and '.join(named)} both name a dataset: give one")
    if not named:
        raise TrainError(f"no data: give {data.folder_flag} DIR or --dataset shapes (built in, no download)")
    wds = getattr(data, "wds", None)
    if tokens:
        if wds:
            raise TrainError("--tokens reads the shards of dalle-train encode, which need no --wds: drop it")
        return "tokens"
    if data.dataset and wds:
        raise TrainError(f"--wds reads shards named by {data.folder_flag}, not --dataset {data.dataset}")
    if getattr(data, "resample_shards", False) and not wds:
        raise TrainError("--resample-shards draws WebDataset shards: it needs --wds (or --tokens)")
    return "shapes" if data.dataset else "shards" if wds else "folder"


def check_source(data: Data) -> None:
    """That the data's folder or shards exist (a `TrainError` saying what is wrong), before
    anything slow or remote (a pretrained VAE's download) starts."""
    source = _source(data)
    if source == "folder":
        captions = " with .txt captions" if isinstance(data, CaptionedData) else ""
        check_folder(data.folder, "images" + captions)
    elif source == "shards":
        assert isinstance(data, CaptionedData) and data.wds is not None
        WdsKeys.parse(data.wds, data.wds_caption_field)
        resolve(str(data.folder))
    elif source == "tokens":
        assert isinstance(data, CaptionedData) and data.tokens is not None
        read_manifest(Path(data.tokens))


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


def _token_stream(folder: Path, seed: int, vae: Any, resample: bool) -> ShardStream:
    """The pre-encoded shards of ``folder`` (``--tokens``), checked against ``vae``."""
    manifest = read_manifest(folder)
    check_vae(manifest, vae, folder)
    names = [shard["name"] for shard in manifest["shards"]]
    shards = ShardList(str(folder), tuple(str(folder / name) for name in names),
                       tuple(int(shard["samples"]) for shard in manifest["shards"]))
    missing = [url for url in shards.urls if not Path(url).is_file()]
    if missing:
        raise TrainError(f"--tokens {folder}: {len(missing)} shards of its {MANIFEST} are missing "
                         f"({', '.join(missing[:5])})")
    print(f"{manifest['samples']} pre-encoded samples in {len(names)} shards in {folder} "
          f"({manifest['image_seq_len']} codes each, VAE {manifest['vae']['name']})")
    decode = CodeDecoder(int(manifest["image_seq_len"]), seed)
    return ShardStream(shards, decode, seed=seed, resample=resample)


def captioned_dataset(data: CaptionedData, seed: int, image_size: int, channels: int, vae: Any = None) -> Any:
    """``--image-text-folder`` (a folder, or shards with ``--wds``), ``--dataset shapes`` or
    ``--tokens`` (pre-encoded by ``vae``, the model's), at the model's image size. Shards are
    a `ShardStream` that `make_batches` splits."""
    source = _source(data)
    if source == "shapes":
        return _shapes(data, seed, image_size, channels)
    if source == "tokens":
        if vae is None:
            raise TrainError("--tokens holds image codes for DALLE: this command needs images")
        assert data.tokens is not None
        return _token_stream(Path(data.tokens), seed, vae, data.resample_shards)
    if source == "shards":
        assert data.wds is not None and data.image_text_folder is not None
        keys = WdsKeys.parse(data.wds, data.wds_caption_field)
        shards = shard_list(data.image_text_folder)
        samples = "unknown" if shards.samples is None else str(shards.samples)
        print(f"{len(shards)} shards of {samples} samples in {data.image_text_folder} "
              f"(images: {';'.join(keys.image)}, captions: {keys.caption})")
        decode = PixelDecoder(keys, image_size, channels, data.random_resize_crop_lower_ratio, seed)
        return ShardStream(shards, decode, seed=seed, resample=data.resample_shards)
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


def first_samples(dataset: Any, count: int) -> list[Sample]:
    """The first ``count`` usable samples of ``dataset`` (of its first shards for a stream)."""
    if isinstance(dataset, ShardStream):
        return dataset.first_samples(count)
    samples = (dataset[index] for index in range(min(len(dataset), count)))
    return [sample for sample in samples if sample is not None]


def split_held_out(dataset: Any, count: int) -> tuple[Any, list[Any]]:
    """The dataset without its last ``count`` items, and those items (epoch 0, usable ones)."""
    count = max(0, min(count, len(dataset) // 5))
    train = Part(dataset, range(len(dataset) - count))
    held = [dataset.load(i, 0) for i in range(len(dataset) - count, len(dataset))]
    return train, [sample for sample in held if sample is not None]


def make_batches(dataset: Any, optim: Optimization, data: Data, backend: DistributedBackend | None = None,
                 device: torch.device | None = None) -> Batches | StreamBatches:
    """Shuffled (with the run's seed), resumable micro-batches of ``--batch-size`` per process,
    read by ``--num-workers`` processes (in pinned memory when training on a CUDA ``device``);
    each process of a distributed ``backend`` reads its slice of every global batch (of a
    stream: its own shards)."""
    rank, world_size = (backend.rank, backend.world_size) if backend is not None else (0, 1)
    pin = device is not None and device.type == "cuda"
    if isinstance(dataset, ShardStream):
        part = dataset.split(optim.batch_size, rank, world_size)
        return StreamBatches(part, data.num_workers, pin_memory=pin)
    if len(dataset) < optim.batch_size * world_size:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise TrainError(
            f"--batch-size {optim.batch_size}{processes} is larger than the dataset ({len(dataset)} samples)"
        )
    return Batches(dataset, optim.batch_size, seed=optim.seed, num_workers=data.num_workers, pin_memory=pin,
                   rank=rank, world_size=world_size)
