"""Samples streamed from WebDataset shards, in batches that resume at the recorded shard and
sample: image-text pairs (``--wds IMAGE_KEY,CAPTION_KEY``, `PixelDecoder`) or pre-encoded
image codes (``--tokens``, `dalle_train.data.tokens.CodeDecoder`).

Readers: every DataLoader worker of every process reads its own shards, so with P processes
and W workers there are ``R = P * max(W, 1)`` readers and reader ``r = rank * W + worker``
reads the shards ``order[r::R]`` of each epoch, where ``order`` is a permutation of the shards
drawn from ``(seed, epoch)``: in an epoch every shard is read once, by one reader. With
``resample=True`` each reader instead draws its shards with replacement from ``(seed, epoch,
r)`` (for multi-node runs where shards do not divide evenly; ``--max-steps`` ends the run).

Each reader makes whole batches of its own samples, so a batch is always full (a skipped
sample is replaced by the next), and the DataLoader hands the workers' batches out in turn.
A reader's position is three numbers, ``(epoch, shard, sample)``: where in its list of that
epoch's shards the next sample is. Each batch carries the position after it; `StreamBatches`
keeps the position of the last batch the trainer took from each reader (and whose batch is
next), saves them, and on resume each reader opens that shard and skips that many samples
without decoding them, so no sample is seen twice in an epoch. Every random choice of a sample
(its caption line, its crop) is drawn from ``(seed, epoch, shard index, sample index)``.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from dalle_train.data.images import CorruptImageError, load_image, random_resized_crop
from dalle_train.data.loader import Batch, collate
from dalle_train.data.report import LOGGER, Event, SkipReport
from dalle_train.data.sample import Sample
from dalle_train.data.seeding import generator
from dalle_train.data.shards import ShardList
from dalle_train.errors import TrainError
from dalle_train.imageio import to_tensor

#: samples in a row that may fail before a reader gives up
MAX_CONSECUTIVE_FAILURES = 100

#: a reader's position: (epoch, index in its shard list of that epoch, samples read of that shard)
Position = tuple[int, int, int]


@dataclass(frozen=True)
class WdsKeys:
    """``--wds IMAGE_KEY,CAPTION_KEY``: the image's endings (``jpg;png`` takes the first one a
    sample has), the caption's ending, and the JSON field a ``json`` caption is read from."""

    image: tuple[str, ...]
    caption: str
    caption_field: str = "caption"

    @classmethod
    def parse(cls, spec: str, caption_field: str = "caption") -> WdsKeys:
        """``"jpg;png,txt"`` -> keys; a `TrainError` naming ``--wds`` when it is not two keys."""
        parts = [part.strip().lower().lstrip(".") for part in spec.split(",")]
        image = tuple(key.strip().lstrip(".") for key in parts[0].split(";") if key.strip()) if parts else ()
        if len(parts) != 2 or not image or not parts[1]:
            raise TrainError(f"--wds {spec!r} must be IMAGE_KEY,CAPTION_KEY: the endings of the image and "
                             f"caption files of a sample, e.g. --wds jpg,txt or --wds png,json")
        return cls(image, parts[1], caption_field)


def source_of(raw: dict[str, Any]) -> str:
    """How messages name a raw sample: "KEY in SHARD"."""
    return f"{raw['__key__']} in {raw['__url__']}"


def caption_lines(raw: dict[str, Any], ending: str, report: SkipReport,
                  json_field: str | None = None) -> list[str] | None:
    """The non-empty lines of the sample's ``ending`` file, or of the field ``json_field`` of the
    JSON in it (a list of strings counts as lines); None, told to ``report``, when the file is
    missing or unreadable or holds no line."""
    source = source_of(raw)
    if ending not in raw:
        report.add("missing_caption", source, f"no {ending} file in the sample")
        return None
    try:
        text = raw[ending].decode("utf-8")
        if json_field is not None:
            field = json.loads(text).get(json_field)
            text = "\n".join(field) if isinstance(field, list) else field
            if not isinstance(text, str):
                reason = f"its JSON has no text field {json_field!r} (--wds-caption-field)"
                report.add("missing_caption", source, reason)
                return None
    except (UnicodeDecodeError, ValueError, AttributeError) as error:
        report.add("unreadable_caption", source, f"{type(error).__name__}: {error}")
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        report.add("empty_caption", source, "the caption is empty")
    return lines or None


