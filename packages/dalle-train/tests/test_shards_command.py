"""``dalle-train shards``: a folder to WebDataset shards and back, on the shared emoji dataset
and on a folder with broken pairs; the same samples come out of a folder and of its shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from shard_writer import img2dataset_shards, jpeg

from dalle_train.cli import main
from dalle_train.data.folder import ImageTextFolder
from dalle_train.data.report import SkipReport
from dalle_train.data.scan import scan_pairs
from dalle_train.data.shard_sink import ShardSink
from dalle_train.data.shards import shard_list
from dalle_train.data.stream import PixelDecoder, ShardStream, WdsKeys

#: ../shared/datasets/emoji-twemoji beside the repository (searched upwards: mutmut runs a copy)
SHARED_EMOJI = Path("shared", "datasets", "emoji-twemoji")
EMOJI = next((folder / SHARED_EMOJI for folder in Path(__file__).resolve().parents
              if (folder / SHARED_EMOJI).is_dir()), Path("emoji-twemoji-not-found"))


def folder_pairs(root: Path) -> dict[str, tuple[bytes, tuple[str, ...]]]:
    """Relative image path (without ending) -> (image bytes, caption lines) of every usable pair."""
    pairs, _ = scan_pairs(root, SkipReport())
    return {pair.image.relative_to(root).with_suffix("").as_posix(): (pair.image.read_bytes(), pair.captions)
            for pair in pairs}


@pytest.mark.skipif(not EMOJI.is_dir(), reason="../shared/datasets/emoji-twemoji is not beside the repo")
def test_the_emoji_folder_round_trips_through_shards(tmp_path, capsys):
    shards, back = tmp_path / "shards", tmp_path / "back"
    assert main(["shards", "--image-text-folder", str(EMOJI), "--output", str(shards),
                 "--samples-per-shard", "500"]) == 0
    original = folder_pairs(EMOJI)
    printed = capsys.readouterr().out
    assert f"wrote {len(original)} pairs in {-(-len(original) // 500)} shards to {shards}" in printed
    assert f"--wds png,txt --image-text-folder {shards}" in printed
    listed = shard_list(str(shards))
    assert listed.samples == len(original) and not list(shards.glob("*.partial"))
    args = ["shards", "--wds", "png,txt", "--image-text-folder", str(shards), "--output", str(back)]
    assert main(args) == 0
    assert folder_pairs(back) == original


def test_a_folder_and_its_shards_give_the_same_samples(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for number in range(7):
        (folder / f"p{number}.jpg").write_bytes(jpeg((number * 30, 100, 200 - number * 20)))
        (folder / f"p{number}.txt").write_text(f"picture {number}\n")
    (folder / "alone.txt").write_text("no image")  # skipped, as training skips it
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.txt").write_text("broken")
    assert main(["shards", "--image-text-folder", str(folder), "--output", str(tmp_path / "s"),
                 "--samples-per-shard", "3"]) == 0
    with tarfile.open(tmp_path / "s" / "00000.tar") as archive:
        assert sorted(archive.getnames())[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert json.loads((tmp_path / "s" / "00002_stats.json").read_text())["successes"] == 2
    # a centred full crop (ratio 1) and one caption line: nothing random differs
    from_folder = ImageTextFolder(folder, image_size=16, resize_ratio=1.0)
    decode = PixelDecoder(WdsKeys.parse("jpg,txt"), image_size=16, resize_ratio=1.0)
    stream = ShardStream(shard_list(str(tmp_path / "s")), decode)
    folder_samples = [from_folder.load(index, 0) for index in range(len(from_folder))]
    shard_samples = stream.first_samples(100)
    assert [s.caption for s in shard_samples] == [s.caption for s in folder_samples if s is not None]
    for a, b in zip([s for s in folder_samples if s is not None], shard_samples):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert stream.report.count("corrupt_image") == 1


def test_img2dataset_shards_become_a_folder_by_shard_and_key(tmp_path, capsys):
    img2dataset_shards(tmp_path / "shards", shards=2, per_shard=5)
    assert main(["shards", "--wds", "jpg,json", "--image-text-folder", str(tmp_path / "shards"),
                 "--output", str(tmp_path / "out")]) == 0
    assert "wrote 8 image-text pairs" in capsys.readouterr().out
    assert (tmp_path / "out" / "00001" / "000000008.txt").read_text() == "colour 8 square\n"
    assert (tmp_path / "out" / "00000" / "000000000.jpg").is_file()


def test_bad_conversions_are_refused(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "a.jpg").write_bytes(jpeg((1, 2, 3)))
    (pairs / "a.txt").write_text("a")
    cases = [
        (["--image-text-folder", str(tmp_path / "none"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--image-text-folder", str(pairs), "--output", str(tmp_path / "full")], "is not an empty folder"),
        (["--image-text-folder", str(pairs), "--output", str(tmp_path / "o"), "--samples-per-shard", "0"],
         "--samples-per-shard must be at least 1"),
        (["--image-text-folder", str(tmp_path / "full"), "--output", str(tmp_path / "o2")],
         "holds no usable image-text pair"),
    ]
    for flags, message in cases:
        assert main(["shards", *flags]) == 2
        assert message in capsys.readouterr().err


def test_an_interrupted_conversion_leaves_only_whole_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt), ShardSink(tmp_path, per_shard=2) as sink:
        for number in range(3):
            sink.write({"__key__": f"{number:09d}", "txt": b"x"})
        raise KeyboardInterrupt
    assert sorted(path.name for path in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json"]
    assert sink.counts == [2]
    with ShardSink(tmp_path / "whole", per_shard=2) as sink:
        (tmp_path / "whole").mkdir()
        for number in range(3):
            sink.write({"__key__": f"{number:09d}", "txt": b"x"})
    assert sink.counts == [2, 1] and shard_list(str(tmp_path / "whole")).sizes == (2, 1)


def test_a_broken_shard_is_reported_and_the_others_converted(tmp_path, capsys):
    img2dataset_shards(tmp_path / "shards", shards=2, per_shard=5)
    whole = (tmp_path / "shards" / "00001.tar").read_bytes()
    (tmp_path / "shards" / "00001.tar").write_bytes(whole[:1500])  # cut inside its first sample
    assert main(["shards", "--wds", "jpg,txt", "--image-text-folder", str(tmp_path / "shards"),
                 "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 image-text pairs" in printed and "1 shard not read to its end" in printed  # 00000's four
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000"]
