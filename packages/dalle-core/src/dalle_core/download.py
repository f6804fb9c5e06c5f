"""Published files (pretrained weights, configs) in the user's download cache.

A file is downloaded once: streamed to a temporary file beside its cache path, checked (length
against ``Content-Length``, SHA-256 where one is known, content through an optional ``check``),
then renamed into place, so a cache path always holds a whole, checked file. The digest of every
cached file is pinned beside it (``<name>.sha256``): a file whose digest was not published is
checked against its first download from then on, and a cached file that no longer matches is
downloaded again. Under ``torch.distributed`` local rank 0 downloads while the other ranks wait.

Environment variables:

- ``DALLE_CACHE_DIR``: the cache directory (default ``$XDG_CACHE_HOME/dalle``, else
  ``~/.cache/dalle``, where upstream dalle-pytorch cached its files).
- ``DALLE_OFFLINE=1`` (or ``true``, ``yes``, ``on``): never download; a missing file is an
  `OfflineError` that names the URL and the path to put the file at.

Typical use in a plugin::

    from dalle_core.download import RemoteFile, resolve

    WEIGHTS = RemoteFile("https://example.org/weights.pt", "my-plugin/weights.pt", sha256=None)
    local = resolve(weights_path or WEIGHTS, argument="weights_path", cache_dir=cache_dir)
    state = torch.load(local.path, weights_only=True); config["source"] = local.record()
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dalle_core.pretrained import atomic_write_bytes

CACHE_DIR_ENV = "DALLE_CACHE_DIR"
OFFLINE_ENV = "DALLE_OFFLINE"
#: suffix of the file beside each cached file that holds its pinned hex SHA-256
PIN_SUFFIX = ".sha256"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")


class DownloadError(OSError):
    """A file could not be downloaded: network failure, incomplete transfer, offline mode,
    or a failure on the rank that downloads for this one."""


class ChecksumError(DownloadError, ValueError):
    """A downloaded, cached or given file does not have the expected SHA-256."""


class OfflineError(DownloadError, FileNotFoundError):
    """A file is not in the cache and ``DALLE_OFFLINE`` forbids downloading it."""


def parse_sha256(value: str | None, what: str) -> str | None:
    """``value`` as 64 lowercase hex digits (``None`` stays ``None``); ``what`` names it in
    the error raised for anything else."""
    if value is None:
        return None
    digest = value.strip().lower()
    if not _HEX64.fullmatch(digest):
        raise ValueError(f"{what} must be 64 hexadecimal digits (a SHA-256), got {value!r}")
    return digest


@dataclass(frozen=True)
class RemoteFile:
    """A file published at ``url``, cached as ``filename`` (a relative path inside the cache
    directory, e.g. ``"openai/encoder.pkl"``); ``sha256`` (hex) when it is known."""

    url: str
    filename: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not is_url(self.url):
            raise ValueError(f"RemoteFile.url must be an http(s) URL, got {self.url!r}")
        name = PurePosixPath(self.filename)
        if not self.filename or name.is_absolute() or ".." in name.parts:
            raise ValueError(
                f"RemoteFile.filename must be a relative path inside the cache without '..', "
                f"got {self.filename!r} (for {self.url})"
            )
        object.__setattr__(self, "sha256", parse_sha256(self.sha256, f"the SHA-256 of {self.url}"))


@dataclass(frozen=True)
class LocalFile:
    """The local copy of a location: ``path`` to read, its hex ``sha256``, and ``url`` when it
    came from the download cache (``None`` for a file the user gave by path)."""

    path: Path
    sha256: str
    url: str | None = None

    @property
    def location(self) -> str:
        """The URL, or the absolute path of a local file."""
        return self.url if self.url is not None else str(self.path.resolve())

    def record(self) -> dict[str, Any]:
        """Where the file came from, for a saved model's config (JSON values):
        ``{"url": ..., "sha256": ...}`` or ``{"path": <absolute path>, "sha256": ...}``."""
        key = "url" if self.url is not None else "path"
        return {key: self.location, "sha256": self.sha256}


def default_cache_dir() -> Path:
    """``$DALLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dalle``, else ``~/.cache/dalle``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "dalle"


