"""Data-parallel scaling of `dalle-train dalle` on this machine: samples/s of config A with 2
processes of 1 torch thread each, against 1 process of 1 thread, for each distributed backend
installed (DeepSpeed once per ZeRO stage), measured in one run.

    python benchmarks/bench_scaling.py            # writes benchmarks/scaling.md and scaling.json
    python benchmarks/bench_scaling.py --steps 20 --repeats 1 --no-write   # a quick look
    python benchmarks/bench_scaling.py --backends horovod --env HOROVOD_CYCLE_TIME=5 --no-write

Config A as in `bench_core.py` (dim 256, depth 4, 8 heads of 32, 64 text tokens, 64 px images
and 8 x 8 = 64 image codes from a DiscreteVAE encoded inside each step), trained by the real
command on the built-in shapes with a batch of 8 per process (weak scaling: each process keeps
its batch, so 2 processes train 16 samples per optimizer step). The one-process baseline and
each backend run in turns, ``--repeats`` times; each figure is the median. A run's rate is read
from its own metrics: samples over seconds between its first logged step (after warm-up) and
its last, so start-up, the first steps and the final save are not counted.

The run also times the collective itself (`allreduce_probe.py`): a blocking average of as many
floats as config A trains, over 2 processes of 1 thread, through torch.distributed's gloo and,
when installed, Horovod's, so a backend's scaling can be read against what its allreduce costs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 8
CONFIG_A = ["--dim", "256", "--depth", "4", "--heads", "8", "--dim-head", "32", "--text-seq-len", "64",
            "--tokenizer", "bytes"]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
HOROVODRUN = [str(Path(sys.executable).with_name("horovodrun")), "-np", "2", "-H", "localhost:2", "--gloo",
              sys.executable]
#: case -> (the module it needs, how its two processes are launched (``-m dalle_train`` follows),
#: the backend's flags)
CASES = {
    "ddp": ("torch", TORCHRUN, ["--distributed-backend", "ddp"]),
    "fsdp": ("torch", TORCHRUN, ["--distributed-backend", "fsdp"]),
    "horovod": ("horovod", HOROVODRUN, ["--distributed-backend", "horovod"]),
    **{f"deepspeed-zero{stage}": ("deepspeed", TORCHRUN, ["--deepspeed", "--zero-stage", str(stage)])
       for stage in (1, 2, 3)},
}
#: the scaling the issue asks of a case (the others are reported)
TARGETS = {"ddp": 1.7, "horovod": 1.7}


def make_vae(directory: Path) -> Path:
    """Config A's VAE (64 px, 3 downsamplings, 512 codes), untrained, saved once."""
    import torch

    from dalle_core import DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=64, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64,
                      num_resnet_blocks=1)
    vae.save_pretrained(directory)
    return directory


def steady_rate(metrics: Path) -> float:
    """Samples/s between the first and the last logged step. The loop logs cumulative rates
    (every process's samples so far over the seconds so far, ``r_k = k G / t_k`` at step k with
    G samples a step), so the time of step k is ``k G / r_k`` and the rate between steps j and k
    is ``(k - j) G / (t_k - t_j)``."""
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "samples_per_s" in r]
    (j, r_j), (k, r_k) = [(r["step"], r["samples_per_s"]) for r in (records[0], records[-1])]
    return (k - j) / (k / r_k - j / r_j)


