"""``dalle-train shards``: move image-text pairs between a folder and WebDataset shards.

    dalle-train shards --image-text-folder DIR --output SHARDS [--samples-per-shard N]
    dalle-train shards --wds png;jpg,txt --image-text-folder SHARDS --output DIR

Folder to shards: every usable pair of the folder (as training reads it), in its order, as
sample ``KEY`` (``000000000``, ``000000001``...) holding the image file's bytes unchanged
(``KEY.png``, ``KEY.jpg``...), ``KEY.txt`` with every caption line, and ``KEY.json`` with the
pair's path in the folder; shards ``00000.tar``, ``00001.tar``... with an img2dataset-style
``00000_stats.json`` beside each (so the sizes are known to ``--epochs``). Each shard is
written under a temporary name and renamed when complete.

Shards to folder (``--wds IMAGE_KEY,CAPTION_KEY``, as for training): each sample becomes an
image and a ``.txt`` of its caption lines, at the path its ``KEY.json`` recorded when this
command wrote it, else at ``<shard name>/<key>``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from dalle_train.commands.common import add_wds_flags, documented_parser
from dalle_train.data.report import SkipReport
from dalle_train.data.scan import CAPTION_EXTENSION, Pair, check_folder, scan_pairs
from dalle_train.data.shard_sink import ShardSink, empty_output
from dalle_train.data.shards import shard_list
from dalle_train.data.stream import PixelDecoder, ShardStream, WdsKeys, source_of
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag


def register(subparsers: Any) -> None:
    """Add ``dalle-train shards``."""
    parser = documented_parser(subparsers, "shards",
                               "convert an image-text folder to WebDataset shards or back", __doc__)
    add_flag(parser, "--image-text-folder", required=True,
             help="the folder to convert; with --wds, the shards (as dalle-train dalle --wds reads them)")
    add_flag(parser, "--output", type=Path, required=True, help="where the shards (or the folder) go")
    add_wds_flags(parser, "convert shards to a folder, reading these files of each sample")
    add_flag(parser, "--samples-per-shard", type=int, default=1000,
             help="pairs per shard when writing shards (default 1000)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert; returns the exit code."""
    if args.wds:
        return shards_to_folder(args.image_text_folder, WdsKeys.parse(args.wds, args.wds_caption_field),
                                args.output)
    return folder_to_shards(Path(args.image_text_folder), args.output, args.samples_per_shard)


def _sample(pair: Pair, number: int, root: Path) -> dict[str, Any]:
    """The shard sample ``number`` of a folder's ``pair``: the image's bytes as they are, every
    caption line, and the pair's path in the folder."""
    caption = "\n".join(pair.captions) + "\n"
    source = json.dumps({"source": pair.image.relative_to(root).as_posix()})
    return {"__key__": f"{number:09d}", pair.image.suffix.lower().lstrip("."): pair.image.read_bytes(),
            "txt": caption.encode(), "json": source.encode()}


def folder_to_shards(folder: Path, output: Path, per_shard: int) -> int:
    """Every usable pair of ``folder`` into shards of ``per_shard`` under ``output``."""
    sink = ShardSink(output, per_shard)  # checks per_shard before anything is written
    root = check_folder(folder, "images with .txt captions")
    report = SkipReport()
    pairs, _ = scan_pairs(root, report)
    if not pairs:
        raise TrainError(f"{root} holds no usable image-text pair ({report.summary()})")
    empty_output(output)
    endings: Counter[str] = Counter(pair.image.suffix.lower().lstrip(".") for pair in pairs)
    with sink, tqdm(total=len(pairs), desc="shards", unit="pair", dynamic_ncols=True) as bar:
        for number, pair in enumerate(pairs):
            sink.write(_sample(pair, number, root))
            bar.update(1)
    skipped = f"; {report.summary()}" if report.count() else ""
    print(f"wrote {len(pairs)} pairs in {len(sink.counts)} shards to {output}{skipped}")
    print(f"train from them with: --wds {';'.join(sorted(endings))},txt --image-text-folder {output}")
    return 0


def _relative(path: str) -> PurePosixPath | None:
    """``path`` when it is a plain relative path (no ``..``, not absolute), else None."""
    candidate = PurePosixPath(path)
    if candidate.is_absolute() or ".." in candidate.parts or not candidate.parts:
        return None
    return candidate


def _destination(raw: dict[str, Any], shard_name: str) -> PurePosixPath:
    """Where a sample goes, without its ending: the path this command recorded, else
    ``<shard>/<key>``."""
    try:
        recorded = json.loads(raw["json"]).get("source") if "json" in raw else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        recorded = None
    place = _relative(recorded) if isinstance(recorded, str) else None
    if place is not None:
        return place.with_suffix("")
    return PurePosixPath(shard_name) / (_relative(raw["__key__"]) or PurePosixPath("sample"))


def shards_to_folder(source: str, keys: WdsKeys, output: Path) -> int:
    """Every usable sample of the shards of ``source`` as an image and a caption file (their
    bytes as they are: the image is not decoded)."""
    shards = shard_list(source)
    empty_output(output)
    decoder = PixelDecoder(keys, image_size=1)  # only its checks of the sample's files
    report, written = decoder.report, 0
    with tqdm(total=shards.samples, desc="folder", unit="sample", dynamic_ncols=True) as bar:
        for _, _, raw in ShardStream(shards, decoder).raw_samples():
            bar.update(1)
            ending = decoder.image_ending(raw)
            lines = decoder.lines(raw) if ending is not None else None
            if ending is None or lines is None:
                continue
            place = output / _destination(raw, Path(raw["__url__"]).name.split(".")[0])
            image = place.with_name(f"{place.name}.{ending}")
            if image.exists():
                report.add("duplicate_key", source_of(raw), f"{image} was written by an earlier sample")
                continue
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(raw[ending])
            place.with_name(place.name + CAPTION_EXTENSION).write_text("\n".join(lines) + "\n")
            written += 1
    skipped = f"; {report.summary()}" if report.count() else ""
    print(f"wrote {written} image-text pairs to {output}{skipped}")
    return 0 if written else 1