def offline() -> bool:
    """Whether ``DALLE_OFFLINE`` forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an http(s) URL rather than a local path."""
    return isinstance(location, str) and urllib.parse.urlparse(location).scheme.lower() in {"http", "https"}


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def url_file(url: str, folder: str = "urls", sha256: str | None = None) -> RemoteFile:
    """A `RemoteFile` for a URL the user gave: cached as ``<folder>/<16 hex of sha256(url)>/<name>``,
    ``<name>`` being the last segment of the URL's path (``download`` if it has none)."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if name in {"", ".", ".."}:
        name = "download"
    return RemoteFile(url, f"{folder}/{hashlib.sha256(url.encode()).hexdigest()[:16]}/{name}", sha256)


def cache_path(remote: RemoteFile, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``remote`` is cached under ``cache_dir`` (default `default_cache_dir`)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / remote.filename


def fetch(
    remote: RemoteFile,
    cache_dir: str | os.PathLike[str] | None = None,
    check: Callable[[Path], None] | None = None,
    *,
    alternative: str | None = None,
) -> LocalFile:
    """The cached copy of ``remote``, downloaded first if it is missing or does not match.

    ``check(path)`` vets a fresh download before it is moved into the cache (raise to reject
    it, e.g. for an HTML error page). A download whose length, digest or content is wrong is
    deleted and an error raised: `DownloadError` (network, truncated), `ChecksumError`,
    `OfflineError`, or what ``check`` raised. ``alternative`` completes the error messages
    with what the user can do instead (e.g. ``"pass weights_path=<path of a local copy>"``).

    In an initialised ``torch.distributed`` job of more than one process, local rank 0
    (``$LOCAL_RANK``, else the global rank) downloads while the other ranks wait, then they
    read the cache (or, where it is not shared, fetch the file themselves); a failure on any
    downloading rank is raised on every rank, so none is left waiting. All ranks must then
    call `fetch` for the same files in the same order.
    """
    target = cache_path(remote, cache_dir)
    if not _distributed():
        return LocalFile(target, _ensure(remote, target, check, alternative), remote.url)
    import torch.distributed as dist

    downloads = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    error: Exception | None = None
    if downloads:
        try:
            digest = _ensure(remote, target, check, alternative)
        except Exception as caught:  # raised after the exchange, so no rank is left waiting
            error = caught
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise DownloadError(f"rank {rank} could not fetch {remote.url}: {failure}")
    if not downloads:
        digest = _ensure(remote, target, check, alternative)
    return LocalFile(target, digest, remote.url)


def resolve(
    location: RemoteFile | str | os.PathLike[str],
    *,
    argument: str,
    cache_dir: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    check: Callable[[Path], None] | None = None,
    folder: str = "urls",
    alternative: str | None = None,
) -> LocalFile:
    """The local file for ``location``: a `RemoteFile` or an http(s) URL (through `fetch`;
    URLs are cached by `url_file` under ``folder``), or a local path, used where it is.

    ``argument`` names the option the location came from, in error messages. ``sha256``
    (hex) is the expected digest (for a `RemoteFile`, it replaces the one it carries); a local
    file that does not match is a `ChecksumError`, a missing one a ``FileNotFoundError``.
    ``check`` and ``alternative`` go to `fetch` (default ``alternative``: passing a local copy
    as ``argument``).
    """
    expected = parse_sha256(sha256, f"the SHA-256 for {argument}")
    if isinstance(location, RemoteFile) or is_url(location):
        if isinstance(location, RemoteFile):
            remote = location if expected is None else dataclasses.replace(location, sha256=expected)
        else:
            remote = url_file(location, folder, expected)
        if alternative is None:
            alternative = f"pass {argument}=<path of a local copy>"
        return fetch(remote, cache_dir, check, alternative=alternative)
    path = Path(location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{argument}={str(location)!r}: no such file (give an existing file or an http(s) URL)"
        )
    actual = sha256_of(path)
    if expected is not None and actual != expected:
        raise ChecksumError(f"{argument}: {path} has SHA-256 {actual}, expected {expected}")
    return LocalFile(path, actual)


def _distributed() -> bool:
    """Whether an initialised torch.distributed group of more than one process is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _ensure(
    remote: RemoteFile, target: Path, check: Callable[[Path], None] | None, alternative: str | None
) -> str:
    """Make ``target`` a checked copy of ``remote`` and pin its digest; return the digest."""
    pin = target.with_name(target.name + PIN_SUFFIX)
    if target.is_file():
        actual = sha256_of(target)
        pinned = _read_pin(pin)
        expected = remote.sha256 or pinned
        if expected is None or actual == expected:
            if pinned != actual:
                atomic_write_bytes(pin, f"{actual}\n".encode())
            return actual
        origin = "published" if remote.sha256 else f"pinned in {pin} at its first download"
        if offline():
            raise ChecksumError(
                f"{target} has SHA-256 {actual}, expected {expected} ({origin}), and {OFFLINE_ENV} is "
                f"set, so it is not downloaded again: put the file from {remote.url} there"
                + ("" if remote.sha256 else f" (or delete {pin} to accept the file there now)")
            )
        logger.warning("%s has SHA-256 %s, expected %s (%s); downloading it again", target, actual,
                       expected, origin)
        target.unlink()
    if offline():
        digest = f" (SHA-256 {remote.sha256})" if remote.sha256 else ""
        raise OfflineError(
            f"{target.name} is not in the cache and {OFFLINE_ENV} is set, so it is not downloaded: "
            f"fetch {remote.url} on a machine with network access and put it at {target}{digest}, "
            f"or point {CACHE_DIR_ENV} at a cache that has it{_or(alternative)}"
        )
    actual = _download(remote, target, check, alternative)
    atomic_write_bytes(pin, f"{actual}\n".encode())
    return actual


