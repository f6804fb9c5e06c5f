"""Skipped samples: counted per kind, each file named once, summed up in one line.

A bad sample is never fatal on its own: the dataset skips it and tells a `SkipReport`, which
logs one warning per file (through the ``dalle_train.data`` logger) and keeps the counts for
the end-of-run summary and the metrics.

Inside a DataLoader worker process the report is a copy that nobody reads, so there it only
queues what it is told; `Batches` drains the queue with each batch and merges it into the
report of the main process, which then warns (once per file, whichever worker found it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch.utils.data import get_worker_info

LOGGER = logging.getLogger("dalle_train.data")

#: the kinds the datasets report, with their (singular, plural) words for `SkipReport.summary`
KINDS: dict[str, tuple[str, str]] = {
    "corrupt_image": ("corrupt image", "corrupt images"),
    "missing_caption": ("without a caption", "without captions"),
    "missing_image": ("caption without an image", "captions without images"),
    "empty_caption": ("empty caption", "empty captions"),
    "unreadable_caption": ("unreadable caption", "unreadable captions"),
    "unreadable_shard": ("shard not read to its end", "shards not read to their end"),
    "duplicate_key": ("sample with a key seen before", "samples with keys seen before"),
}

#: one skip: (kind, source, reason)
Event = tuple[str, str, str]


class SkipReport:
    """Counts skipped samples per kind; warns once per file, naming it and saying why.

    ``limit``: at most this many warnings per kind (None: all); the counts are always complete
    and `summary` says how many went unlisted.
    """

    def __init__(self, logger: logging.Logger = LOGGER, limit: int | None = None) -> None:
        self.logger = logger
        self.limit = limit
        self._seen: dict[str, Event] = {}  # source -> first event about it
        self._counts: dict[str, int] = {}
        self._pending: list[Event] = []  # queued inside a worker process

    def add(self, kind: str, source: str, reason: str) -> bool:
        """Record that ``source`` was skipped as ``kind`` because ``reason``.

        Returns False when this file was already reported (nothing is counted twice).
        """
        if get_worker_info() is not None:
            self._pending.append((kind, source, reason))
            return True
        if source in self._seen:
            return False
        self._seen[source] = (kind, source, reason)
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if self.limit is None or self._counts[kind] <= self.limit:
            self.logger.warning("skipping %s: %s", source, reason)
        return True

    def drain(self) -> list[Event]:
        """The events queued in this (worker) process since the last drain, cleared."""
        events, self._pending = self._pending, []
        return events

    def merge(self, events: Iterable[Event]) -> None:
        """Add events drained from another process."""
        for kind, source, reason in events:
            self.add(kind, source, reason)

    def count(self, kind: str | None = None) -> int:
        """Files skipped as ``kind``, or in all (None)."""
        return sum(self._counts.values()) if kind is None else self._counts.get(kind, 0)

    def sources(self, kind: str) -> list[str]:
        """The files skipped as ``kind``, in the order they were found."""
        return [source for k, source, _ in self._seen.values() if k == kind]

    def as_dict(self) -> dict[str, int]:
        """Counts for metrics: every known kind (0 included), any other kind seen, and ``total``."""
        counts = {kind: self._counts.get(kind, 0) for kind in KINDS}
        counts.update(self._counts)
        counts["total"] = self.count()
        return counts

    def summary(self) -> str:
        """One line, e.g. "skipped 3 samples: 1 corrupt image, 2 without captions"."""
        total = self.count()
        if total == 0:
            return "skipped no samples"
        parts = []
        for kind in [*KINDS, *(k for k in self._counts if k not in KINDS)]:
            n = self._counts.get(kind, 0)
            if n:
                singular, plural = KINDS.get(kind, (kind.replace("_", " "),) * 2)
                parts.append(f"{n} {singular if n == 1 else plural}")
        line = f"skipped {total} sample{'s' if total != 1 else ''}: {', '.join(parts)}"
        if self.limit is not None:
            unlisted = sum(max(n - self.limit, 0) for n in self._counts.values())
            if unlisted:
                line += f" ({unlisted} not named in warnings)"
        return line

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()!r})"
