"""Shards the tests write themselves, in the layout img2dataset writes: ``00000.tar`` holding
``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per sample (keys with gaps where a download failed),
and ``00000_stats.json`` beside each shard."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


def jpeg(colour: tuple[int, int, int], size: int = 24) -> bytes:
    """A JPEG of one colour with a darker square in its corner."""
    image = Image.new("RGB", (size, size), colour)
    image.paste((colour[0] // 2, colour[1] // 2, colour[2] // 2), (0, 0, size // 3, size // 3))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]], stats: bool = True) -> int:
    """``path`` holding each ``(key, {ending: bytes})``; img2dataset's ``_stats.json`` beside it
    (``successes`` = the samples written) when ``stats``. Returns the samples written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for ending, data in files.items():
                add(archive, f"{key}.{ending}", data)
            count += 1
    if stats:
        stem = path.name.split(".")[0]
        path.with_name(f"{stem}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
    return count


def img2dataset_shards(folder: Path, shards: int, per_shard: int, failed_every: int = 5) -> list[str]:
    """``shards`` shards of ``per_shard`` keys each, every ``failed_every``-th key missing (a
    failed download); each sample has a jpg, a txt caption ("<colour> square N") and a json
    with the same caption. Returns the captions written, in order."""
    captions = []
    for shard in range(shards):
        samples = []
        for offset in range(per_shard):
            number = shard * per_shard + offset
            if number % failed_every == failed_every - 1:
                continue
            caption = f"colour {number} square"
            colour = ((number * 37) % 256, (number * 91) % 256, (number * 53) % 256)
            meta = {"caption": caption, "url": f"http://example.com/{number}.jpg", "key": f"{number:09d}",
                    "status": "success"}
            samples.append((f"{number:09d}", {"jpg": jpeg(colour), "txt": caption.encode(),
                                              "json": json.dumps(meta).encode()}))
            captions.append(caption)
        write_shard(folder / f"{shard:05d}.tar", samples)
    return captions