def train(out: Path, vae: Path, steps: int, backend: str, extra_env: dict[str, str]) -> float:
    """One run (``extra_env`` added to its environment); returns its steady samples/s."""
    args = ["dalle", "--dataset", "shapes", "--dataset-size", "2048", "--vae-path", str(vae), *CONFIG_A,
            "--batch-size", str(BATCH), "--max-steps", str(steps), "--log-every", str(steps // 4),
            "--sample-every", "0", "--save-every-n-steps", str(steps), "--threads", "1",
            "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    if backend == "none":
        command = [sys.executable, "-m", "dalle_train", *args]
    else:
        _, launcher, flags = CASES[backend]
        command = [*launcher, "-m", "dalle_train", *args, *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return steady_rate(out / "metrics.jsonl")


def allreduce_ms(library: str, extra_env: dict[str, str]) -> list[float]:
    """Milliseconds per allreduce of config A's gradient size through ``library``'s gloo, one
    figure per repeat of `allreduce_probe.py`."""
    probe = [str(HERE / "allreduce_probe.py"), library]
    command = [*TORCHRUN, *probe] if library == "torch" else [*HOROVODRUN, *probe]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    reports = [line[line.index("{"):] for line in result.stdout.splitlines() if '"library"' in line]
    if result.returncode or not reports:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(reports[0])["ms"]


def report(stem: str, lines: list[str], result: dict, write: bool) -> None:
    """Print the markdown ``lines``; with ``write``, keep them as ``benchmarks/STEM.md`` and
    ``result`` as ``STEM.json``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        (HERE / f"{stem}.md").write_text(text)
        (HERE / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, in turns (default 3)")
    installed = [name for name, (module, _, _) in CASES.items() if importlib.util.find_spec(module)]
    parser.add_argument("--backends", default=",".join(installed),
                        help=f"comma-separated cases of {', '.join(CASES)} (default: those installed here)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in every run's environment (an engine's tuning variable); repeatable")
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in options.env)
    backends = [b for b in options.backends.split(",") if b]
    rates: dict[str, list[float]] = {name: [] for name in ("none", *backends)}
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as scratch:
        vae = make_vae(Path(scratch) / "vae")
        for repeat in range(options.repeats):
            for name in rates:
                rate = train(Path(scratch) / f"{name}-{repeat}", vae, options.steps, name, extra_env)
                rates[name].append(rate)
                print(f"{name} run {repeat + 1}: {rate:.1f} samples/s", flush=True)
        allreduce = {library: allreduce_ms(library, extra_env) for library in ("torch", "horovod")
                     if library == "torch" or "horovod" in backends}
    baseline = statistics.median(rates["none"])
    rows = [{"backend": name, "processes": 1 if name == "none" else 2, "runs": values,
             "samples_per_s": statistics.median(values), "scaling": statistics.median(values) / baseline}
            for name, values in rates.items()]
    machine = f"{platform.processor() or platform.machine()}, nproc {os.cpu_count()}"
    result = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
        "python": platform.python_version(),
        "command": " ".join(["python benchmarks/bench_scaling.py", *sys.argv[1:]]),
        "steps": options.steps, "repeats": options.repeats, "batch_per_process": BATCH, "rows": rows,
        "allreduce_ms": allreduce,
    }
    lines = [
        "# Data-parallel scaling (CPU)", "",
        "Generated by `benchmarks/bench_scaling.py`; do not edit by hand.", "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; {machine}; Python {result['python']}",
        f"- config A trained by `dalle-train dalle` on the built-in shapes, batch {BATCH} per process, "
        f"1 torch thread per process, {options.steps} steps a run, median of {options.repeats} runs in "
        f"turns", "",
        "| backend | processes | samples/s (runs) | vs 1 process | target |", "|---|---:|---|---:|---|",
    ]
    for row in rows:
        wanted = TARGETS.get(row["backend"])
        met = "met" if wanted and row["scaling"] >= wanted else "**missed**"
        target = f">= {wanted}x: {met}" if wanted else "-"
        runs = ", ".join(f"{r:.1f}" for r in row["runs"])
        lines.append(f"| {row['backend']} | {row['processes']} | {row['samples_per_s']:.1f} ({runs}) | "
                     f"{row['scaling']:.2f}x | {target} |")
    torch_ms = statistics.median(allreduce["torch"])
    lines += ["", "A blocking allreduce (average) of 4,639,555 floats (config A's trained weights), "
              "2 processes of 1 thread, 20 calls a repeat, median of 3 repeats (`allreduce_probe.py`):", "",
              "| library | ms per allreduce (repeats) | vs torch gloo |", "|---|---|---:|"]
    for library, figures in allreduce.items():
        median = statistics.median(figures)
        runs = ", ".join(f"{ms:.1f}" for ms in figures)
        lines.append(f"| {library} gloo | {median:.1f} ({runs}) | {median / torch_ms:.2f}x |")
    report("scaling", lines, result, write=not options.no_write)


if __name__ == "__main__":
    main()