class PixelDecoder:
    """Raw WebDataset sample (``{ending: bytes}``) -> `Sample` of pixels: the image of
    ``keys.image`` read with Pillow (``channels`` 3 or 4) and randomly cropped to ``image_size``
    (at least ``resize_ratio`` of the area), one caption line; both drawn from ``(seed, epoch,
    shard, index)``. None, told to ``report``, for a sample without its files or with an
    unreadable image or caption."""

    def __init__(self, keys: WdsKeys, image_size: int, channels: int = 3, resize_ratio: float = 0.75,
                 seed: int = 0, report: SkipReport | None = None) -> None:
        self.keys, self.image_size, self.channels = keys, image_size, channels
        self.resize_ratio, self.seed = resize_ratio, seed
        self.report = SkipReport() if report is None else report

    def image_ending(self, raw: dict[str, Any]) -> str | None:
        """The first of the image endings the sample has; None (reported) when it has none."""
        ending = next((key for key in self.keys.image if key in raw), None)
        if ending is None:
            reason = f"no {' or '.join(self.keys.image)} file in the sample"
            self.report.add("missing_image", source_of(raw), reason)
        return ending

    def lines(self, raw: dict[str, Any]) -> list[str] | None:
        """Every caption line of the sample; None (reported) when it has none."""
        field = self.keys.caption_field if self.keys.caption == "json" else None
        return caption_lines(raw, self.keys.caption, self.report, field)

    def __call__(self, raw: dict[str, Any], epoch: int, shard: int, index: int) -> Sample | None:
        ending = self.image_ending(raw)
        lines = self.lines(raw) if ending is not None else None
        if ending is None or lines is None:
            return None
        rng = generator(self.seed, epoch, shard, index)
        caption = lines[int(torch.randint(len(lines), (1,), generator=rng))]
        source = source_of(raw)
        try:
            image = load_image(io.BytesIO(raw[ending]), self.channels, name=source)
        except CorruptImageError as error:
            self.report.add("corrupt_image", source, error.reason)
            return None
        image = random_resized_crop(image, self.image_size, self.resize_ratio, rng)
        return Sample(to_tensor(image), caption, source)


class Decoder(Protocol):
    """What a `ShardStream` decodes samples with (`PixelDecoder`,
    `dalle_train.data.tokens.CodeDecoder`): a raw sample of shard ``shard`` at ``index``, read
    in ``epoch`` -> `Sample` (None for one it skipped, told to its ``report``)."""

    report: SkipReport

    def __call__(self, raw: dict[str, Any], epoch: int, shard: int, index: int) -> Sample | None: ...


