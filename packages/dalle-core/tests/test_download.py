"""`dalle_core.download` against a loopback HTTP server: the cache, pinned digests, corrupted,
truncated and rejected downloads, offline mode, local paths, and rank 0 downloading first under
torch.distributed (2 gloo processes)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from download_worker import fetch_on_each_rank

from dalle_core.download import (
    CACHE_DIR_ENV,
    OFFLINE_ENV,
    ChecksumError,
    DownloadError,
    LocalFile,
    OfflineError,
    RemoteFile,
    default_cache_dir,
    fetch,
    is_url,
    offline,
    parse_sha256,
    resolve,
    sha256_of,
    url_file,
)
from dalle_core.testing.fileserver import PROXY_VARIABLES, FileServer

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: more than one read chunk


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """A loopback server holding ``f.bin`` (PAYLOAD); proxies bypassed, downloads allowed."""
    for name in (*PROXY_VARIABLES, OFFLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    with FileServer({"f.bin": PAYLOAD}) as running:
        yield running


def remote(server: FileServer, sha: str | None = sha256(PAYLOAD), path: str = "f.bin") -> RemoteFile:
    return RemoteFile(server.url(path, "dl=1"), "sub/f.bin", sha)


def cache_files(root: Path) -> list[str]:
    """Every file under ``root`` (temporary ``.part`` files included), relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_downloaded_once_then_read_from_the_cache(server: FileServer, tmp_path: Path) -> None:
    first = fetch(remote(server), tmp_path)
    assert first == LocalFile(tmp_path / "sub" / "f.bin", sha256(PAYLOAD), server.url("f.bin", "dl=1"))
    assert first.path.read_bytes() == PAYLOAD
    assert (tmp_path / "sub" / "f.bin.sha256").read_text() == f"{sha256(PAYLOAD)}\n"  # pinned
    assert fetch(remote(server), tmp_path) == first
    assert server.requests == {"f.bin": 1}
    assert first.record() == {"url": first.url, "sha256": sha256(PAYLOAD)}
    assert cache_files(tmp_path) == ["sub/f.bin", "sub/f.bin.sha256"]


