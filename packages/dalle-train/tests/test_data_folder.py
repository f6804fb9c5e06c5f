"""Image-text and image folders: pairing, nesting, broken files skipped and reported, errors
before training, randomness as a pure function of (seed, epoch, index), and the real emoji set."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle_train.data import ImageFolder, ImageTextFolder, SkipReport
from dalle_train.errors import TrainError
from dalle_train.imageio import to_pil

EMOJI = Path(__file__).parents[3] / ".." / "shared" / "datasets" / "emoji-twemoji"


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (24, 16), fmt: str = "PNG", seed: int = 0
                ) -> bytes:
    """A random picture in ``mode``, encoded as ``fmt``."""
    picture = to_pil(torch.rand(3, size[1], size[0], generator=torch.Generator().manual_seed(seed)))
    if mode == "RGBA":
        picture.putalpha(Image.new("L", size, 128))
    elif mode != "RGB":
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


def put(root: Path, name: str, data: bytes | str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture
def messy(tmp_path) -> Path:
    """A folder with good pairs in several formats and depths, and one of each kind of breakage."""
    root = tmp_path / "data"
    put(root, "a.png", image_bytes(seed=1))
    put(root, "a.txt", "\n  first caption  \n\nsecond caption\n")
    put(root, "sub/deep/b.JPG", image_bytes(fmt="JPEG", seed=2))
    put(root, "sub/deep/b.txt", "a nested picture")
    put(root, "sub/g.bmp", image_bytes("L", fmt="BMP"))
    put(root, "sub/g.txt", "grayscale")
    put(root, "sub/p.webp", image_bytes("P", fmt="WEBP"))
    put(root, "sub/p.txt", "\ufeffpalette")  # byte-order mark dropped
    put(root, "t.png", image_bytes("RGBA"))
    put(root, "t.txt", "see-through")
    put(root, "c.png", image_bytes())  # image without caption
    put(root, "d.txt", "caption without image")
    put(root, "e.png", image_bytes())
    put(root, "e.txt", " \n\t\n")  # empty caption
    put(root, "u.png", image_bytes())
    put(root, "u.txt", b"caf\xe9 latin-1")  # not UTF-8
    put(root, "f.png", image_bytes(size=(64, 64))[:200])  # truncated PNG
    put(root, "x.jpg", b"<html>not an image</html>")  # not an image at all
    put(root, "x.txt", "never loads")
    put(root, "f.txt", "never loads either")
    put(root, ".hidden.png", image_bytes())  # hidden: ignored
    put(root, "notes.md", "ignored")
    return root


def test_pairs_found_in_order_and_bad_ones_reported(messy, caplog):
    caplog.set_level(logging.WARNING)
    data = ImageTextFolder(messy, 16)
    names = [pair.image.relative_to(messy).as_posix() for pair in data.pairs]
    assert names == ["a.png", "f.png", "t.png", "x.jpg", "sub/g.bmp", "sub/p.webp", "sub/deep/b.JPG"]
    assert data.pairs[0].captions == ("first caption", "second caption")
    assert data.pairs[5].captions == ("palette",)
    counts = data.report.as_dict()
    for kind in ("missing_caption", "missing_image", "empty_caption", "unreadable_caption"):
        assert counts[kind] == 1, kind
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for name, why in [("c.png", "no caption file c.txt"), ("d.txt", "no image d.png"),
                      ("e.txt", "no caption in it"), ("u.txt", "not UTF-8")]:
        assert f"{messy / name}: {why}" in warned


def test_corrupt_images_become_none_once_reported(messy, caplog):
    caplog.set_level(logging.WARNING)
    data = ImageTextFolder(messy, 16)
    caplog.clear()
    for epoch in range(2):
        data.set_epoch(epoch)
        samples = [data[i] for i in range(len(data))]
        assert [s is None for s in samples] == [False, True, False, True, False, False, False]
    assert data.report.count("corrupt_image") == 2
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == [
        f"skipping {messy / 'f.png'}", f"skipping {messy / 'x.jpg'}",
    ]
    assert data.report.summary() == (
        "skipped 6 samples: 2 corrupt images, 1 without a caption, 1 caption without an image, "
        "1 empty caption, 1 unreadable caption"
    )


@pytest.mark.parametrize("channels", [3, 4])
def test_samples_have_the_asked_size_channels_and_source(messy, channels):
    data = ImageTextFolder(messy, 16, channels=channels)
    for index in (0, 2, 4, 5, 6):
        sample = data[index]
        assert sample.image.shape == (channels, 16, 16) and sample.image.dtype == torch.float32
        assert 0 <= float(sample.image.min()) and float(sample.image.max()) <= 1
        assert sample.source == str(data.pairs[index].image) and sample.caption in data.pairs[index].captions
    if channels == 4:  # t.png is half transparent everywhere
        assert torch.allclose(data[2].image[3], torch.full((16, 16), 128 / 255), atol=1 / 255)


def test_random_choices_are_a_function_of_seed_epoch_and_index(messy):
    one, two = (ImageTextFolder(messy, 8, resize_ratio=0.5, seed=3) for _ in range(2))
    for epoch in (0, 5):
        a, b = one.load(0, epoch), two.load(0, epoch)
        assert torch.equal(a.image, b.image) and a.caption == b.caption
    two.set_epoch(5)
    assert torch.equal(two[0].image, one.load(0, 5).image)
    captions = {one.load(0, epoch).caption for epoch in range(20)}
    assert captions == {"first caption", "second caption"}
    crops = {one.load(0, epoch).image.sum().item() for epoch in range(6)}
    assert len(crops) > 1  # the crop changes with the epoch
    other = ImageTextFolder(messy, 8, resize_ratio=0.5, seed=4)
    assert any(not torch.equal(other.load(0, e).image, one.load(0, e).image) for e in range(3))


def test_shared_report_and_image_folder(messy):
    report = SkipReport()
    data = ImageFolder(messy, 8, report=report)
    names = [p.relative_to(messy).as_posix() for p in data.images]
    assert names == ["a.png", "c.png", "e.png", "f.png", "t.png", "u.png", "x.jpg",
                     "sub/g.bmp", "sub/p.webp", "sub/deep/b.JPG"]
    assert data[0].caption == "" and data[0].image.shape == (3, 8, 8)
    assert data[3] is None and report.count("corrupt_image") == 1 and data.report is report


def test_missing_folder_file_and_folder_without_pairs(tmp_path):
    with pytest.raises(TrainError, match=r"nowhere does not exist: give a folder of images"):
        ImageTextFolder(tmp_path / "nowhere", 16)
    put(tmp_path, "file.png", image_bytes())
    with pytest.raises(TrainError, match="is a file, not a folder"):
        ImageFolder(tmp_path / "file.png", 16)
    broken = tmp_path / "broken"
    put(broken, "a.png", image_bytes())
    put(broken, "b.txt", "orphan")
    put(broken, "c.png", image_bytes())
    put(broken, "c.txt", "\n")
    put(broken, "d.gif", b"GIF89a")
    with pytest.raises(TrainError) as caught:
        ImageTextFolder(broken, 16)
    message = str(caught.value)
    assert str(broken) in message and "\n" not in message
    assert "found 2 images, 2 .txt files and 1 other file (.gif: 1)" in message
    assert "1 without a caption, 1 caption without an image, 1 empty caption" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainError, match=r"holds no image: found 0 images, 0 .txt files"):
        ImageFolder(empty, 16)


def test_bad_settings_are_refused(messy):
    with pytest.raises(TrainError, match="--random-resize-crop-lower-ratio"):
        ImageTextFolder(messy, 16, resize_ratio=0)
    with pytest.raises(TrainError, match="channels must be 3"):
        ImageFolder(messy, 16, channels=2)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinked_folders_are_followed_once(tmp_path):
    root = tmp_path / "root"
    put(root, "a/x.png", image_bytes())
    put(root, "a/x.txt", "x")
    os.symlink(root, root / "a" / "loop")  # a cycle back to the top
    os.symlink(root / "a", root / "b")  # a second way into a/
    assert [p.image.name for p in ImageTextFolder(root, 8).pairs] == ["x.png"]


@pytest.mark.skipif(not EMOJI.is_dir(), reason=f"{EMOJI} is not there")
def test_reads_the_real_emoji_dataset():
    data = ImageTextFolder(EMOJI, 32, seed=0)
    assert len(data) == 1911 and data.report.count() == 0
    fire = next(p for p in data.pairs if p.image.name == "fire.png")
    assert fire.captions == ("fire", "an emoji of fire", "a sky & weather emoji: fire")
    transparent = ImageTextFolder(EMOJI, 32, channels=4)
    for index in (0, 700, 1910):
        sample, rgba = data[index], transparent[index]
        assert sample.image.shape == (3, 32, 32) and rgba.image.shape == (4, 32, 32)
        assert sample.caption in data.pairs[index].captions and sample.source.endswith(".png")
        assert float(rgba.image[3].min()) == 0 and float(sample.image.min()) < 0.5  # corners clear
