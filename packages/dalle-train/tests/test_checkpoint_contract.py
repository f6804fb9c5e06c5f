"""The checkpoint layout's promises, checked in-process on a tiny VAE:

- a save is built under a temporary name, its files and directories fsynced, renamed into
  place, the checkpoints folder synced, and only then named by ``latest``;
- pruning to ``keep`` keeps the newest step directories (numerically: step-10 after step-9),
  never the one just written, and never touches what is not a complete step directory;
- deleting is done under a temporary name and is best effort: a file that cannot be deleted
  stops neither a save nor a start;
- what a killed save leaves (temporary step directories, ``.latest.*.tmp``) is removed at start;
- refused states (no training state, unsafe, truncated, empty, foreign files; a ``latest`` naming
  an incomplete directory; a path with no model) are one-line errors naming the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dalle_core import DiscreteVAE
from dalle_core.testing.pickles import ConstructOnUnpickle
from dalle_train.errors import TrainError
from dalle_train.training.checkpoints import (
    STATE_FILE,
    load_state,
    remove_partial,
    resume_dir,
    save_checkpoint,
    step_dirs,
)
from dalle_train.training.layout import CHECKPOINTS, LATEST, TRAINING_STATE, find_model_dir, latest_step_dir


@pytest.fixture(scope="module")
def model(vae_dir: Path) -> DiscreteVAE:
    return DiscreteVAE.from_pretrained(vae_dir)


def state(step: int) -> dict[str, Any]:
    return {"step": step, "moments": torch.arange(4.0) * step, "run": {"config": {"optim": {"seed": 0}}}}


def names(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir())


def latest(checkpoints: Path) -> str:
    return (checkpoints / LATEST).read_text()


def record_file_system(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every ``os.fsync`` (with the path its descriptor names) and ``os.replace``, in order."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real_replace(src, dst, **kwargs)
        events.append(("replace", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_save_is_synced_renamed_and_only_then_named_by_latest(tmp_path: Path, model: DiscreteVAE,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = tmp_path / "run" / CHECKPOINTS  # neither exists yet
    events = record_file_system(monkeypatch)
    final = save_checkpoint(checkpoints, 3, model, state(3), keep=None)
    monkeypatch.undo()

    assert final == checkpoints / "step-3" and names(checkpoints) == [LATEST, "step-3"]
    assert latest(checkpoints) == "step-3\n" and latest_step_dir(checkpoints) == final
    loaded = load_state(final)
    assert loaded["step"] == 3 and torch.equal(loaded["moments"], state(3)["moments"])
    assert DiscreteVAE.from_pretrained(final).num_tokens == model.num_tokens

    renames = [e for e in events if e[0] == "replace" and e[2] == str(final)]
    assert len(renames) == 1
    temp = renames[0][1]
    assert Path(temp).parent == checkpoints and Path(temp).name.startswith(".tmp-step-3")
    rename = events.index(renames[0])
    before, after = events[:rename], events[rename + 1:]
    # the whole directory was complete and synced under its temporary name
    state_written = [i for i, e in enumerate(before)
                     if e[0] == "replace" and e[2] == f"{temp}/{TRAINING_STATE}/{STATE_FILE}"]
    assert state_written and ("fsync", temp) in before[state_written[0]:]
    for name in ("config.json", "model.safetensors", f"{TRAINING_STATE}/{STATE_FILE}"):
        assert any(e[0] == "replace" and e[2] == f"{temp}/{name}" for e in before), name
    # then the folder holding the new name is synced, and only then is `latest` replaced
    pointer = [i for i, e in enumerate(after) if e[0] == "replace" and e[2] == str(checkpoints / LATEST)]
    assert len(pointer) == 1 and ("fsync", str(checkpoints)) in after[:pointer[0]]
    assert not [e for e in before if e[0] == "replace" and e[2] == str(checkpoints / LATEST)]


def test_pruning_keeps_the_newest_in_step_order_and_never_the_one_just_written(
        tmp_path: Path, model: DiscreteVAE) -> None:
    checkpoints = tmp_path / CHECKPOINTS
    # what is not a complete step directory is never counted nor pruned
    (checkpoints / "exported").mkdir(parents=True)
    (checkpoints / "exported" / "config.json").write_text("{}")
    (checkpoints / "step-best").mkdir()
    (checkpoints / "step-1").mkdir()  # no config.json: not a checkpoint
    (checkpoints / "notes.txt").write_text("mine")
    others = ["exported", "notes.txt", "step-1", "step-best"]

    for step in (8, 9, 10):
        save_checkpoint(checkpoints, step, model, state(step), keep=None)
    assert [p.name for p in step_dirs(checkpoints)] == ["step-8", "step-9", "step-10"]
    save_checkpoint(checkpoints, 11, model, state(11), keep=2)
    assert names(checkpoints) == sorted([*others, LATEST, "step-10", "step-11"])
    save_checkpoint(checkpoints, 12, model, state(12), keep=1)
    assert names(checkpoints) == sorted([*others, LATEST, "step-12"])
    assert latest(checkpoints) == "step-12\n"
    # a run resumed from an older checkpoint: the step just written is kept, and is `latest`
    save_checkpoint(checkpoints, 5, model, state(5), keep=1)
    assert names(checkpoints) == sorted([*others, LATEST, "step-12", "step-5"])
    assert latest(checkpoints) == "step-5\n" and load_state(checkpoints / "step-5")["step"] == 5
    assert step_dirs(tmp_path / "none") == []


def test_saving_a_step_again_replaces_it_and_leftovers_of_its_staging(tmp_path: Path,
                                                                       model: DiscreteVAE) -> None:
    checkpoints = tmp_path / CHECKPOINTS
    first = save_checkpoint(checkpoints, 4, model, state(4), keep=None)
    (first / "stale.txt").write_text("from the first save")
    stale_temp = checkpoints / ".tmp-step-4"  # a save of the same step that failed
    stale_temp.mkdir()
    (stale_temp / "junk.txt").write_text("junk")
    again = save_checkpoint(checkpoints, 4, model, {**state(4), "step": 40}, keep=None)
    assert again == first and names(checkpoints) == [LATEST, "step-4"]
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors", TRAINING_STATE]
    assert load_state(again)["step"] == 40


def test_deleting_is_best_effort_under_a_temporary_name(tmp_path: Path, model: DiscreteVAE,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that cannot be deleted (busy on NFS, another owner) stops neither a save nor a start."""
    checkpoints = tmp_path / CHECKPOINTS
    save_checkpoint(checkpoints, 1, model, state(1), keep=None)
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> None:
        if dir_fd is not None and str(path) == "model.safetensors":  # inside shutil.rmtree
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    save_checkpoint(checkpoints, 2, model, state(2), keep=1)
    left = [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 1 and left[0].startswith(".tmp-deleted-step-1")
    assert latest(checkpoints) == "step-2\n" and [p.name for p in step_dirs(checkpoints)] == ["step-2"]
    assert [p.name for p in remove_partial(checkpoints)] == left  # tried, and no error
    monkeypatch.undo()
    remove_partial(checkpoints)
    assert names(checkpoints) == [LATEST, "step-2"]


def test_what_a_killed_save_leaves_is_removed_at_start(tmp_path: Path, model: DiscreteVAE) -> None:
    checkpoints = tmp_path / CHECKPOINTS
    assert remove_partial(checkpoints) == []  # no folder yet
    save_checkpoint(checkpoints, 2, model, state(2), keep=None)
    partial = checkpoints / ".tmp-step-7-999"
    (partial / TRAINING_STATE).mkdir(parents=True)
    (partial / "config.json").write_text("{")
    deleting = checkpoints / ".tmp-deleted-step-1-999"
    deleting.mkdir()
    pointer_temp = checkpoints / ".latest.k2j4h.tmp"
    pointer_temp.write_text("step-7\n")
    removed = remove_partial(checkpoints)
    assert sorted(removed) == sorted([partial, deleting, pointer_temp])
    assert names(checkpoints) == [LATEST, "step-2"] and latest(checkpoints) == "step-2\n"


def one_line_error(call: Any) -> str:
    with pytest.raises(TrainError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unreadable_training_states_are_refused_naming_the_file(tmp_path: Path, model: DiscreteVAE,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # also where the environment makes torch.load unpickle anything unless told otherwise
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    directory = save_checkpoint(tmp_path / CHECKPOINTS, 1, model, state(1), keep=None)
    path = directory / TRAINING_STATE / STATE_FILE
    advice = "; resume from an older step-N directory or start fresh"
    marker = tmp_path / "code-ran"
    torch.save({"state": ConstructOnUnpickle(marker)}, path)
    assert one_line_error(lambda: load_state(directory)) == (
        f"{path} is not a readable training state (it holds dalle_core.testing.pickles.MarkerOnInit, "
        f"which is never unpickled: that could run code){advice}")
    assert not marker.exists()
    path.write_bytes(b"garbage")  # refused by the weights-only unpickler, no object named
    assert one_line_error(lambda: load_state(directory)) == (
        f"{path} is not a readable training state (it holds more than tensors and plain data){advice}")
    path.write_bytes(b"")
    assert one_line_error(lambda: load_state(directory)) == (
        f"{path} is not a readable training state (EOFError: ){advice}")
    torch.save(state(1), path)
    path.write_bytes(path.read_bytes()[:100])
    message = one_line_error(lambda: load_state(directory))
    assert message.startswith(f"{path} is not a readable training state (RuntimeError: PytorchStreamReader ")
    assert message.endswith(advice)
    (directory / TRAINING_STATE / STATE_FILE).unlink()
    assert one_line_error(lambda: load_state(directory)) == (
        f"{directory} has no training state ({TRAINING_STATE}/{STATE_FILE}): it is a model, not a "
        f"resumable checkpoint; start a new run from it instead of resuming")


def test_a_state_saved_on_a_gpu_loads_onto_the_cpu(tmp_path: Path) -> None:
    directory = tmp_path / "step-1"
    path = directory / TRAINING_STATE / STATE_FILE
    path.parent.mkdir(parents=True)
    torch.save({"moments": torch.arange(3)}, path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    pickled = next(name for name in files if name.endswith("data.pkl"))
    on_cuda = files[pickled].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    assert on_cuda != files[pickled]
    with zipfile.ZipFile(path, "w") as archive:  # as torch.save writes a tensor of cuda:0
        for name, data in files.items():
            archive.writestr(name, on_cuda if name == pickled else data)
    moments = load_state(directory)["moments"]
    assert moments.device == torch.device("cpu") and moments.tolist() == [0, 1, 2]


def test_latest_and_user_paths_find_a_complete_model_or_say_why_not(tmp_path: Path,
                                                                    model: DiscreteVAE) -> None:
    out = tmp_path / "run"
    checkpoints = out / CHECKPOINTS
    assert latest_step_dir(checkpoints) is None
    assert one_line_error(lambda: resume_dir(checkpoints)) == (
        f"--resume: {checkpoints} holds no checkpoint yet ({LATEST} is missing)")
    step = save_checkpoint(checkpoints, 6, model, state(6), keep=None)
    assert resume_dir(checkpoints) == step
    for given in (out, checkpoints, step, str(out)):
        assert find_model_dir(given) == step
    (checkpoints / LATEST).write_text("step-9\n")
    expected = (f"{checkpoints / LATEST} names step-9, which is not a complete checkpoint (config.json is "
                f"missing); point it at another step-N directory or delete it")
    for call in (lambda: latest_step_dir(checkpoints), lambda: resume_dir(checkpoints),
                 lambda: find_model_dir(out)):
        assert one_line_error(call) == expected
    assert one_line_error(lambda: find_model_dir(tmp_path / "nowhere")) == (
        f"{tmp_path / 'nowhere'} does not exist: give a checkpoint directory (with config.json)")
    assert one_line_error(lambda: find_model_dir(tmp_path)) == (
        f"{tmp_path} holds no model: expected config.json (a checkpoint directory such as "
        f"OUT/checkpoints/step-N) or a run directory with {CHECKPOINTS}/{LATEST}")