def _or(alternative: str | None) -> str:
    """``", or <alternative>"`` to end an error message with, or nothing."""
    return f", or {alternative}" if alternative else ""


def _read_pin(pin: Path) -> str | None:
    """The digest pinned in ``pin``, or None when there is none (or it is not a digest)."""
    if not pin.is_file():
        return None
    digest = pin.read_text(errors="replace").strip().lower()
    return digest if _HEX64.fullmatch(digest) else None


def _download(
    remote: RemoteFile, target: Path, check: Callable[[Path], None] | None, alternative: str | None
) -> str:
    """Stream ``remote`` into a temporary file beside ``target``, check it, rename it into place;
    return its SHA-256. Nothing is left behind on failure.

    Streamed (checkpoints are hundreds of MB), so `atomic_write_bytes` is not used; same
    temporary-file, fsync, rename discipline. A progress bar is shown on a terminal when tqdm is
    installed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    partial = Path(name)
    logger.info("downloading %s to %s", remote.url, target)
    try:
        digest, received, total = hashlib.sha256(), 0, None
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(remote.url, timeout=TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length", "")
                    total = int(length) if length.isdigit() else None
                    with _progress(total, target.name) as advance:
                        while chunk := response.read(CHUNK_BYTES):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            advance(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
                raise DownloadError(
                    f"could not download {remote.url} ({type(error).__name__}: {error}); fetch it "
                    f"yourself and put it at {target}{_or(alternative)}"
                ) from error
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise DownloadError(
                f"the download of {remote.url} stopped after {received} of {total} bytes; nothing was "
                f"kept, try again"
            )
        actual = digest.hexdigest()
        if remote.sha256 is not None and actual != remote.sha256:
            raise ChecksumError(
                f"the download of {remote.url} is corrupted: SHA-256 {actual}, expected {remote.sha256}; "
                f"the corrupted file was removed, try again"
            )
        if check is not None:
            check(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return actual


@contextlib.contextmanager
def _progress(total: int | None, name: str) -> Iterator[Callable[[int], object]]:
    """``advance(n_bytes)`` for a download: a tqdm bar on a terminal when tqdm is installed (it
    is optional), otherwise nothing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield lambda n: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {name}",
              disable=None) as bar:
        yield bar.update
