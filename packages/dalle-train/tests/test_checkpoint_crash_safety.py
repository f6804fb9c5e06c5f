"""A run killed at any moment of a checkpoint save resumes from a complete checkpoint.

A save (`dalle_train.training.checkpoints.save_checkpoint`) writes temporary files, fsyncs them,
renames them into place (``os.replace``), renames the finished step directory, replaces
``latest`` and deletes the checkpoints it no longer keeps (``os.unlink``, ``os.rmdir``). What
a killed process leaves on disk can only differ between two of these calls, or in the middle
of a write (creating a directory or an empty file changes nothing a resume sees that the next
write does not), so the test records them during one save of an uninterrupted run, then kills
a run at each of them (just before the call; half-way through a write) and resumes it. The
run dies in a forked child process with ``os._exit`` (no clean-up of any kind, as with ``kill
-9``); the children are forked from one fresh Python process, so torch is imported once for
all of them. After each kill, every ``step-N`` directory left must be a complete checkpoint,
``latest`` must name the previous one or, from some call on, the new one, ``--resume`` must
succeed and leave no temporary file or directory, and the weights and losses must equal the
uninterrupted run's.

The run is a VAE's: its save has every kind of step (a DALLE's only adds files in ``vae/``
and ``tokenizer/`` inside the temporary directory).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SHAPES, TINY_VAE, assert_same_weights, losses

from dalle_core import DiscreteVAE
from dalle_train.cli import build_parser, main
from dalle_train.training import loop
from dalle_train.training.checkpoints import load_state
from dalle_train.training.layout import CHECKPOINTS, LATEST

#: the calls by which a save changes what is on disk, or makes it durable (besides writes)
OS_CALLS = ("fsync", "replace", "unlink", "rmdir")
#: checkpoints at steps 2, 4 and 6, keeping only the newest
RUN = ["vae", *SHAPES, *TINY_VAE, "--max-steps", "6", "--save-every-n-steps", "2",
       "--keep-n-checkpoints", "1", "--log-every", "1"]
#: the save that is interrupted: step 4's, which replaces and deletes step-2
SAVE, PREVIOUS, NEW = 2, "step-2", "step-4"
KILLED = 137


class _WatchedFile:
    """A file opened for writing whose ``write`` is reported first."""

    def __init__(self, file: Any, report: Callable[[Any, Any], None]) -> None:
        self._file, self._report = file, report

    def write(self, data: Any) -> int:
        self._report(self._file, data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _WatchedFile:
        self._file.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)


def watch_save(number: int, before_call: Callable[[int, str, tuple[Any, ...]], None],
               setattr: Callable[[Any, str, Any], None] = setattr) -> None:
    """Call ``before_call(index, name, args)`` before each of the `OS_CALLS` (``os.<name>``)
    and each ``write`` (args: the file and the data) to a file opened during the ``number``-th
    checkpoint save of this process; ``index`` counts from 1."""
    saves, active, count = 0, False, 0
    real_save, real_open = loop.save_checkpoint, io.open

    def save_checkpoint(*args: Any, **kwargs: Any) -> Path:
        nonlocal saves, active
        saves += 1
        active = saves == number
        try:
            return real_save(*args, **kwargs)
        finally:
            active = False

    def report(name: str, args: tuple[Any, ...]) -> None:
        nonlocal count
        if active:
            count += 1
            before_call(count, name, args)

    def watched(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            report(name, args)
            return real(*args, **kwargs)

        return call

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode, *args, **kwargs)
        if not (active and any(flag in mode for flag in "wax+")):
            return opened
        return _WatchedFile(opened, lambda handle, data: report("write", (handle, data)))

    setattr(loop, "save_checkpoint", save_checkpoint)
    for name in OS_CALLS:
        setattr(os, name, watched(name))
    for module in (io, builtins):  # os.fdopen and pathlib open files through io.open
        setattr(module, "open", open_)


def kill_at(point: int) -> Callable[[int, str, tuple[Any, ...]], None]:
    """A ``before_call`` that ends the process at call ``point``: before it, or for a write
    after writing half of its data."""

    def before_call(index: int, name: str, args: tuple[Any, ...]) -> None:
        if index == point:
            if name == "write":
                file, data = args
                file.write(data[: len(data) // 2])
                file.flush()
            os._exit(KILLED)

    return before_call


def kill_runs(outs: list[str], points: list[int]) -> None:
    """For each output directory and kill point, fork a child that runs `RUN` into that
    directory and dies at the point-th watched call of save `SAVE` (see `kill_at`); print
    the children's exit codes as JSON."""
    build_parser()  # import every command, and what the first optimizer imports, before forking
    import torch._dynamo  # noqa: F401
    codes = []
    for out, point in zip(outs, points):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            watch_save(SAVE, kill_at(point))
            os._exit(main([*RUN, "--output-dir", out]))
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))


def complete(step: Path) -> bool:
    """Whether the model and the training state of a step directory load."""
    try:
        DiscreteVAE.from_pretrained(step)
        load_state(step)
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_a_run_killed_anywhere_in_a_save_resumes_from_a_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole"
    calls: list[tuple[str, str]] = []  # os.<name> and its last argument (the written data's size)
    watch_save(SAVE, lambda index, name, args: calls.append(
        (name, f"{len(args[1])} bytes" if name == "write" else str(args[-1]))), monkeypatch.setattr)
    assert main([*RUN, "--output-dir", str(whole)]) == 0
    monkeypatch.undo()
    # the save writes, fsyncs and renames files, and deletes step-2
    assert {name for name, _ in calls} == {"write", *OS_CALLS}, calls

    points = list(range(1, len(calls) + 1))
    outs = [tmp_path / f"killed-at-call-{point}" for point in points]
    driver = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from {Path(__file__).stem} "
              f"import kill_runs; kill_runs({[str(out) for out in outs]!r}, {points!r})")
    env = {**os.environ, "DALLE_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [KILLED] * len(points), "a run was not killed"

    pointed = []  # what latest names after each kill: the previous checkpoint, then the new one
    for point, out, (name, argument) in zip(points, outs, calls):
        where = f"killed at call {point}: {name}({argument})"
        checkpoints = out / CHECKPOINTS
        assert all(complete(step) for step in checkpoints.glob("step-*")), where
        pointed.append((checkpoints / LATEST).read_text().strip())
        assert pointed[-1] in (PREVIOUS, NEW), where
        assert main(["vae", "--resume", "--output-dir", str(out)]) == 0, where
        assert sorted(p.name for p in checkpoints.iterdir()) == [LATEST, "step-6"], where
        assert_same_weights(whole / CHECKPOINTS / "step-6", checkpoints / "step-6")
        assert losses(out) == losses(whole), where
    assert pointed == sorted(pointed, key=(PREVIOUS, NEW).index) and pointed[-1] == NEW, pointed
