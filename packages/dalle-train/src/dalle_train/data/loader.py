"""Batches for the trainer: endless over epochs, resumable to the sample, with or without
DataLoader worker processes.

Epoch ``e`` visits the samples in a permutation drawn from ``(seed, e)``, and a dataset with a
``load(index, epoch)`` method (the folder and shapes datasets) draws its own random choices from
``(its seed, epoch, index)``. So the position in the data is just two numbers, the epoch and
the samples consumed in it: `state_dict` saves them, `load_state_dict` puts them back, and the
next batch is exactly the one an uninterrupted run would have got, whatever the workers.

Across ``world_size`` processes, an optimizer step's micro-batch is one global batch of
``world_size * batch_size`` samples of that order, and process ``rank`` takes its slice: the
ranks read disjoint samples, and together the same ones one process with the whole batch
would. The position counts global samples, so it is the same in every process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from dalle_train.data.report import LOGGER, Event, SkipReport
from dalle_train.data.sample import Sample
from dalle_train.data.seeding import generator
from dalle_train.errors import TrainError


@dataclass
class Batch:
    """``images``: float ``[B, C, H, W]`` in [0, 1]; ``captions`` and ``sources``: B strings."""

    images: torch.Tensor
    captions: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> Batch:
        """The same batch with its images in pinned memory (DataLoader's ``pin_memory``)."""
        return Batch(self.images.pin_memory(), self.captions, self.sources)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with its images on ``device``."""
        return Batch(self.images.to(device, non_blocking=non_blocking), self.captions, self.sources)


def collate(items: list[tuple[Sample | None, list[Event]]]) -> tuple[Batch | None, list[Event]]:
    """Stack the samples that loaded (None ones, corrupt images, are dropped) into a `Batch`
    (None when none loaded), and gather the skip events queued while loading them."""
    samples = [sample for sample, _ in items if sample is not None]
    events = [event for _, queued in items for event in queued]
    if not samples:
        return None, events
    images = torch.stack([sample.image for sample in samples])  # [B, C, H, W]
    return Batch(images, [s.caption for s in samples], [s.source for s in samples]), events


class _Keyed(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: a worker needs no epoch of its own. Each item
    comes with the skip events its loading queued (non-empty only in a worker process)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[Sample | None, list[Event]]:
        epoch, index = key
        load = getattr(self.dataset, "load", None)
        sample = load(index, epoch) if load is not None else self.dataset[index]
        report = getattr(self.dataset, "report", None)
        return sample, (report.drain() if isinstance(report, SkipReport) else [])


class _Plan:
    """The batch sampler: lists of ``(epoch, index)`` keys, epoch after epoch, from a start."""

    def __init__(self, batches: Batches, epoch: int, position: int) -> None:
        self.batches, self.epoch, self.position = batches, epoch, position

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, position = self.epoch, self.position
        while True:
            order = self.batches.order(epoch)  # [N]
            while (end := self.batches._end(position)) is not None:
                mine = order[position:end][self.batches.rank_slice]  # [batch_size] of the global batch
                yield [(epoch, int(i)) for i in mine]
                position = end
            epoch, position = epoch + 1, 0


class Batches:
    """Endless, resumable batches of ``dataset`` (`Sample` items) for a training loop.

    ``batch_size``: samples per batch (a batch holding a corrupt image is that much smaller,
    one where all are corrupt is skipped); ``seed``: the epochs' permutations; ``shuffle``:
    False visits the samples in index order; ``drop_last``: leave out each epoch's last,
    incomplete batch; ``num_workers``: DataLoader worker processes (0: load in this process);
    ``pin_memory``: pin the images for faster copies to a GPU; ``rank`` and ``world_size``:
    this process's slice of each global batch (see the module's docstring).

    Iterating goes on over epochs until the caller stops: `epoch`, `position` and
    `batches_per_epoch` tell it where it is (they count a batch as consumed when it is
    yielded). Iterating again continues from where the last iteration stopped. An epoch, seen
    from its start, in which no image could be read raises `TrainError` instead of going on
    forever.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
        num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise TrainError(f"the batch size must be at least 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        if world_size > 1 and not drop_last:
            raise ValueError("several processes need whole global batches: drop_last=True")
        if num_workers < 0:
            raise TrainError(f"the number of data workers must be 0 or more, not {num_workers}")
        self.dataset = dataset
        self.size = len(dataset)
        self.batch_size = batch_size
        self.world_size = world_size
        #: this process's samples of a global batch
        self.rank_slice = slice(rank * batch_size, (rank + 1) * batch_size)
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        if self.batches_per_epoch == 0:
            raise TrainError(
                f"the data has {self.size} usable samples, fewer than one batch of "
                f"{self.global_batch}: lower the batch size or add data"
            )
        self._epoch = 0
        self._position = 0

    @property
    def global_batch(self) -> int:
        """Samples of one micro-batch over all processes."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full epoch (the count of a first epoch with no corrupt images)."""
        if self.drop_last:
            return self.size // self.global_batch
        return -(-self.size // self.global_batch)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (epochs done so far)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Samples of the current epoch consumed so far."""
        return self._position

    def order(self, epoch: int) -> torch.Tensor:
        """The dataset indices in the order ``epoch`` visits them: ``[N]`` int64."""
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=generator(self.seed, epoch))

    def _end(self, position: int) -> int | None:
        """Where the batch starting at ``position`` ends, or None when the epoch is over."""
        end = position + self.global_batch
        if end <= self.size:
            return end
        return None if self.drop_last or position >= self.size else self.size

    def __iter__(self) -> Iterator[Batch]:
        # the DataLoader draws its workers' base seed from ``generator``: without one it would
        # draw from the global RNG, and a resumed run's dropout would differ from an unbroken one
        loader = DataLoader(
            _Keyed(self.dataset), batch_sampler=_Plan(self, self._epoch, self._position),
            num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
            generator=generator(self.seed, self._epoch, self._position),
        )
        report = getattr(self.dataset, "report", None)
        whole, usable = self._position == 0, False  # an epoch seen from its start; a batch in it
        for batch, events in loader:
            if isinstance(report, SkipReport):
                report.merge(events)
            usable = usable or batch is not None
            self._position = self._end(self._position)
            if self._end(self._position) is None:
                if whole and not usable:  # would go on forever: no image can be read
                    skipped = f" ({report.summary()})" if isinstance(report, SkipReport) else ""
                    raise TrainError(f"no image of epoch {self._epoch} could be read{skipped}: the "
                                     f"warnings above name each file; replace them or use other data")
                self._epoch, self._position = self._epoch + 1, 0
                whole, usable = True, False
            if batch is not None:
                yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}`` (where the next batch starts), with ``samples`` (the
        dataset's size) and ``seed`` so a resume can tell whether the data changed."""
        return {"epoch": self._epoch, "position": self._position, "samples": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict`: the next batch is the one that would have come next."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as error:
            raise TrainError(
                f"the saved data position {state!r} is incomplete: expected epoch and position"
            ) from error
        if epoch < 0 or position < 0:
            raise TrainError(f"the saved data position (epoch {epoch}, sample {position}) is negative")
        changed = [
            f"{name} {state[name]} then, {now} now"
            for name, now in (("samples", self.size), ("seed", self.seed))
            if name in state and int(state[name]) != now
        ]
        if changed:
            LOGGER.warning(
                "the data changed since the checkpoint (%s): continuing at epoch %d, sample %d of a "
                "different order", "; ".join(changed), epoch, position,
            )
        if self._end(position) is None:  # the saved epoch is over (or the data shrank)
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position
