"""WebDataset shards (``--wds``): where they are, how they are read, split, ordered and resumed."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import logging
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from shard_writer import img2dataset_shards, jpeg, write_shard

from dalle_train.data.shards import count_samples, is_local, resolve, shard_list
from dalle_train.data.stream import (
    MAX_CONSECUTIVE_FAILURES,
    PixelDecoder,
    ShardStream,
    StreamBatches,
    WdsKeys,
)
from dalle_train.errors import TrainError

SHARDS, PER_SHARD = 4, 10  # 8 samples a shard: every 5th key failed to download


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("wds") / "shards"
    return folder, img2dataset_shards(folder, SHARDS, PER_SHARD)


def stream(source: str, spec: str = "jpg,txt", seed: int = 0, caption_field: str = "caption",
           image_size: int = 16, **options) -> ShardStream:
    decode = PixelDecoder(WdsKeys.parse(spec, caption_field), image_size=image_size, seed=seed)
    return ShardStream(shard_list(source), decode, seed=seed, **options)


def batches_of(source: str, batch: int = 4, rank: int = 0, world: int = 1, workers: int = 0,
               **options) -> StreamBatches:
    return StreamBatches(stream(source, **options).split(batch, rank, world), num_workers=workers)


def captions(batches: StreamBatches, count: int) -> list[str]:
    return [c for batch in itertools.islice(iter(batches), count) for c in batch.captions]


def test_the_wds_flag_names_an_image_and_a_caption_key():
    assert WdsKeys.parse("jpg,txt") == WdsKeys(("jpg",), "txt")
    assert WdsKeys.parse(" JPG;png , json", "text") == WdsKeys(("jpg", "png"), "json", "text")
    for bad in ("jpg", "jpg,txt,json", ",txt", "jpg,"):
        with pytest.raises(TrainError, match="--wds .* must be IMAGE_KEY,CAPTION_KEY"):
            WdsKeys.parse(bad)


def test_sources_resolve_to_shards(shards, tmp_path, monkeypatch):
    folder, _ = shards
    names = [str(folder / f"{n:05d}.tar") for n in range(SHARDS)]
    assert resolve(str(folder)) == names
    assert resolve(names[0]) == names[:1]
    assert resolve(f"{folder}/{{00000..00003}}.tar") == names
    assert resolve(f"{names[0]}::{names[1]}") == names[:2]
    assert resolve("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]
    with pytest.raises(TrainError, match=r"2 of 6 shards do not exist \(.*00004.tar, .*00005.tar\)"):
        resolve(f"{folder}/{{00000..00005}}.tar")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(TrainError, match=r"holds no shard .* found only \.md files"):
        resolve(str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(TrainError, match="read through curl, which is not installed"):
        resolve("http://127.0.0.1:1/{0..3}.tar")


def test_source_errors_say_what_was_found(tmp_path):
    with pytest.raises(TrainError, match=r"^--image-text-folder is empty: give a shard, a folder of shards"):
        resolve("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainError, match=r"holds no shard \(\.tar, \.tar\.gz, \.tgz\): found nothing\."):
        resolve(str(empty))
    for name in ("a.md", "b.json", "c.jpg"):
        (tmp_path / name).write_text("x")
    with pytest.raises(TrainError, match=r"found only \.jpg, \.json, \.md files\."):
        resolve(str(tmp_path))
    names = ", ".join(f"/no/{n}.tar" for n in range(5))
    with pytest.raises(TrainError) as seven:
        resolve("/no/{0..6}.tar")
    assert str(seven.value).endswith(f": 7 of 7 shards do not exist ({names} and 2 more)")
    with pytest.raises(TrainError) as five:
        resolve("/no/{0..4}.tar")
    assert str(five.value).endswith(f": 5 of 5 shards do not exist ({names})")
    assert shard_list("pipe:cat a.tar").source == "pipe:cat a.tar"


def test_sample_counts_come_from_img2dataset_stats_or_the_members(shards, tmp_path):
    folder, written = shards
    listed = shard_list(str(folder))
    assert listed.sizes == (8,) * SHARDS and listed.samples == len(written)
    bare = tmp_path / "bare.tar"
    write_shard(bare, [(f"k{n}", {"jpg": b"x", "txt": b"y"}) for n in range(3)], stats=False)
    assert count_samples(str(bare)) == 3
    assert count_samples("http://host/a.tar") is None and count_samples("pipe:cat a.tar") is None
    assert count_samples("s3://bucket/a.tar") is None and not is_local("s3://bucket/a.tar")
    assert is_local("/data/a.tar") and is_local("shards/{0..3}.tar") and not is_local("pipe:cat a.tar")
    gz = tmp_path / "00007.tar.gz"
    with tarfile.open(gz, "w:gz") as archive:
        for name in ("k1.jpg", "k1.txt", "k2.jpg"):
            info = tarfile.TarInfo(name)
            archive.addfile(info, io.BytesIO(b""))
    assert count_samples(str(gz)) == 2  # counted from the members
    (tmp_path / "00007_stats.json").write_text(json.dumps({"successes": 40}))
    assert count_samples(str(gz)) == 40  # img2dataset's count, beside NAME.tar.gz
    (tmp_path / "00007_stats.json").write_text(json.dumps({"count": 40}))
    assert count_samples(str(gz)) == 2  # not img2dataset's: the members again


def test_one_epoch_reads_every_sample_once_in_a_seeded_order(shards):
    folder, written = shards
    one_epoch = len(written) // 4
    first = captions(batches_of(str(folder)), one_epoch)
    assert sorted(first) == sorted(written)
    assert first == captions(batches_of(str(folder)), one_epoch)
    assert first != captions(batches_of(str(folder), seed=1), one_epoch)
    batches = batches_of(str(folder))
    assert batches.batches_per_epoch == one_epoch
    epochs = captions(batches, 2 * one_epoch)
    assert sorted(epochs[len(written):]) == sorted(written) and epochs[len(written):] != first


def test_captions_from_json_fields_and_lines_drawn_per_sample(tmp_path):
    shard = tmp_path / "a.tar"
    lines = "a red ball\n\n  a round red thing  \n"
    meta = {"caption": "from json", "text": ["one", "two"]}
    files = {"png": jpeg((200, 0, 0)), "txt": lines.encode(), "json": json.dumps(meta).encode()}
    write_shard(shard, [("0", files)])
    drawn = {caption for seed in range(12)
             for caption in captions(batches_of(str(shard), 1, spec="png,txt", seed=seed), 1)}
    assert drawn == {"a red ball", "a round red thing"}
    assert captions(batches_of(str(shard), batch=1, spec="png,json"), 1) == ["from json"]
    drawn = {c for seed in range(12)
             for c in [s.caption for s in stream(str(shard), "png,json", seed).first_samples(1)]}
    assert drawn == {"from json"}
    texts = stream(str(shard), "png,json", caption_field="text", image_size=8)
    assert {texts.first_samples(1)[0].caption} <= {"one", "two"}
    first = texts.first_samples(1)[0]
    assert first.image.shape == (3, 8, 8) and first.source == f"0 in {shard}"


def test_bad_samples_are_skipped_reported_and_replaced(tmp_path, caplog):
    shard = tmp_path / "broken.tar"
    good = {"jpg": jpeg((10, 200, 10)), "txt": b"green"}
    write_shard(shard, [
        ("0", good), ("1", {"jpg": b"not a jpeg", "txt": b"broken"}), ("2", {"txt": b"no image"}),
        ("3", {"jpg": jpeg((1, 2, 3))}), ("4", {"jpg": jpeg((1, 2, 3)), "txt": b"  \n"}),
        ("5", {"jpg": jpeg((1, 2, 3)), "txt": b"\xff\xfe"}), ("6", {"jpg": b"", "txt": b"zero bytes"}),
        ("7", good), ("8", good),
    ])
    data = stream(str(shard))
    batches = StreamBatches(data.split(3, 0, 1))
    with caplog.at_level(logging.WARNING, logger="dalle_train.data"):
        batch = next(iter(batches))
    assert len(batch) == 3 and batch.captions == ["green"] * 3
    report = batches.stream.report
    assert report is data.report  # the split copy reports to the dataset's report
    assert {k: v for k, v in report.as_dict().items() if v} == {
        "corrupt_image": 2, "missing_image": 1, "missing_caption": 1, "empty_caption": 1,
        "unreadable_caption": 1, "total": 6}
    assert f"skipping 1 in {shard}: not a readable image" in caplog.text


def test_bad_json_captions_are_skipped(tmp_path):
    shard = tmp_path / "json.tar"
    write_shard(shard, [("0", {"jpg": jpeg((9, 9, 9)), "json": b"{not json"}),
                        ("1", {"jpg": jpeg((9, 9, 9)), "json": b'{"url": "no caption"}'}),
                        ("2", {"jpg": jpeg((9, 9, 9)), "json": b'{"caption": "fine"}'})])
    data = stream(str(shard), "jpg,json")
    assert [s.caption for s in data.first_samples(5)] == ["fine"]
    assert (data.report.count("unreadable_caption"), data.report.count("missing_caption")) == (1, 1)


def test_a_source_with_nothing_usable_stops_with_an_error(tmp_path):
    bad = tmp_path / "bad.tar"
    write_shard(bad, [(str(n), {"jpg": b"broken", "txt": b"x"}) for n in range(MAX_CONSECUTIVE_FAILURES + 1)])
    with pytest.raises(TrainError, match=f"the last {MAX_CONSECUTIVE_FAILURES} samples .* could not be used"):
        next(iter(batches_of(str(bad))))
    few = tmp_path / "few.tar"
    write_shard(few, [(str(n), {"jpg": b"broken", "txt": b"x"}) for n in range(3)])
    with pytest.raises(TrainError, match="found no usable sample in its shards of epoch 0"):
        next(iter(batches_of(str(few))))
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "few.tar").read_bytes()[:700])
    data = stream(str(cut))
    with pytest.raises(TrainError, match="no usable sample"):
        next(iter(StreamBatches(data.split(1, 0, 1))))


def test_ranks_and_workers_read_disjoint_shards_that_cover_the_epoch(shards):
    folder, written = shards
    seen = []
    for rank in range(2):  # 2 processes x 2 DataLoader workers: 4 readers, one shard each
        batches = batches_of(str(folder), batch=2, rank=rank, world=2, workers=2)
        seen += captions(batches, 8)  # 8 batches of 2 from 2 readers: 2 shards of 8
    assert sorted(seen) == sorted(written)
    with pytest.raises(TrainError, match=r"4 shards cannot feed 6 readers \(3 processes x 2 data workers"):
        batches_of(str(folder), world=3, workers=2)
    resampled = batches_of(str(folder), batch=2, world=3, workers=2, resample=True)
    assert resampled.batches_per_epoch is None and len(captions(resampled, 6)) == 12


def test_resuming_continues_at_the_saved_shard_and_sample(shards, caplog):
    folder, written = shards
    whole = captions(batches_of(str(folder), batch=3, workers=2), 14)
    first = batches_of(str(folder), batch=3, workers=2)
    before = captions(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
    again = batches_of(str(folder), batch=3, workers=2)
    again.load_state_dict(state)
    assert before + captions(again, 9) == whole
    other = batches_of(str(folder), batch=3, workers=1)  # other readers: the epoch starts again
    with caplog.at_level(logging.WARNING, logger="dalle_train.data"):
        other.load_state_dict(state)
    assert "saved for other readers" in caplog.text and other.epoch == 0
    assert captions(other, 1) == captions(batches_of(str(folder), batch=3, workers=1), 1)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(shards) -> Iterator[str]:
    folder, _ = shards
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_shards_over_http_with_a_brace_expanded_url(shards, served):
    folder, written = shards
    source = f"{served}/{{00000..00003}}.tar"
    remote = batches_of(source, batch=4)
    assert remote.batches_per_epoch is None  # no sizes without reading
    assert captions(remote, 8) == captions(batches_of(str(folder), batch=4), 8)


def test_an_unreachable_shard_is_reported_and_the_others_read(shards, served):
    _, written = shards
    data = stream(f"{served}/{{00000..00004}}.tar")  # 00004.tar is not served
    samples = data.first_samples(100)
    assert sorted(s.caption for s in samples) == sorted(written)
    assert data.report.count("unreadable_shard") == 1
    assert data.report.sources("unreadable_shard") == [f"{served}/00004.tar"]


def test_images_are_cropped_to_the_model_size_in_0_1(shards):
    folder, _ = shards
    batch = next(iter(batches_of(str(folder))))
    assert batch.images.shape == (4, 3, 16, 16) and batch.images.dtype == torch.float32
    assert 0 <= batch.images.min() and batch.images.max() <= 1
