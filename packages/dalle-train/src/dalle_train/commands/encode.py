"""``dalle-train encode``: run a VAE once over image-text pairs and keep their image codes as
pre-encoded shards (see `dalle_train.data.tokens`), for ``dalle-train dalle --tokens``.

    dalle-train encode --image-text-folder DIR --vae-path VAE --output TOKENS
    dalle-train encode --wds jpg,txt --image-text-folder SHARDS --vae openai --tokenizer bpe --output TOKENS

The images are read as training reads them, cropped once (``--random-resize-crop-lower-ratio``,
default 1: the centred largest square; a lower ratio draws one random crop per image from
``--seed``) and encoded in batches, without gradients, in fp32, on the GPU when there is one.
Every caption line is kept (and tokenised, when a tokenizer flag is given).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dalle_train import __version__
from dalle_train.choices import (
    TokenizerFlags,
    VaeFlags,
    add_tokenizer_flags,
    add_vae_flags,
    tokenizer_from_args,
    vae_from_args,
)
from dalle_train.commands.common import add_wds_flags, device_from_flag, documented_parser
from dalle_train.data.folder import ImageTextFolder
from dalle_train.data.report import SkipReport
from dalle_train.data.shard_sink import ShardSink, empty_output
from dalle_train.data.shards import shard_list
from dalle_train.data.stream import PixelDecoder, ShardStream, WdsKeys
from dalle_train.data.tokens import CAPTIONS, CODES, FORMAT, MANIFEST, TOKENS, codes_bytes, identity
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag

#: one pair to encode: (where it came from, image [C, S, S] in [0, 1], every caption line);
#: the sources yield None for a pair they skipped (so the progress bar counts it)
Pair = tuple[str, torch.Tensor, list[str]]


def register(subparsers: Any) -> None:
    """Add ``dalle-train encode``."""
    parser = documented_parser(subparsers, "encode", "encode images once with a VAE, for dalle --tokens",
                               __doc__)
    add_flag(parser, "--image-text-folder", required=True,
             help="a folder of images with .txt captions; with --wds, WebDataset shards")
    add_wds_flags(parser, "read shards (as dalle --wds)")
    add_flag(parser, "--output", type=Path, required=True, help="the folder of pre-encoded shards to write")
    add_vae_flags(parser)
    add_tokenizer_flags(parser, default_help="none: captions kept as text only")
    add_flag(parser, "--random-resize-crop-lower-ratio", type=float, default=1.0,
             help="smallest area fraction of the crop, drawn once per image; 1 is the centred square "
                  "(default 1)")
    add_flag(parser, "--transparent", action="store_true", help="RGBA images (a VAE of 4 channels)")
    add_flag(parser, "--seed", type=int, default=0, help="the crops' seed (default 0)")
    add_flag(parser, "--batch-size", type=int, default=64, help="images encoded at once (default 64)")
    add_flag(parser, "--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    add_flag(parser, "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda:N")
    parser.set_defaults(run=run)


def _folder_pairs(folder: Path, image_size: int, channels: int, ratio: float, seed: int,
                  report: SkipReport) -> tuple[int, Iterator[Pair | None]]:
    dataset = ImageTextFolder(folder, image_size, channels, ratio, seed=seed, report=report)

    def pairs() -> Iterator[Pair | None]:
        for index, pair in enumerate(dataset.pairs):
            sample = dataset.load(index, 0)
            yield None if sample is None else (sample.source, sample.image, list(pair.captions))

    return len(dataset), pairs()


def _shard_pairs(source: str, keys: WdsKeys, image_size: int, channels: int, ratio: float, seed: int,
                 report: SkipReport) -> tuple[int | None, Iterator[Pair | None]]:
    shards = shard_list(source)
    decoder = PixelDecoder(keys, image_size, channels, ratio, seed, report)
    stream = ShardStream(shards, decoder)

    def pairs() -> Iterator[Pair | None]:
        for raw, sample in stream.in_order():
            lines = decoder.lines(raw) if sample is not None else None
            yield (sample.source, sample.image, lines) if sample is not None and lines else None

    return shards.samples, pairs()


def _batches(pairs: Iterator[Pair | None], size: int, bar: tqdm) -> Iterator[list[Pair]]:
    """Lists of ``size`` pairs (the last one shorter); a skipped pair only moves ``bar``."""
    batch: list[Pair] = []
    for pair in pairs:
        if pair is None:
            bar.update(1)
            continue
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(args: argparse.Namespace) -> int:
    """Encode; returns the exit code."""
    if args.batch_size < 1:
        raise TrainError(f"--batch-size must be at least 1, not {args.batch_size}")
    device = device_from_flag(args.device)
    vae = vae_from_args(VaeFlags.from_args(args))
    if vae is None:
        raise TrainError("dalle-train encode needs a VAE: --vae-path DIR (a trained one) or --vae NAME")
    tokenizer = tokenizer_from_args(TokenizerFlags.from_args(args), default=None)
    channels = 4 if args.transparent else 3
    if getattr(vae, "channels", 3) != channels:
        raise TrainError(f"the VAE takes {vae.channels} channels; --transparent reads 4 and its absence 3")
    report = SkipReport()
    crop = (vae.image_size, channels, args.random_resize_crop_lower_ratio, args.seed, report)
    if args.wds:
        total, pairs = _shard_pairs(args.image_text_folder, WdsKeys.parse(args.wds, args.wds_caption_field),
                                    *crop)
    else:
        total, pairs = _folder_pairs(Path(args.image_text_folder), *crop)
    sink = ShardSink(args.output, args.samples_per_shard)  # checks the size before a folder is made
    empty_output(args.output)
    vae = vae.to(device).eval()
    codes_per_image, written = None, 0
    with torch.no_grad(), sink, tqdm(total=total, desc="encode", unit="image", dynamic_ncols=True) as bar:
        for batch in _batches(pairs, args.batch_size, bar):
            images = torch.stack([image for _, image, _ in batch]).to(device, torch.float32)  # [B, C, S, S]
            codes = vae.get_codebook_indices(images).cpu()  # [B, m]
            codes_per_image = codes.shape[1]
            for (source, _, lines), row in zip(batch, codes):
                sample = {"__key__": f"{written:09d}", CODES: codes_bytes(row),
                          CAPTIONS: ("\n".join(lines) + "\n").encode(),
                          "json": json.dumps({"source": source}).encode()}
                if tokenizer is not None:
                    sample[TOKENS] = json.dumps([tokenizer.encode(line) for line in lines]).encode()
                sink.write(sample)
                written += 1
            bar.update(len(batch))
    if not written:
        raise TrainError(f"{args.image_text_folder} gave no usable image-text pair ({report.summary()})")
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dalle_train_version": __version__, "source": args.image_text_folder, "wds": args.wds,
        "vae": identity(vae), "tokenizer": identity(tokenizer), "image_size": vae.image_size,
        "channels": channels, "image_seq_len": codes_per_image, "num_tokens": vae.num_tokens,
        "crop": {"resize_ratio": args.random_resize_crop_lower_ratio, "seed": args.seed},
        "shards": [{"name": f"{n:05d}.tar", "samples": count} for n, count in enumerate(sink.counts)],
        "samples": written, "skipped": report.as_dict(),
    }
    (args.output / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    skipped = f"; {report.summary()}" if report.count() else ""
    print(f"encoded {written} images into {len(sink.counts)} shards of {codes_per_image} codes in "
          f"{args.output}{skipped}")
    print(f"train from them with: dalle-train dalle --tokens {args.output} --vae-path ... (the same VAE)")
    return 0
