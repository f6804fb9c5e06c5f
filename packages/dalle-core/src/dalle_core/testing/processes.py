"""The worker processes of a distributed run, found from its launcher's process id through
Linux's ``/proc``: for tests that kill one worker and then check that none outlives the run."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the parent is the 2nd field after the command name, which may hold ")"
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    found, frontier = [], {pid}
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = set(children)
    return found


def worker_rank(pid: int, variable: str = "RANK") -> int | None:
    """The rank (the environment's ``variable``: ``RANK`` for torchrun and DeepSpeed,
    ``HOROVOD_RANK`` for horovodrun) of a Python process running ``dalle_train``; None for any
    other process, and for one that has ended."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    key = variable.encode()
    is_trainer = Path(argv[0].decode()).name.startswith("python") and b"dalle_train" in argv
    return int(values[key]) if is_trainer and key in values else None


def workers(launcher: int, variable: str = "RANK") -> dict[int, int]:
    """rank -> process id of every training process below the process ``launcher``."""
    ranks = {pid: worker_rank(pid, variable) for pid in descendants(launcher)}
    return {rank: pid for pid, rank in ranks.items() if rank is not None}