class ShardStream(IterableDataset):
    """Batches of the `Sample` s ``decode`` makes of ``shards`` (see the module): each item is
    ``(batch, reader, position after the batch, skip events)``; ``batch`` is a `Batch` of
    ``batch_size``. ``seed`` orders the shards; the decoder draws each sample's own choices."""

    def __init__(
        self, shards: ShardList, decode: Decoder, seed: int = 0, batch_size: int = 1, rank: int = 0,
        world_size: int = 1, resample: bool = False,
    ) -> None:
        if not len(shards):
            raise TrainError(f"{shards.source} names no shard")
        self.shards, self.decode = shards, decode
        self.seed, self.batch_size, self.resample = seed, batch_size, resample
        self.rank, self.world_size = rank, world_size
        self.report = decode.report
        self.workers = 1  # readers per process, set by `StreamBatches`
        #: reader -> where it starts, and the reader whose batch comes first (of this process's,
        #: 0 to workers - 1): set before the DataLoader copies this object to its workers
        self.starts: dict[int, Position] = {}
        self.first_reader = 0

    def split(self, batch_size: int, rank: int, world_size: int) -> ShardStream:
        """This stream for process ``rank`` of ``world_size``, in batches of ``batch_size``."""
        if batch_size < 1:
            raise TrainError(f"the batch size must be at least 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        part = copy.copy(self)
        part.batch_size, part.rank, part.world_size, part.starts = batch_size, rank, world_size, {}
        return part

    def raw_samples(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(shard, index, raw sample)`` of every sample of the shards in their listed order (a
        shard that cannot be read to its end is reported and left)."""
        for shard in range(len(self.shards)):
            for index, raw in self._read(shard, 0):
                yield shard, index, raw

    def in_order(self) -> Iterator[tuple[dict[str, Any], Sample | None]]:
        """`raw_samples` with what each decodes to (epoch 0's random choices; None for a
        skipped one)."""
        for shard, index, raw in self.raw_samples():
            yield raw, self.decode(raw, 0, shard, index)

    def first_samples(self, count: int) -> list[Sample]:
        """The first ``count`` usable samples of `in_order`, for prompts; fewer when the shards
        hold fewer."""
        usable = (sample for _, sample in self.in_order() if sample is not None)
        return list(itertools.islice(usable, count))

    @property
    def readers(self) -> int:
        """Readers over all processes."""
        return self.world_size * self.workers

    def check_readers(self) -> None:
        """Without resampling, each reader needs a shard of every epoch."""
        if not self.resample and len(self.shards) < self.readers:
            raise TrainError(
                f"{len(self.shards)} shards cannot feed {self.readers} readers ({self.world_size} "
                f"processes x {self.workers} data workers): every reader reads whole shards. Lower "
                f"--num-workers, split the data into more shards, or pass --resample-shards"
            )

    def shards_of(self, reader: int, epoch: int) -> list[int]:
        """The shard indices ``reader`` reads in ``epoch``, in order."""
        count = len(self.shards)
        if self.resample:
            per_reader = max(1, count // self.readers)
            return torch.randint(count, (per_reader,), generator=generator(self.seed, epoch, reader)).tolist()
        order = torch.randperm(count, generator=generator(self.seed, epoch)).tolist()
        return order[reader::self.readers]

    def __iter__(self) -> Iterator[tuple[Batch, int, Position, list[Event]]]:
        info = get_worker_info()  # the DataLoader takes batches from its workers 0, 1, ... in turn
        worker = info.id if info is not None else 0
        reader = self.rank * self.workers + (worker + self.first_reader) % self.workers
        samples: list[Sample] = []
        for sample, position in self._samples(reader, self.starts.get(reader, (0, 0, 0))):
            samples.append(sample)
            if len(samples) == self.batch_size:
                batch, _ = collate([(s, []) for s in samples])
                assert batch is not None
                yield batch, reader, position, self.report.drain()
                samples = []

    def _samples(self, reader: int, start: Position) -> Iterator[tuple[Sample, Position]]:
        """The usable samples of ``reader`` from ``start`` on, each with the position after it."""
        epoch, shard_at, skip = start
        failures = 0
        while True:
            usable = False
            shards = self.shards_of(reader, epoch)
            while shard_at < len(shards):
                shard = shards[shard_at]
                index = -1
                for index, raw in self._read(shard, skip):
                    sample = self.decode(raw, epoch, shard, index)
                    if sample is None:
                        failures += 1
                        if failures >= MAX_CONSECUTIVE_FAILURES:
                            raise TrainError(f"the last {failures} samples read from {self.shards.source} "
                                             f"(up to {raw['__key__']} in {raw['__url__']}) could not be "
                                             f"used: {self.report.summary()}")
                        continue
                    failures, usable = 0, True
                    yield sample, (epoch, shard_at, index + 1)
                shard_at, skip = shard_at + 1, 0
            if not usable and start == (epoch, 0, 0):
                raise TrainError(f"reader {reader} found no usable sample in its shards of epoch {epoch} "
                                 f"({self.report.summary()}): the warnings name each one")
            epoch, shard_at, start = epoch + 1, 0, (epoch + 1, 0, 0)

    def _read(self, shard: int, skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(index in the shard, raw sample)`` of shard ``shard`` from sample ``skip`` on; a shard
        that cannot be opened or read to its end is reported and left."""
        url = self.shards.urls[shard]
        errors: list[Exception] = []

        def keep(error: Exception) -> bool:
            errors.append(error)
            return False  # stop this shard

        for index, raw in enumerate(tarfile_samples([{"url": url}], handler=keep)):
            if index >= skip:
                yield index, raw
        if errors:
            self.report.add("unreadable_shard", url, f"{type(errors[0]).__name__}: {errors[0]}")


class StreamBatches:
    """Endless, resumable batches of a `ShardStream`, with the interface of
    `dalle_train.data.loader.Batches` (``epoch``, ``batches_per_epoch``, ``state_dict``...).

    ``num_workers``: DataLoader workers (each one a reader); ``pin_memory``: pinned images.
    ``batches_per_epoch`` is None when the shards' sizes are unknown.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False) -> None:
        if num_workers < 0:
            raise TrainError(f"the number of data workers must be 0 or more, not {num_workers}")
        stream.workers = max(1, num_workers)
        stream.check_readers()
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.dataset = stream  # as `Batches`: what the samples come from
        self._first = stream.rank * stream.workers
        self._positions: dict[int, Position] = {self._first + w: (0, 0, 0) for w in range(stream.workers)}
        self._next = 0  # the reader (of this process's, from 0) whose batch comes next

    @property
    def global_batch(self) -> int:
        """Samples of one micro-batch over all processes."""
        return self.stream.batch_size * self.stream.world_size

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches of a full epoch, when every shard's size is known (and not resampling)."""
        samples = self.stream.shards.samples
        if samples is None or self.stream.resample:
            return None
        return samples // self.global_batch

    @property
    def epoch(self) -> int:
        """The earliest epoch this process's readers are in."""
        return min(epoch for epoch, _, _ in self._positions.values())

    def __iter__(self) -> Iterator[Batch]:
        self.stream.starts, self.stream.first_reader = dict(self._positions), self._next
        # a generator of its own: otherwise the DataLoader draws its workers' seed from the
        # global RNG, and a resumed run's dropout would differ from an unbroken one's
        where = [number for position in self._positions.values() for number in position]
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=generator(self.stream.seed, *where))
        for batch, reader, position, events in loader:
            self.stream.report.merge(events)
            self._positions[reader] = tuple(position)  # type: ignore[assignment]
            self._next = (reader - self._first + 1) % self.stream.workers
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """This process's readers' positions, with what they depend on (the number of readers,
        the shards, the seed)."""
        return {"kind": "shards", "readers": self.stream.readers, "shards": len(self.stream.shards),
                "seed": self.stream.seed, "resample": self.stream.resample, "next": self._next,
                "positions": {str(reader): list(at) for reader, at in self._positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where a `state_dict` of the same readers left off. Saved with another number
        of readers (processes x workers), other shards or seed, or from a folder, the shards of
        the earliest saved epoch are read again from their start (a warning says so)."""
        positions = state.get("positions") if state.get("kind") == "shards" else None
        same = positions is not None and all(
            state.get(name) == now for name, now in (("readers", self.stream.readers),
                                                     ("shards", len(self.stream.shards)),
                                                     ("seed", self.stream.seed),
                                                     ("resample", self.stream.resample)))
        if same and all(str(reader) in positions for reader in self._positions):
            self._positions = {reader: tuple(positions[str(reader)]) for reader in self._positions}  # type: ignore
            self._next = int(state.get("next", 0))
            return
        epochs = [at[0] for at in positions.values()] if positions else [int(state.get("epoch", 0))]
        epoch = min(epochs, default=0)
        LOGGER.warning("the data position was saved for other readers or data (%s); this run has %d readers "
                       "over %d shards: reading the shards of epoch %d from their start", _describe(state),
                       self.stream.readers, len(self.stream.shards), epoch)
        self._positions = {reader: (epoch, 0, 0) for reader in self._positions}
        self._next = 0


def _describe(state: dict[str, Any]) -> str:
    if state.get("kind") != "shards":
        return "a folder or built-in dataset"
    return f"{state.get('readers')} readers over {state.get('shards')} shards, seed {state.get('seed')}"
