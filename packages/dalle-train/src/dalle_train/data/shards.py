"""Where WebDataset shards are: ``--image-text-folder SOURCE`` with ``--wds``, resolved to a
list of shard URLs before anything is read or downloaded.

SOURCE is one ``.tar`` / ``.tar.gz`` file, a folder of them (searched at any depth, in name
order), a brace-expanded list (``/data/shard-{0000..0099}.tar``,
``http://host/shard-{000000..000099}.tar``; several lists joined by ``::``), or a ``pipe:``
command whose output is a tar. Local shards must all exist; ``http(s)://`` shards are read
through a ``curl`` process (WebDataset's way), so curl must be installed.

A shard's sample count is known when img2dataset's ``NAME_stats.json`` lies beside a local
``NAME.tar`` (its ``successes``), or by reading the local shard's member names; remote and
piped shards have no known count.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from dalle_train.errors import TrainError

#: file endings read as shards (compared lower-cased)
SHARD_ENDINGS = (".tar", ".tar.gz", ".tgz")
REMOTE_SCHEMES = ("http://", "https://")
#: missing shards named in an error before "and N more"
NAMED = 5


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through curl."""
    return url.startswith(REMOTE_SCHEMES)


def is_local(url: str) -> bool:
    """Whether ``url`` is a file path (not a URL, not a ``pipe:`` command)."""
    return not (is_remote(url) or url.startswith("pipe:") or "://" in url)


@dataclass(frozen=True)
class ShardList:
    """The shards of a source in reading order, and their sample counts (None: unknown)."""

    source: str
    urls: tuple[str, ...]
    sizes: tuple[int | None, ...]

    @property
    def samples(self) -> int | None:
        """Samples in all shards; None when any shard's count is unknown."""
        return None if None in self.sizes else sum(s for s in self.sizes if s is not None)

    def __len__(self) -> int:
        return len(self.urls)


def _is_shard(path: Path) -> bool:
    return path.name.lower().endswith(SHARD_ENDINGS)


def _folder_shards(folder: Path) -> list[str]:
    shards = sorted(str(path) for path in folder.rglob("*") if path.is_file() and _is_shard(path))
    if not shards:
        kinds = sorted({path.suffix or path.name for path in folder.rglob("*") if path.is_file()})
        found = f"only {', '.join(kinds[:8])} files" if kinds else "nothing"
        raise TrainError(f"--image-text-folder {folder} holds no shard ({', '.join(SHARD_ENDINGS)}): "
                         f"found {found}. With --wds it names shards; without --wds, a folder of "
                         f"images with .txt captions")
    return shards


def resolve(source: str) -> list[str]:
    """The shard URLs of ``source`` (see the module); a `TrainError` naming the flag when a local
    shard is missing, a folder holds none, or curl is needed and missing."""
    if not source:
        raise TrainError("--image-text-folder is empty: give a shard, a folder of shards or a list")
    if is_local(source) and "{" not in source and "::" not in source:
        path = Path(source)
        if path.is_dir():
            return _folder_shards(path)
        urls = [source]
    else:
        urls = expand_urls(source)
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        more = f" and {len(missing) - NAMED} more" if len(missing) > NAMED else ""
        raise TrainError(f"--image-text-folder {source}: {len(missing)} of {len(urls)} shards do not exist "
                         f"({', '.join(missing[:NAMED])}{more})")
    if any(is_remote(url) for url in urls) and shutil.which("curl") is None:
        raise TrainError(f"--image-text-folder {source}: http(s) shards are read through curl, which is not "
                         f"installed: install curl (apt install curl) or download the shards first")
    return urls


def count_samples(url: str) -> int | None:
    """Samples in the shard ``url``: img2dataset's ``successes`` when its ``_stats.json`` is
    beside the shard, else the distinct keys of a local shard's members; None for a remote or
    piped shard (or a local one that cannot be read: the reader reports it)."""
    if not is_local(url):
        return None
    path = Path(url)
    stem = path.name[: -len(next(e for e in SHARD_ENDINGS if path.name.lower().endswith(e)))] \
        if _is_shard(path) else path.stem
    stats = path.with_name(f"{stem}_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not img2dataset's: count the members instead
    try:
        with tarfile.open(path) as archive:
            keys = {base_plus_ext(member.name)[0] for member in archive if member.isfile()}
    except (OSError, tarfile.TarError, EOFError):
        return None
    keys.discard(None)
    return len(keys)


def shard_list(source: str) -> ShardList:
    """`resolve` ``source`` and count its shards' samples where that can be done locally."""
    urls = resolve(source)
    return ShardList(source, tuple(urls), tuple(count_samples(url) for url in urls))
