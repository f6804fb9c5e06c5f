"""``dalle-train demo``: the main job end to end on the built-in shapes, in a few CPU minutes.

It runs the real commands one after the other, as a user would:

1. ``dalle-train vae`` on ``--dataset shapes`` (32x32 pictures of coloured shapes);
2. ``dalle-train dalle`` on the same pictures with that VAE (``--vae-path``) and core's byte
   tokenizer;
3. ``dalle-train clip`` on the same pairs;
4. ``dalle-train generate`` for fixed prompts, ranked by the CLIP;

then reads the generated PNGs back with the shapes checker and writes ``samples.png`` (every
fixed prompt, best CLIP score first, with what the checker sees), ``samples-extra.png`` (the same
for prompts drawn with the seed, scored apart), ``loss.png``, ``summary.json`` and ``report.md``
(the checker's agreement next to chance and the VAE's ceiling, seconds and steps per stage,
codebook usage: `dalle_train.demo_report`). ``--quick`` does the same with tiny models in well
under a minute (for tests).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dalle_core import DiscreteVAE
from dalle_train.commands.common import load_model
from dalle_train.data.shapes import PROMPTS, Spec, judge, score
from dalle_train.demo_report import (
    agreement,
    chance,
    extra_prompts,
    hard_reconstructions,
    held_out,
    rounded,
    write_report,
)
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.imageio import to_tensor
from dalle_train.pictures import image_rows, loss_plot, save_png, slug
from dalle_train.training.layout import find_model_dir
from dalle_train.training.metrics import METRICS_FILE

#: captions the DALLE trains without, so that it can be guided (``--cond-scale``) when it generates
NULL_COND_PROB = 0.1
#: how the demo samples: the top 10% of codes, sharpened (temperature 0.5), guided 2x away from
#: the caption-free prediction
SAMPLING = ["--top-k", "0.9", "--temperature", "0.5", "--cond-scale", "2"]


@dataclass
class Plan:
    """Sizes and steps of one demo run."""

    samples: int
    steps: dict[str, int]
    per_prompt: int
    prompts: int
    extra_prompts: int
    held_out: int
    vae: list[str] = field(default_factory=list)
    dalle: list[str] = field(default_factory=list)
    clip: list[str] = field(default_factory=list)


def plan(quick: bool) -> Plan:
    """The full demo (about 5 minutes on 2 cores) or the quick one. What each setting of the full
    one gave, and what else was tried: ``benchmarks/demo-quality.md``."""
    if quick:
        return Plan(
            samples=512, steps={"vae": 100, "dalle": 40, "clip": 20}, per_prompt=4, prompts=2,
            extra_prompts=2, held_out=64,
            vae=["--num-tokens", "64", "--emb-dim", "32", "--hidden-dim", "32", "--batch-size", "8",
                 "--learning-rate", "3e-3"],
            dalle=["--dim", "64", "--depth", "2", "--heads", "2", "--dim-head", "32", "--batch-size", "16"],
            clip=["--dim-text", "32", "--dim-image", "32", "--dim-latent", "32", "--text-enc-depth", "1",
                  "--visual-enc-depth", "1", "--text-heads", "2", "--visual-heads", "2"],
        )
    return Plan(
        samples=4000, steps={"vae": 3000, "dalle": 650, "clip": 300}, per_prompt=16, prompts=len(PROMPTS),
        extra_prompts=6, held_out=500,
        # small batches, many steps at a high rate; a slight KL to the uniform prior and a Gumbel
        # temperature starting at 2 keep codes in use (from 1, some seeds collapse to a few codes)
        vae=["--num-tokens", "128", "--emb-dim", "32", "--hidden-dim", "48", "--batch-size", "16",
             "--learning-rate", "1e-2", "--starting-temp", "2"],
        dalle=["--dim", "128", "--depth", "4", "--heads", "4", "--dim-head", "32", "--batch-size", "32"],
        clip=["--dim-text", "64", "--dim-image", "64", "--dim-latent", "64", "--text-enc-depth", "2",
              "--visual-enc-depth", "2", "--text-heads", "4", "--visual-heads", "4"],
    )


def register(subparsers: Any) -> None:
    """Add ``dalle-train demo``."""
    parser = subparsers.add_parser("demo", help="train VAE, DALLE and CLIP on built-in shapes and generate",
                                   description=__doc__.split("\n\n")[0])
    add_flag(parser, "--output-dir", type=Path, default=Path("demo-out"), help="(default demo-out)")
    add_flag(parser, "--quick", action="store_true", help="tiny models, well under a minute (for tests)")
    add_flag(parser, "--seed", type=int, default=0, help="seed of data, models and sampling (default 0)")
    add_flag(parser, "--threads", type=int, help="torch CPU threads")
    add_flag(parser, "--start-fresh", action="store_true", help="replace an earlier demo in the output dir")
    parser.set_defaults(run=run)


def _command(argv: list[str]) -> None:
    from dalle_train.cli import main

    print(f"\n$ dalle-train {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise TrainError(f"dalle-train {argv[0]} failed (exit code {code})", exit_code=code)


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def _judged(out: Path, specs: list[Spec]) -> tuple[list[Any], list[tuple[Spec, Spec | None]]]:
    """The generated pictures of each of ``specs``, read back: rows for `image_rows` (with what
    the checker sees under each, green where colour and shape agree) and (asked, seen) pairs."""
    rows, pairs = [], []
    for spec in specs:
        folder = out / "generated" / slug(spec.caption())
        images = [to_tensor(Image.open(path).convert("RGB"))
                  for path in sorted(folder.glob("[0-9]*.png"), key=lambda q: int(q.stem))]
        seen = [judge(image) for image in images]
        pairs += [(spec, s) for s in seen]
        under = [((f"{s.colour} {s.shape}" if s else "blank"),
                  (20, 120, 40) if s and (s.colour, s.shape) == (spec.colour, spec.shape) else (180, 30, 30))
                 for s in seen]
        rows.append((spec.caption(), images, under))
    return rows, pairs


def run(args: argparse.Namespace) -> int:
    """Train the three models, generate, judge; returns 0."""
    started, out, p = time.perf_counter(), args.output_dir, plan(args.quick)
    common = ["--dataset", "shapes", "--dataset-size", str(p.samples), "--seed", str(args.seed),
              "--save-every-n-steps", "100000", "--sample-every", "0", "--log-every", "5"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.start_fresh:
        common += ["--start-fresh"]
    seconds = {}

    def stage(name: str, argv: list[str]) -> None:
        t = time.perf_counter()
        _command([name, *argv, *common, "--output-dir", str(out / name), "--max-steps", str(p.steps[name])])
        seconds[name] = round(time.perf_counter() - t, 1)

    anneal = f"{2.7726 / (50 * (p.steps['vae'] // 100 + 1) * (p.steps['vae'] // 100)):.6f}"  # 16-fold
    stage("vae", ["--image-size", "32", "--num-layers", "2", "--num-resnet-blocks", "0",
                  "--kl-loss-weight", "3e-5", "--lr-schedule", "cosine",
                  "--warmup-steps", str(p.steps["vae"] // 20), "--temp-min", "0.0625",
                  "--anneal-rate", anneal, *p.vae])
    stage("dalle", ["--vae-path", str(out / "vae"), "--tokenizer", "bytes", "--text-seq-len", "48",
                    "--null-cond-prob", str(NULL_COND_PROB), "--learning-rate", "2e-3",
                    "--warmup-steps", str(p.steps["dalle"] // 20), *p.dalle])
    stage("clip", ["--tokenizer", "bytes", "--text-seq-len", "48", "--visual-image-size", "32",
                   "--visual-patch-size", "8", "--learning-rate", "1e-3", "--batch-size", "64", *p.clip])

    specs = [Spec(*prompt) for prompt in PROMPTS[: p.prompts]]
    extras = extra_prompts(args.seed, p.extra_prompts)
    t = time.perf_counter()
    _command(["generate", "--dalle-path", str(out / "dalle"), "--clip-path", str(out / "clip"),
              "--text", "|".join(s.caption() for s in specs + extras), "--num-images", str(p.per_prompt),
              "--batch-size", str(p.per_prompt), *SAMPLING, "--seed", str(args.seed),
              "--outputs-dir", str(out / "generated")])
    seconds["generate"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    rows, pairs = _judged(out, specs)
    extra_rows, extra_pairs = _judged(out, extras)
    title = ("generated, best CLIP score first; under each: what the pixel checker sees (green: the "
             "prompt's colour and shape)")
    save_png(image_rows(rows, scale=3, title=title), out / "samples.png")
    save_png(image_rows(extra_rows, scale=3, title=f"prompts drawn with seed {args.seed}; {title}"),
             out / "samples-extra.png")
    loss_plot({name.upper() if name != "dalle" else "DALLE": _losses(out / name)
               for name in ("vae", "dalle", "clip")}, out / "loss.png")
    vae = load_model(DiscreteVAE, find_model_dir(out / "vae")).eval()
    held_specs, held_images = held_out(args.seed, p.samples, p.held_out)
    reconstructions, code_counts = hard_reconstructions(vae, held_images)
    ceiling, dataset = agreement(held_specs, reconstructions), agreement(held_specs, held_images)
    seconds["judge"] = round(time.perf_counter() - t, 1)

    generated = score(pairs)
    summary = {
        "seed": args.seed, "quick": args.quick, "steps": p.steps,
        "checker": {
            "generated": rounded(generated), "images": len(pairs),
            "extra": rounded(score(extra_pairs)), "extra_images": len(extra_pairs),
            "vae_ceiling": rounded(ceiling), "dataset": rounded(dataset), "held_out": len(held_specs),
            "chance": rounded(chance()),
        },
        "extra_prompts": [s.caption() for s in extras],
        "vae": {"num_tokens": vae.num_tokens, "codes_used": int((code_counts > 0).sum()),
                "codes_per_image": vae.fmap_size ** 2},
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(summary, out / "report.md")
    print(f"\ndemo done in {summary['seconds']['total']:.0f} s; the pixel checker finds the prompt's "
          f"colour in {generated['colour']:.0%} and its shape in {generated['shape']:.0%} of {len(pairs)} "
          f"generated images (the VAE's ceiling: {summary['checker']['vae_ceiling']['shape']:.0%} shape)")
    print(f"look at: {out / 'report.md'}, {out / 'samples.png'}, {out / 'loss.png'}, {out / 'generated'}/, "
          f"{out / 'vae' / 'samples'}/, {out / 'dalle' / 'samples'}/")
    return 0