def test_cache_dir_from_the_environment(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert fetch(remote(server)).path == tmp_path / "env" / "sub" / "f.bin"


def test_corrupted_download_is_rejected_and_removed(server: FileServer, tmp_path: Path) -> None:
    corrupted = bytearray(PAYLOAD)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server.files["f.bin"] = bytes(corrupted)
    with pytest.raises(ChecksumError, match=f"is corrupted: SHA-256 {sha256(corrupted)}, expected "
                       f"{sha256(PAYLOAD)}; the corrupted file was removed") as error:
        fetch(remote(server), tmp_path)
    assert isinstance(error.value, ValueError) and isinstance(error.value, OSError)
    assert cache_files(tmp_path) == []  # neither the file, nor a pin, nor a .part
    server.files["f.bin"] = PAYLOAD  # the server is fixed: the next try works
    assert fetch(remote(server), tmp_path).path.read_bytes() == PAYLOAD
    assert server.requests == {"f.bin": 2}


def test_truncated_download_is_removed(server: FileServer, tmp_path: Path) -> None:
    server.truncate.add("f.bin")
    # http.client either raises IncompleteRead or returns the short body: both are rejected
    cut = r"could not download .*IncompleteRead|stopped after \d+ of \d+ bytes; nothing was kept"
    with pytest.raises(DownloadError, match=cut):
        fetch(remote(server, sha=None), tmp_path)
    assert cache_files(tmp_path) == []


def test_http_error_says_what_to_do(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"could not download .*/missing\.bin.*404.*put it at "
                       f"{tmp_path / 'sub' / 'f.bin'}, or pass x=local.bin"):
        fetch(remote(server, path="missing.bin"), tmp_path, alternative="pass x=local.bin")
    assert cache_files(tmp_path) == []


def test_check_rejects_content_before_it_enters_the_cache(server: FileServer, tmp_path: Path) -> None:
    server.files["f.bin"] = b"<html>Too many requests</html>"

    def check(path: Path) -> None:
        if path.read_bytes().startswith(b"<html>"):
            raise ValueError(f"{path} is an HTML page")

    with pytest.raises(ValueError, match="is an HTML page"):
        fetch(remote(server, sha=None), tmp_path, check)
    assert cache_files(tmp_path) == []
    server.files["f.bin"] = PAYLOAD
    assert fetch(remote(server, sha=None), tmp_path, check).sha256 == sha256(PAYLOAD)


def test_cached_file_with_a_wrong_digest_is_downloaded_again(
    server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = fetch(remote(server), tmp_path).path
    target.write_bytes(b"bit rot")
    with caplog.at_level(logging.WARNING, logger="dalle_core.download"):
        assert fetch(remote(server), tmp_path).path.read_bytes() == PAYLOAD
    assert "downloading it again" in caplog.text and f"expected {sha256(PAYLOAD)} (published)" in caplog.text
    assert server.requests == {"f.bin": 2}


def test_unpublished_digest_is_pinned_at_the_first_download(server: FileServer, tmp_path: Path) -> None:
    target = fetch(remote(server, sha=None), tmp_path).path
    target.write_bytes(b"bit rot")  # caught by the pinned digest although none was published
    assert fetch(remote(server, sha=None), tmp_path).sha256 == sha256(PAYLOAD)
    assert server.requests == {"f.bin": 2} and target.read_bytes() == PAYLOAD


def test_offline_says_where_to_put_the_file(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OFFLINE_ENV, "1")
    target = tmp_path / "sub" / "f.bin"
    with pytest.raises(OfflineError) as error:
        fetch(remote(server), tmp_path, alternative="pass weights=<path>")
    assert str(error.value) == (
        f"f.bin is not in the cache and {OFFLINE_ENV} is set, so it is not downloaded: fetch "
        f"{server.url('f.bin', 'dl=1')} on a machine with network access and put it at {target} "
        f"(SHA-256 {sha256(PAYLOAD)}), or point {CACHE_DIR_ENV} at a cache that has it, "
        f"or pass weights=<path>"
    )
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, DownloadError)
    assert not server.requests
    target.parent.mkdir()
    target.write_bytes(PAYLOAD)  # as the message says
    assert fetch(remote(server), tmp_path).path == target
    assert not server.requests


def test_offline_keeps_a_mismatching_file_and_says_why(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = fetch(remote(server, sha=None), tmp_path).path
    target.write_bytes(b"replaced by hand")
    monkeypatch.setenv(OFFLINE_ENV, "yes")
    pin = tmp_path / "sub" / "f.bin.sha256"
    with pytest.raises(ChecksumError, match=f"expected {sha256(PAYLOAD)} \\(pinned in {pin} .*delete {pin}"):
        fetch(remote(server, sha=None), tmp_path)
    assert target.read_bytes() == b"replaced by hand"
    pin.unlink()  # as the message says: the file there is accepted and pinned
    assert fetch(remote(server, sha=None), tmp_path).sha256 == sha256(b"replaced by hand")
    assert server.requests == {"f.bin": 1}


def test_resolve_urls_remote_files_and_paths(server: FileServer, tmp_path: Path) -> None:
    url = server.url("runs/f.bin")
    server.files["runs/f.bin"] = PAYLOAD
    local = resolve(url, argument="weights", cache_dir=tmp_path, folder="mine")
    assert local.path == tmp_path / url_file(url, "mine").filename
    assert local.path.parent.parent == tmp_path / "mine" and local.path.name == "f.bin"
    assert resolve(url, argument="weights", cache_dir=tmp_path, folder="mine") == local
    assert server.requests == {"runs/f.bin": 1}
    with pytest.raises(ChecksumError, match="is corrupted"):  # sha256= overrides the RemoteFile's
        resolve(remote(server, sha=None), argument="weights", cache_dir=tmp_path / "b", sha256="0" * 64)
    with pytest.raises(DownloadError, match="or pass weights=<path of a local copy>"):
        resolve(server.url("nothing"), argument="weights", cache_dir=tmp_path)

    path = tmp_path / "given.bin"
    path.write_bytes(b"given")
    given = resolve(path, argument="weights", sha256=sha256(b"given").upper())
    assert given == LocalFile(path, sha256(b"given"))
    assert given.record() == {"path": str(path.resolve()), "sha256": sha256(b"given")}
    with pytest.raises(ChecksumError, match=f"weights: {path} has SHA-256 {sha256(b'given')}, expected 0+$"):
        resolve(str(path), argument="weights", sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="weights='.*nowhere.bin': no such file"):
        resolve(str(tmp_path / "nowhere.bin"), argument="weights")
    with pytest.raises(ValueError, match="the SHA-256 for weights must be 64 hexadecimal digits"):
        resolve(path, argument="weights", sha256="abc")


def test_remote_file_validation() -> None:
    assert RemoteFile("https://x.org/a", "a", "AB" * 32).sha256 == "ab" * 32
    with pytest.raises(ValueError, match="must be an http"):
        RemoteFile("ftp://x.org/a", "a")
    for bad in ("/etc/a", "../a", "a/../../b", ""):
        with pytest.raises(ValueError, match="relative path inside the cache"):
            RemoteFile("https://x.org/a", bad)
    with pytest.raises(ValueError, match="SHA-256 of https://x.org/a must be 64 hexadecimal digits"):
        RemoteFile("https://x.org/a", "a", "xyz")
    assert url_file("https://x.org/").filename.endswith("/download")
    assert url_file("https://x.org/d/..").filename.endswith("/download")
    assert parse_sha256(None, "x") is None


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert default_cache_dir() == tmp_path / "xdg" / "dalle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "dalle"  # where upstream cached its files


def test_small_helpers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for value, expected in (("1", True), (" ON ", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(OFFLINE_ENV, value)
        assert offline() is expected
    assert is_url("https://x.org/a") and is_url("HTTP://x.org/a")
    assert not is_url("x.org/a") and not is_url("file:///a") and not is_url(tmp_path)
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert sha256_of(tmp_path / "f") == sha256(PAYLOAD)


def test_rank_zero_downloads_while_the_others_wait(server: FileServer, tmp_path: Path) -> None:
    server.delay_s = 0.2  # rank 1 would get its own request in if it did not wait
    urls = {"missing": server.url("missing.bin"), "good": server.url("f.bin")}
    context = mp.spawn(
        fetch_on_each_rank,
        args=(2, str(tmp_path / "store"), urls, sha256(PAYLOAD), str(tmp_path)),
        nprocs=2,
        join=False,
    )
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish in 90 s (deadlock?)")
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert rank0["missing"].startswith(f"could not download {urls['missing']}")
    assert rank1["missing"].startswith(f"rank 0 could not fetch {urls['missing']}: DownloadError: could not")
    assert rank0["good"] == rank1["good"] == [str(tmp_path / "cache" / "good.bin"), sha256(PAYLOAD)]
    assert server.requests == {"missing.bin": 1, "f.bin": 1}  # rank 1 read the cache
