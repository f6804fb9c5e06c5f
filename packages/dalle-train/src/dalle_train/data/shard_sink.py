"""Writing WebDataset shards: samples into ``00000.tar``, ``00001.tar``... of a fixed size,
each written under a temporary name and renamed into place when complete (an interrupted
conversion never leaves a shard that looks whole), with img2dataset's ``00000_stats.json``
beside each so readers know the shard sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from webdataset import TarWriter

from dalle_train.errors import TrainError


def empty_output(output: Path) -> None:
    """Make ``output``; a `TrainError` naming ``--output`` when it exists and is not an empty folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TrainError(f"--output {output} exists and is not an empty folder: give a new or empty one")
    output.mkdir(parents=True, exist_ok=True)


class ShardSink:
    """Samples (``{"__key__": KEY, ENDING: bytes, ...}``) into shards of ``per_shard`` under
    ``folder``; `counts` lists the samples of each shard written so far. Use as a context
    manager: leaving it completes the last shard (or, after an error, removes it)."""

    def __init__(self, folder: Path, per_shard: int) -> None:
        if per_shard < 1:
            raise TrainError(f"--samples-per-shard must be at least 1, not {per_shard}")
        self.folder, self.per_shard = folder, per_shard
        self.counts: list[int] = []
        self._file: IO[bytes] | None = None
        self._writer: Any = None

    def _path(self, shard: int) -> Path:
        return self.folder / f"{shard:05d}.tar"

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample, starting a new shard when the current one is full."""
        if self._writer is None:
            self._file = open(self._path(len(self.counts)).with_suffix(".tar.partial"), "wb")
            self._writer = TarWriter(self._file, encoder=False)
            self.counts.append(0)
        self._writer.write(sample)
        self.counts[-1] += 1
        if self.counts[-1] == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        """Close the current shard, rename it into place and write its stats."""
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        self._writer = self._file = None
        shard, count = len(self.counts) - 1, self.counts[-1]
        path = self._path(shard)
        os.replace(path.with_suffix(".tar.partial"), path)
        stats = {"count": count, "successes": count, "failed_to_download": 0}
        path.with_name(f"{shard:05d}_stats.json").write_text(json.dumps(stats) + "\n")

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._writer is None:
            return
        if kind is None:
            self._finish()
            return
        self._writer.close()
        assert self._file is not None
        self._file.close()
        self._path(len(self.counts) - 1).with_suffix(".tar.partial").unlink(missing_ok=True)
        self._writer = self._file = None
        self.counts.pop()  # that shard is not written
