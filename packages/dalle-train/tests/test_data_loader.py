"""Batches: per-epoch permutations, exact resume from a state dict, worker processes giving the
same batches, corrupt images dropped and reported once in the main process."""

from __future__ import annotations

import io
import itertools
import logging
from pathlib import Path

import pytest
import torch

from dalle_train.data import Batch, Batches, ImageTextFolder, ShapesDataset
from dalle_train.errors import TrainError
from dalle_train.imageio import to_pil


def picture(seed: int) -> bytes:
    buffer = io.BytesIO()
    to_pil(torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(seed))).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    """Seven pairs with three caption lines each (so captions and crops vary by epoch), and one
    truncated image."""
    for i in range(7):
        (tmp_path / f"{i}.png").write_bytes(picture(i))
        (tmp_path / f"{i}.txt").write_text(f"one {i}\ntwo {i}\nthree {i}\n")
    (tmp_path / "9.png").write_bytes(picture(9)[:100])
    (tmp_path / "9.txt").write_text("broken")
    return tmp_path


def take(batches: Batches, count: int) -> list[Batch]:
    return list(itertools.islice(batches, count))


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and x.captions == y.captions and x.sources == y.sources
        for x, y in zip(a, b)
    )


def test_epochs_are_permutations_that_differ():
    data = ShapesDataset(10)
    batches = Batches(data, 4, seed=1, drop_last=False)
    assert batches.batches_per_epoch == 3
    got = take(batches, 6)
    assert [len(b) for b in got] == [4, 4, 2] * 2
    epochs = [sum((b.sources for b in got[i:i + 3]), []) for i in (0, 3)]
    assert all(sorted(e) == sorted(f"shapes/0/{i}" for i in range(10)) for e in epochs)
    assert epochs[0] != epochs[1] and batches.epoch == 2 and batches.position == 0
    in_order = take(Batches(data, 5, shuffle=False), 2)
    assert sum((b.sources for b in in_order), []) == [f"shapes/0/{i}" for i in range(10)]


def test_position_rolls_over_at_the_end_of_an_epoch():
    batches = Batches(ShapesDataset(10), 3, seed=0)  # drop_last: 3 batches, sample 9 left out
    iterator = iter(batches)
    states = [(next(iterator), batches.state_dict())[1] for _ in range(4)]
    assert [(s["epoch"], s["position"]) for s in states] == [(0, 3), (0, 6), (1, 0), (1, 3)]
    assert states[0]["samples"] == 10 and states[0]["seed"] == 0


def test_resume_gives_the_batches_an_uninterrupted_run_gets(folder):
    def make():  # a fresh dataset and loader, as in a new process
        return Batches(ImageTextFolder(folder, 12, resize_ratio=0.5, seed=5), 3, seed=2)

    reference = take(make(), 9)  # 8 pairs (one corrupt) -> 2 batches an epoch: crosses epochs
    assert len({tuple(b.captions) for b in reference}) == 9
    for stop in (1, 2, 5):
        first = make()
        assert same(take(first, stop), reference[:stop])
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert same(take(resumed, 9 - stop), reference[stop:]), stop


def test_workers_give_the_same_batches_and_resume(folder, caplog):
    caplog.set_level(logging.WARNING)
    plain = take(Batches(ImageTextFolder(folder, 12, seed=1), 4, seed=3, drop_last=False), 6)
    caplog.clear()
    data = ImageTextFolder(folder, 12, seed=1)
    workers = Batches(data, 4, seed=3, drop_last=False, num_workers=2)
    got = take(workers, 4)  # two epochs: the corrupt image was met twice, in worker processes
    assert data.report.count("corrupt_image") == 1  # counted and named once, in this process
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"skipping {folder / '9.png'}: not a readable image")
    resumed = Batches(ImageTextFolder(folder, 12, seed=1), 4, seed=3, drop_last=False, num_workers=2)
    resumed.load_state_dict(workers.state_dict())
    assert same(got + take(resumed, 2), plain)


def test_corrupt_images_shrink_their_batch_and_empty_batches_are_skipped(folder):
    data = ImageTextFolder(folder, 8)
    batches = Batches(data, 4, shuffle=False)
    first, second = take(batches, 2)
    assert len(first) == 4 and len(second) == 3 and str(folder / "9.png") not in second.sources
    assert second.images.shape == (3, 3, 8, 8)
    broken = Batches(data, 1, shuffle=False)
    broken.load_state_dict({"epoch": 0, "position": 7})  # the next sample is the corrupt one
    (next_batch,) = take(broken, 1)
    assert next_batch.sources == [str(folder / "0.png")] and broken.state_dict()["epoch"] == 1


def test_bad_settings_and_states(caplog):
    data = ShapesDataset(5)
    with pytest.raises(TrainError, match="fewer than one batch of 8"):
        Batches(data, 8)
    assert Batches(data, 8, drop_last=False).batches_per_epoch == 1
    with pytest.raises(TrainError, match="at least 1"):
        Batches(data, 0)
    batches = Batches(data, 2, seed=1)
    with pytest.raises(TrainError, match="incomplete"):
        batches.load_state_dict({"epoch": 1})
    caplog.set_level(logging.WARNING)
    batches.load_state_dict({"epoch": 2, "position": 4, "samples": 9, "seed": 1})
    assert "the data changed since the checkpoint (samples 9 then, 5 now)" in caplog.text
    assert (batches.epoch, batches.position) == (3, 0)  # position 4 of 5 is past the last batch


def test_batch_moves_to_a_device():
    (batch,) = take(Batches(ShapesDataset(4), 2), 1)
    moved = batch.to("cpu")
    assert moved.images.shape == (2, 3, 32, 32) and moved.captions == batch.captions


def test_processes_read_disjoint_slices_of_the_batch_one_process_reads():
    """Rank r of w at batch b takes samples [r * b, (r + 1) * b) of each global batch: together
    the one process's batches of w * b, over epochs and after a resume at a global position."""
    data = ShapesDataset(20, seed=3)
    whole = Batches(data, 6, seed=4)  # 3 global batches of 6 per epoch
    parts = [Batches(data, 2, seed=4, rank=rank, world_size=3) for rank in range(3)]
    assert all(part.batches_per_epoch == whole.batches_per_epoch == 3 for part in parts)
    expected = take(whole, 5)
    taken = [take(part, 5) for part in parts]
    for step, batch in enumerate(expected):
        assert [s for part in taken for s in part[step].sources] == batch.sources
        assert torch.equal(torch.cat([part[step].images for part in taken]), batch.images)
    assert {part.state_dict()["position"] for part in parts} == {whole.position} == {12}
    assert {part.epoch for part in parts} == {whole.epoch} == {1}
    resumed = Batches(data, 2, seed=4, rank=1, world_size=3)
    resumed.load_state_dict(parts[1].state_dict())
    after = take(whole, 1)[0]
    assert take(resumed, 1)[0].sources == after.sources[2:4]


def test_a_rank_outside_the_world_and_partial_global_batches_are_refused():
    data = ShapesDataset(8, seed=3)
    with pytest.raises(ValueError, match="^rank 2 is not one of the 2 processes$"):
        Batches(data, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="^several processes need whole global batches: drop_last=True$"):
        Batches(data, 2, rank=0, world_size=2, drop_last=False)
    with pytest.raises(TrainError, match="fewer than one batch of 12"):
        Batches(data, 4, rank=0, world_size=3)
