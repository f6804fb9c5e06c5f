"""One rank of `test_download.test_rank_zero_downloads_while_the_others_wait`, in a module of
its own so that the spawned processes import only torch and dalle_core."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from dalle_core.download import DownloadError, RemoteFile, fetch


def fetch_on_each_rank(rank: int, world_size: int, store: str, urls: dict[str, str], digest: str,
                       out: str) -> None:
    """Join a gloo group, fetch a missing and then a served file into ``<out>/cache``, and write
    what happened to ``<out>/rank<rank>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    results = {}
    try:
        for case, sha256 in (("missing", None), ("good", digest)):
            try:
                local = fetch(RemoteFile(urls[case], f"{case}.bin", sha256), Path(out, "cache"))
                results[case] = [str(local.path), local.sha256]
            except DownloadError as error:
                results[case] = str(error)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
