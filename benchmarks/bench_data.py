"""Data loading speed on this machine: samples/s of the folder, WebDataset-tar and pre-encoded
paths at 64 and 256 px, beside the rate at which config A's training step consumes samples,
and config A trained from pixels against from pre-encoded shards, measured in one run.

    python benchmarks/bench_data.py               # writes benchmarks/data.md and data.json
    python benchmarks/bench_data.py --repeats 1 --no-write

The data: 512 pictures of the built-in shapes drawn at 256 x 256 with a little noise (so JPEG
has texture to code, as photographs do), saved as JPEG (quality 90) with a caption each, as
img2dataset saves its 256 px images; the same pairs as shards (`dalle-train shards`, 64 a
shard) and pre-encoded (`dalle-train encode`) by config A's VAE (64 px, 8 x 8 codes), by a
256 px VAE (32 x 32 codes) and by the default VAE of `dalle-train vae` (128 px, 16 x 16).
Loaders: `Batches` over `ImageTextFolder`, `StreamBatches` over the
shards and over the pre-encoded shards, batch 8, 0 and 2 DataLoader workers, cropping to the
size given; a rate is samples over the seconds of 40 batches after 4 of warm-up. Training:
`dalle-train dalle` with config A (bench_scaling's) for 40 steps of batch 8, 2 torch threads,
from the folder (the VAE encodes every batch inside the step) and from the 64 px pre-encoded
shards, and the same with the VAE `dalle-train vae` trains by default (128 px, 16 x 16 codes):
its rate comes from its metrics, between its first and last logged step. Every case
runs in turns, ``--repeats`` times; each figure is the median.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scaling import CONFIG_A, make_vae, report, steady_rate  # noqa: E402

PAIRS, BATCH, WARMUP, TIMED = 512, 8, 4, 40
SIZES = (64, 256)
WORKERS = (0, 2)


def write_pairs(folder: Path) -> None:
    """`PAIRS` shapes pictures, 256 px JPEG with a little noise, with their captions."""
    from dalle_train.data.shapes import ShapesDataset
    from dalle_train.imageio import to_pil

    folder.mkdir(parents=True)
    shapes = ShapesDataset(PAIRS, seed=0, image_size=256)
    noise = torch.Generator().manual_seed(0)
    for index in range(PAIRS):
        sample = shapes[index]
        image = (sample.image + 0.04 * torch.randn(sample.image.shape, generator=noise)).clamp(0, 1)
        to_pil(image).save(folder / f"{index:05d}.jpg", quality=90)
        (folder / f"{index:05d}.txt").write_text(sample.caption + "\n")


def vae_default(directory: Path) -> Path:
    """The VAE `dalle-train vae` trains by default (upstream's train_vae.py defaults: 128 px, 3
    downsamplings: 16 x 16 codes of 8192, 256 hidden channels, 2 resnet blocks), untrained."""
    from dalle_core import DiscreteVAE

    torch.manual_seed(0)
    DiscreteVAE(image_size=128, num_layers=3, num_tokens=8192, codebook_dim=512, hidden_dim=256,
                num_resnet_blocks=2).save_pretrained(directory)
    return directory


def vae_256(directory: Path) -> Path:
    """A 256 px DiscreteVAE (3 downsamplings: 32 x 32 codes), untrained, saved once."""
    from dalle_core import DiscreteVAE

    torch.manual_seed(0)
    DiscreteVAE(image_size=256, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64,
                num_resnet_blocks=1).save_pretrained(directory)
    return directory


def cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "dalle_train", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"dalle-train {' '.join(args)} failed:\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")


def loader(kind: str, data: dict[str, Path], size: int, workers: int) -> Callable[[], object]:
    """A function making a fresh batch iterator of ``kind`` at ``size`` px."""
    from dalle_train.data import Batches, ImageTextFolder, ShardStream, StreamBatches, WdsKeys, shard_list
    from dalle_train.data.stream import PixelDecoder
    from dalle_train.data.tokens import CodeDecoder, read_manifest

    if kind == "folder":
        return lambda: iter(Batches(ImageTextFolder(data["folder"], size), BATCH, num_workers=workers))
    if kind == "tar":
        decode = PixelDecoder(WdsKeys.parse("jpg,txt"), size)
        tars = shard_list(str(data["shards"]))
        return lambda: iter(StreamBatches(ShardStream(tars, decode).split(BATCH, 0, 1), num_workers=workers))
    folder = data[f"tokens-{size}"]
    codes = int(read_manifest(folder)["image_seq_len"])
    shards = shard_list(str(folder))
    return lambda: iter(StreamBatches(ShardStream(shards, CodeDecoder(codes)).split(BATCH, 0, 1),
                                      num_workers=workers))


def loading_rate(make: Callable[[], object]) -> float:
    """Samples/s of `TIMED` batches after `WARMUP` (workers started, first shards opened)."""
    batches = make()
    for _ in range(WARMUP):
        next(batches)  # type: ignore[call-overload]
    start = time.perf_counter()
    samples = sum(len(batch) for batch in itertools.islice(batches, TIMED))  # type: ignore[call-overload]
    return samples / (time.perf_counter() - start)


def training_rate(out: Path, vae: Path, source: list[str]) -> float:
    """Config A trained by `dalle-train dalle` for 40 steps on ``source``: steady samples/s."""
    cli("dalle", *source, "--vae-path", str(vae), *CONFIG_A, "--batch-size", str(BATCH),
        "--max-steps", "40", "--log-every", "10", "--sample-every", "0", "--save-every-n-steps", "40",
        "--threads", "2", "--output-dir", str(out))
    return steady_rate(out / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, in turns (default 3)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args()
    torch.set_num_threads(2)
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = {"folder": root / "pairs", "shards": root / "shards"}
        write_pairs(data["folder"])
        cli("shards", "--image-text-folder", str(data["folder"]), "--output", str(data["shards"]),
            "--samples-per-shard", "64")
        vaes = {64: make_vae(root / "vae-64"), 256: vae_256(root / "vae-256"),
                128: vae_default(root / "vae-128")}
        for size, vae in vaes.items():
            data[f"tokens-{size}"] = root / f"tokens-{size}"
            cli("encode", "--image-text-folder", str(data["folder"]), "--vae-path", str(vae), "--output",
                str(data[f"tokens-{size}"]), "--samples-per-shard", "64", "--device", "cpu")
        cases = [(kind, size, workers)
                 for kind in ("folder", "tar", "tokens") for size in SIZES for workers in WORKERS]
        loading: dict[str, list[float]] = {f"{k} {s} px, {w} workers": [] for k, s, w in cases}
        folder = ["--image-text-folder", str(data["folder"])]
        runs = {  # name -> (VAE, data flags)
            "pixels (folder)": (vaes[64], folder),
            "pre-encoded (--tokens)": (vaes[64], ["--tokens", str(data["tokens-64"])]),
            "default VAE: pixels (folder)": (vaes[128], folder),
            "default VAE: pre-encoded (--tokens)": (vaes[128], ["--tokens", str(data["tokens-128"])]),
        }
        training: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(options.repeats):
            for kind, size, workers in cases:
                rate = loading_rate(loader(kind, data, size, workers))
                loading[f"{kind} {size} px, {workers} workers"].append(rate)
            for number, (name, (vae, source)) in enumerate(runs.items()):
                out = root / f"train-{repeat}-{number}"
                training[name].append(training_rate(out, vae, source))
            figures = ", ".join(f"{k} {v[-1]:.0f}" for k, v in {**loading, **training}.items())
            print(f"repeat {repeat + 1}: {figures}", flush=True)
    median = {name: statistics.median(values) for name, values in {**loading, **training}.items()}
    consumed = median["pixels (folder)"]
    ratio = median["pre-encoded (--tokens)"] / consumed
    default_ratio = median["default VAE: pre-encoded (--tokens)"] / median["default VAE: pixels (folder)"]
    slowest_tar = min(median[f"tar {size} px, 2 workers"] for size in SIZES)
    result = {"date": started.strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}",
              "python": platform.python_version(),
              "command": " ".join(["python benchmarks/bench_data.py", *sys.argv[1:]]),
              "repeats": options.repeats, "loading": loading, "training": training,
              "pre_encoded_speedup": ratio, "pre_encoded_speedup_default_vae": default_ratio}
    lines = [
        "# Data loading (CPU)", "", "Generated by `benchmarks/bench_data.py`; do not edit by hand.", "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; {result['machine']}; Python {result['python']}",
        f"- {PAIRS} shapes pictures as 256 px JPEG with captions; batch {BATCH}; median of "
        f"{options.repeats} runs in turns", "",
        "## Loaders (samples/s, 40 batches after 4)", "",
        "| path | samples/s (runs) | vs config A's consumption |", "|---|---|---:|",
    ]
    for name, values in loading.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {name} | {median[name]:.0f} ({runs}) | {median[name] / consumed:.1f}x |")
    lines += [
        "", "## Training config A (samples/s, 2 torch threads, 0 workers)", "",
        "Config A with its own VAE (64 px, 8 x 8 codes), and config A's transformer with the VAE "
        "`dalle-train vae` trains by default (128 px, 16 x 16 codes of 8192, 256 hidden channels).", "",
        "| data | samples/s (runs) | vs pixels |", "|---|---|---:|",
    ]
    for name, values in training.items():
        pixels = median["default VAE: pixels (folder)"] if name.startswith("default") else consumed
        figures = ", ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {name} | {median[name]:.1f} ({figures}) | {median[name] / pixels:.2f}x |")
    lines += [
        "", "## Targets", "",
        f"- config A from pre-encoded shards: {ratio:.2f}x its speed from pixels (target >= 1.3x): "
        f"{'met' if ratio >= 1.3 else '**missed**'} (with the default VAE: {default_ratio:.2f}x)",
        f"- the tar loader with 2 workers (slowest size: {slowest_tar:.0f} samples/s) against what config A "
        f"consumes ({consumed:.1f} samples/s): "
        + ("never the bottleneck" if slowest_tar > consumed else "**the bottleneck**"),
    ]
    report("data", lines, result, write=not options.no_write)


if __name__ == "__main__":
    main()
