"""``dalle-train serve`` under load on this machine: concurrent clients on 127.0.0.1 against the
server batching requests (``--max-batch 4``), beside the same server with batches of one image
(``--max-batch 1``: each image generated alone, the reference) under the same load, in one run.

    python benchmarks/bench_serve.py --dalle-path demo-out/dalle --clip-path demo-out/clip
    python benchmarks/bench_serve.py --dalle-path demo-out/dalle --seconds 10 --no-write

For each number of clients and each server, `dalle_train.serve.load.run_load` runs for
``--seconds``: each client posts ``/generate`` requests of 1 or 2 images (every code drawn,
its own prompt and seed) one after the other and checks each answer (its prompt, seed, and the
settings each PNG carries). The servers run in turns, ``--repeats`` times; each figure is the
median. Writes ``benchmarks/serve.md`` and ``serve.json``. Needs the serve extra.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from dalle_core import CLIP, DALLE
from dalle_train.serve.load import run_load
from dalle_train.serve.server import Server
from dalle_train.training.layout import find_model_dir

HERE = Path(__file__).resolve().parent
CLIENTS = (1, 4, 8)
BATCHES = {"batched (max-batch 4)": 4, "one image at a time (max-batch 1)": 1}
FIGURES = ("requests_per_second", "images_per_second", "latency_p50_s", "latency_p90_s", "latency_p99_s")


def measure(dalle: DALLE, clip: CLIP | None, max_batch: int, clients: int, seconds: float) -> dict:
    with Server(dalle, clip, port=0, max_batch=max_batch, max_waiting=64) as server:
        run_load(server.url, clients, min(2.0, seconds))  # warm-up
        report = run_load(server.url, clients, seconds)
    if report.problems():
        raise SystemExit(f"the load run found problems: {report.problems()[:5]}")
    return report.summary()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dalle-path", required=True, help="the DALLE to serve (e.g. demo-out/dalle)")
    parser.add_argument("--clip-path", help="a CLIP that ranks the images (e.g. demo-out/clip)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server's worker")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dalle = DALLE.from_pretrained(find_model_dir(args.dalle_path)).eval()
    clip = CLIP.from_pretrained(find_model_dir(args.clip_path)).eval() if args.clip_path else None
    runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in CLIENTS} for name in BATCHES}
    for _ in range(args.repeats):
        for clients in CLIENTS:
            for name, max_batch in BATCHES.items():
                summary = measure(dalle, clip, max_batch, clients, args.seconds)
                runs[name][clients].append(summary)
                print(f"{clients} clients, {name}: {json.dumps(summary)}", flush=True)
    medians = {
        name: {clients: {figure: statistics.median(run[figure] for run in found) for figure in FIGURES}
               for clients, found in by_clients.items()}
        for name, by_clients in runs.items()
    }
    batched, alone = BATCHES
    lines = [
        "# `dalle-train serve` under load",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, model {args.dalle_path} "
        f"({dalle.image_seq_len} codes per image, {sum(p.numel() for p in dalle.parameters()) / 1e6:.2f} M "
        f"parameters){', CLIP ' + args.clip_path if clip else ''}; {args.seconds:g} s per run after a "
        f"warm-up, median of {args.repeats}. Command: `python benchmarks/bench_serve.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        "| clients | server | requests/s | images/s | p50 s | p90 s | p99 s | batched / alone (requests/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients in CLIENTS:
        rates = [medians[name][clients]["requests_per_second"] for name in (batched, alone)]
        ratio = rates[0] / rates[1]
        for name in BATCHES:
            m = medians[name][clients]
            lines.append(
                f"| {clients} | {name} | {m['requests_per_second']:.2f} | {m['images_per_second']:.2f} | "
                f"{m['latency_p50_s']:.3f} | {m['latency_p90_s']:.3f} | {m['latency_p99_s']:.3f} | "
                f"{f'{ratio:.2f}x' if name == batched else ''} |"
            )
    lines += ["", "No request was lost or answered with another client's images in any run (the load "
              "tool checks every answer)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        (HERE / "serve.md").write_text(text)
        (HERE / "serve.json").write_text(json.dumps({"medians": medians, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
