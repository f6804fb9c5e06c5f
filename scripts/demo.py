#!/usr/bin/env python
"""End-to-end DALL-E demo on a built-in synthetic dataset, on a CPU, in a few minutes.

One command, no download, nothing but dalle-core, torch and Pillow:

    PYTHONPATH=packages/dalle-core/src python scripts/demo.py            # ~4 min on 2 cores
    PYTHONPATH=packages/dalle-core/src python scripts/demo.py --quick    # ~10 s smoke run

(``scripts/demo`` runs it through ``nox -s demo``.) ``--quick`` exercises every step with
tiny models, for tests; its pictures are not meant to show shapes.

It

1. draws a seeded dataset of 32x32 pictures of coloured shapes (circle, square, triangle in
   five colours, two sizes, five positions) with captions like
   "a small red circle in the top left";
2. trains a `DiscreteVAE` (8x8 codes, Gumbel temperature annealed), encodes every image once
   with `get_codebook_indices`, trains a `DALLE` on (caption, codes) pairs with the
   `ByteTokenizer`, and trains a tiny `CLIP`;
3. saves the three models with `save_pretrained`, reloads the DALLE (and CLIP) with
   `from_pretrained`, generates several images per fixed prompt, ranks them with CLIP and
   writes PNGs: one grid per prompt, ``samples.png``, ``reconstructions.png``, ``loss.png``;
4. checks the generated images with a pixel-level checker (dominant colour, shape, position)
   and prints how many match their prompt, next to the same checker's score on real images.

Everything is seeded (``--seed``): two runs with the same flags and ``--threads`` on the same
machine give the same pictures and weights. Without ``dalle_core`` installed, the script
finds it in the source tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

try:
    import dalle_core  # noqa: F401
except ImportError:  # run from a checkout without installing: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "dalle-core" / "src"))

from dalle_core import CLIP, DALLE, DiscreteVAE  # noqa: E402
from dalle_core.tokenizers import ByteTokenizer  # noqa: E402

# ------------------------------------------------------------------------------------- data

IMAGE_SIZE = 32
TEXT_SEQ_LEN = 48
BACKGROUND = (236, 234, 228)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 190, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 9.0, "large": 15.0}  # side of the bounding box, pixels
POSITIONS: dict[str, tuple[float, float]] = {  # centre (x, y), pixels
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
SUPERSAMPLE = 4  # draw at 4x and downscale: anti-aliased edges

#: prompts generated at the end (fixed, so runs compare); each is also in the training set
PROMPTS: list[tuple[str, str, str, str]] = [  # size, colour, shape, position
    ("small", "red", "circle", "top left"),
    ("large", "blue", "square", "center"),
    ("large", "yellow", "triangle", "bottom right"),
    ("small", "green", "square", "top right"),
    ("large", "purple", "circle", "bottom left"),
    ("large", "red", "triangle", "center"),
]


@dataclass(frozen=True)
class Spec:
    """What a picture shows."""

    size: str
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"


def draw_shape(spec: Spec, rng: random.Random) -> Image.Image:
    """A 32x32 RGB picture of ``spec`` on the plain background, with a little jitter in the
    position, size and colour so that no two samples are identical."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[spec.position]
    cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    half = (SIZES[spec.size] + rng.uniform(-1.0, 1.0)) / 2
    colour = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLOURS[spec.colour])
    box = [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s]
    if spec.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif spec.shape == "square":
        draw.rectangle(box, fill=colour)
    else:  # an upward triangle filling the box
        left, top, right, bottom = box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float ``[B, 3, H, W]`` in [0, 1] (no numpy needed)."""
    data = torch.stack(
        [torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in images]
    )
    return data.view(len(images), IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2).float() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> PIL RGB image."""
    data = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    h, w = data.shape[:2]
    return Image.frombytes("RGB", (w, h), bytes(data.flatten().tolist()))


def make_dataset(count: int, seed: int) -> tuple[list[Spec], torch.Tensor]:
    """``count`` seeded samples: specs and images ``[count, 3, 32, 32]`` in [0, 1]."""
    rng = random.Random(seed)
    specs, images = [], []
    for _ in range(count):
        spec = Spec(
            rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES),
            rng.choice(list(POSITIONS)),
        )
        specs.append(spec)
        images.append(draw_shape(spec, rng))
    return specs, to_tensor(images)


# ------------------------------------------------------------------------------------- checker


def shape_mask(shape: str, box: tuple[float, float, float, float]) -> torch.Tensor:
    """Coverage ``[32, 32]`` in [0, 1] of ``shape`` drawn (anti-aliased) to fill ``box``."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = (v * s for v in box)
    if shape == "circle":
        draw.ellipse([left, top, right, bottom], fill=255)
    elif shape == "square":
        draw.rectangle([left, top, right, bottom], fill=255)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    data = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    return data.view(IMAGE_SIZE, IMAGE_SIZE).float() / 255


def judge(image: torch.Tensor) -> Spec | None:
    """Read back what a picture ``[3, 32, 32]`` in [0, 1] shows from its pixels; None if blank.

    Colour: the palette colour nearest to most non-background pixels. Coverage: how far each
    pixel lies from the background towards that colour (1 inside the shape, fractions on its
    anti-aliased edge, 0 for pixels of other colours). Shape: the circle, square or triangle
    filling the coverage's bounding box that differs least from it. Position: the nearest of
    the five centres to the coverage's centre of mass. Size: the nearer bounding box side.
    """
    pixels = image.clamp(0, 1).permute(1, 2, 0).reshape(-1, 3) * 255  # [HW, 3]
    offset = pixels - torch.tensor(BACKGROUND, dtype=torch.float32)  # [HW, 3]
    foreground = offset.norm(dim=1) > 60
    if int(foreground.sum()) < 4:
        return None
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [K, 3]
    nearest = torch.cdist(pixels, palette).argmin(dim=1)  # [HW]
    index = int(torch.bincount(nearest[foreground], minlength=len(palette)).argmax())
    colour = list(COLOURS)[index]

    direction = palette[index] - torch.tensor(BACKGROUND, dtype=torch.float32)  # [3]
    alpha = offset @ direction / direction.dot(direction)  # [HW], 0 = background, 1 = colour
    off_line = (offset - alpha[:, None] * direction).norm(dim=1) > 50  # another colour
    coverage = alpha.clamp(0, 1).masked_fill(off_line, 0).view(IMAGE_SIZE, IMAGE_SIZE)
    ys, xs = (coverage > 0.5).nonzero(as_tuple=True)
    if len(xs) == 0:
        return None
    # bounding box in pixel units: partially covered border pixels widen it by their coverage
    rows, cols = coverage.amax(dim=1), coverage.amax(dim=0)
    top, bottom = int(ys.min()), int(ys.max())
    left, right = int(xs.min()), int(xs.max())
    box = (
        left - float(cols[left - 1]) if left > 0 else left,
        top - float(rows[top - 1]) if top > 0 else top,
        right + 1 + (float(cols[right + 1]) if right + 1 < IMAGE_SIZE else 0.0),
        bottom + 1 + (float(rows[bottom + 1]) if bottom + 1 < IMAGE_SIZE else 0.0),
    )
    shape = min(SHAPES, key=lambda name: float((shape_mask(name, box) - coverage).abs().sum()))
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    mass = coverage.sum()
    cx = float((coverage.sum(dim=0) * grid).sum() / mass)
    cy = float((coverage.sum(dim=1) * grid).sum() / mass)
    position = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], (cx, cy)))
    side = (box[2] - box[0] + box[3] - box[1]) / 2
    size = min(SIZES, key=lambda name: abs(SIZES[name] - side))
    return Spec(size, colour, shape, position)


def tally(want: Spec, seen: list[Spec | None]) -> str:
    """"colour 7/8, shape 5/8": how many readings agree with the prompt."""
    colour = sum(s is not None and s.colour == want.colour for s in seen)
    shape = sum(s is not None and s.shape == want.shape for s in seen)
    return f"checker: colour {colour}/{len(seen)}, shape {shape}/{len(seen)}"


def score(pairs: list[tuple[Spec, Spec | None]]) -> dict[str, float]:
    """Fraction of (asked, seen) pairs that agree on colour, shape, position, and all four."""
    n = max(len(pairs), 1)
    ok = {
        field: sum(seen is not None and getattr(seen, field) == getattr(want, field)
                   for want, seen in pairs) / n
        for field in ("colour", "shape", "position", "size")
    }
    ok["all"] = sum(seen == want for want, seen in pairs) / n
    return ok


# ------------------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(count: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches (reshuffled every epoch)."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(name, model, steps, batch_size, count, loss_fn, lr, seed, extra=None):
    """Generic loop: AdamW, warm-up + cosine, gradient clipping, a tqdm bar; -> losses."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(seed)
    indices = batches(count, batch_size, generator)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=f"{name:>5}", unit="step", dynamic_ncols=True, mininterval=0.5)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(steps // 20, 1))
        loss = loss_fn(next(indices), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            postfix = {"loss": f"{sum(losses[-10:]) / len(losses[-10:]):.4f}"}
            if extra is not None:
                postfix.update(extra(step))
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    model.eval()
    return losses


def vae_temperature(step: int, steps: int, start: float = 1.0, end: float = 1 / 16) -> float:
    """Gumbel-softmax temperature annealed exponentially from ``start`` to ``end``."""
    return start * (end / start) ** (step / max(steps - 1, 1))


# ------------------------------------------------------------------------------------- pictures


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_height(draw: ImageDraw.ImageDraw, text: str, face) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    return bottom


Under = list[tuple[str, tuple[int, int, int]]] | None  # text and its colour, per image


def image_rows(rows: list[tuple[str, list[torch.Tensor], Under]], scale: int,
               title: str | None = None) -> Image.Image:
    """Rows of images (upscaled ``scale`` times), each with a label drawn above it and an
    optional caption under each image."""
    pad, face, small = 6, font(13), font(10)
    cell = IMAGE_SIZE * scale
    width = pad + max(len(images) for _, images, _ in rows) * (cell + pad)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = text_height(probe, "Ag", face) + 4
    under_h = text_height(probe, "0.0", small) + 3
    title_h = text_height(probe, "Ag", face) + 8 if title else 0
    row_h = label_h + cell + pad + (under_h if any(u for _, _, u in rows) else 0)
    canvas = Image.new("RGB", (max(width, 220), pad + title_h + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((pad, y), title, fill=(90, 90, 90), font=face)
        y += title_h
    for label, images, under in rows:
        draw.text((pad, y), label, fill="black", font=face)
        for i, image in enumerate(images):
            x = pad + i * (cell + pad)
            canvas.paste(to_pil(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y + label_h))
            if under:
                words, colour = under[i]
                draw.text((x, y + label_h + cell + 1), words, fill=colour, font=small)
        y += row_h
    return canvas


def loss_plot(curves: dict[str, list[float]], path: Path) -> None:
    """One panel per curve: raw loss (light), moving average (dark), log-scale y axis."""
    panel_w, panel_h = 330, 240
    canvas = Image.new("RGB", (panel_w * len(curves), panel_h), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (name, values) in enumerate(curves.items()):
        loss_panel(draw, p * panel_w, panel_w, panel_h, name, values)
    canvas.save(path)


def loss_panel(draw: ImageDraw.ImageDraw, left: int, width: int, height: int, name: str,
               values: list[float]) -> None:
    face = font(11)
    x0, y0, x1, y1 = left + 48, 26, left + width - 12, height - 30
    final = sum(values[-20:]) / len(values[-20:])
    draw.text((x0, 6), f"{name} loss (last 20 steps {final:.4f})", fill="black", font=face)
    draw.rectangle([x0, y0, x1, y1], outline=(150, 150, 150))
    logs = [math.log10(max(v, 1e-8)) for v in values]
    low, high = min(logs), max(logs)
    if high - low < 1e-6:
        high = low + 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * i / max(len(values) - 1, 1)
        y = y1 - (y1 - y0) * (value - low) / (high - low)
        return x, y

    for k in range(5):  # y ticks
        value = low + (high - low) * k / 4
        _, y = point(0, value)
        draw.line([x0 - 3, y, x0, y], fill=(120, 120, 120))
        draw.text((left + 2, y - 6), f"{10 ** value:.3g}", fill=(80, 80, 80), font=face)
    for k in range(3):  # x ticks
        i = (len(values) - 1) * k // 2
        x, _ = point(i, low)
        draw.text((x - 8, y1 + 4), str(i), fill=(80, 80, 80), font=face)
    draw.text((x1 - 30, y1 + 16), "step", fill=(80, 80, 80), font=face)
    if len(values) > 1:
        draw.line([point(i, v) for i, v in enumerate(logs)], fill=(180, 200, 235), width=1)
        window = max(len(values) // 30, 1)
        smooth, acc = [], 0.0
        for i, v in enumerate(logs):
            acc += v - (logs[i - window] if i >= window else 0.0)
            smooth.append(acc / min(i + 1, window))
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(25, 70, 160), width=2)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------------------- main


@dataclass
class Settings:
    samples: int
    steps_vae: int
    steps_dalle: int
    steps_clip: int
    per_prompt: int
    prompts: int
    vae: dict
    dalle: dict
    clip: dict
    batch_vae: int = 64
    batch_dalle: int = 32
    batch_clip: int = 64
    lr_vae: float = 3e-3
    lr_dalle: float = 2e-3
    lr_clip: float = 1e-3


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(
            samples=512, steps_vae=100, steps_dalle=40, steps_clip=20, per_prompt=4, prompts=2,
            vae=dict(num_tokens=64, codebook_dim=32, hidden_dim=32, num_resnet_blocks=0,
                     kl_div_loss_weight=3e-5),
            dalle=dict(dim=64, depth=2, heads=2, dim_head=32),
            clip=dict(dim_text=32, dim_image=32, dim_latent=32, text_enc_depth=1,
                      visual_enc_depth=1, text_heads=2, visual_heads=2),
            batch_vae=8, batch_dalle=16, batch_clip=32,
        )
    return Settings(
        samples=4000, steps_vae=1200, steps_dalle=500, steps_clip=300, per_prompt=8,
        prompts=len(PROMPTS),
        # small batches, many steps; a slight KL to the uniform prior keeps more codes in use
        # (without it ~10 of 128 are used and corners get rounded off; lr 5e-3 leaves dots)
        vae=dict(num_tokens=128, codebook_dim=32, hidden_dim=48, num_resnet_blocks=0,
                 kl_div_loss_weight=3e-5),
        dalle=dict(dim=128, depth=4, heads=4, dim_head=32),
        clip=dict(dim_text=64, dim_image=64, dim_latent=64, text_enc_depth=2,
                  visual_enc_depth=2, text_heads=4, visual_heads=4),
        batch_vae=16,
    )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else `os.cpu_count()`."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="output directory (default: demo-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the sampling")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (< 1 min), for tests")
    parser.add_argument("--steps-vae", type=int, help="VAE training steps")
    parser.add_argument("--steps-dalle", type=int, help="DALLE training steps")
    parser.add_argument("--steps-clip", type=int, help="CLIP training steps")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="torch CPU threads (default: the CPUs this process may use)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(max(args.threads, 1))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    cfg = settings(args.quick)
    for flag in ("steps_vae", "steps_dalle", "steps_clip"):
        if getattr(args, flag) is not None:
            if getattr(args, flag) < 1:
                parser.error(f"--{flag.replace('_', '-')} must be at least 1")
            setattr(cfg, flag, getattr(args, flag))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    # 1. data ------------------------------------------------------------------------------
    t = time.perf_counter()
    specs, images = make_dataset(cfg.samples, args.seed)
    tokenizer = ByteTokenizer()
    captions = [spec.caption() for spec in specs]
    text = tokenizer.tokenize(captions, TEXT_SEQ_LEN)  # [N, 48], 0 = padding
    print(f"data: {len(specs)} images {IMAGE_SIZE}x{IMAGE_SIZE}, e.g. '{captions[0]}'", flush=True)
    t = lap("data", t)

    # 2a. discrete VAE -----------------------------------------------------------------------
    vae = DiscreteVAE(image_size=IMAGE_SIZE, num_layers=2, **cfg.vae)

    def vae_loss(index, step):
        return vae(images[index], return_loss=True, temp=vae_temperature(step, cfg.steps_vae))

    vae_losses = train("vae", vae, cfg.steps_vae, cfg.batch_vae, len(images), vae_loss,
                       lr=cfg.lr_vae, seed=args.seed + 1,
                       extra=lambda step: {"temp": f"{vae_temperature(step, cfg.steps_vae):.3f}"})
    with torch.no_grad():
        codes = torch.cat([vae.get_codebook_indices(chunk) for chunk in images.split(256)])  # [N, 64]
        recon_idx = torch.arange(12)
        recons = vae.decode(codes[recon_idx])
        hard_mse = float(torch.cat([
            (vae.decode(c) - x).pow(2).mean(dim=(1, 2, 3))
            for c, x in zip(codes.split(256), images.split(256))
        ]).mean())
    used = int(codes.unique().numel())
    print(f"vae: {used}/{vae.num_tokens} codes used, reconstruction MSE {hard_mse:.5f}", flush=True)
    t = lap("vae", t)

    # 2b. DALLE on the codes -------------------------------------------------------------------
    dalle = DALLE(vae=vae, num_text_tokens=tokenizer.vocab_size, text_seq_len=TEXT_SEQ_LEN,
                  tokenizer=tokenizer, **cfg.dalle)

    def dalle_loss(index, step):
        return dalle(text[index], codes[index], return_loss=True)

    dalle_losses = train("dalle", dalle, cfg.steps_dalle, cfg.batch_dalle, len(images),
                         dalle_loss, lr=cfg.lr_dalle, seed=args.seed + 2)
    t = lap("dalle", t)

    # 2c. CLIP --------------------------------------------------------------------------------
    clip = CLIP(num_text_tokens=tokenizer.vocab_size, text_seq_len=TEXT_SEQ_LEN,
                visual_image_size=IMAGE_SIZE, visual_patch_size=8, **cfg.clip)

    def clip_loss(index, step):
        # no text mask: generate_images(clip=) scores the padded prompts the same way
        return clip(text[index], images[index], return_loss=True)

    clip_losses = train("clip", clip, cfg.steps_clip, cfg.batch_clip, len(images), clip_loss,
                        lr=cfg.lr_clip, seed=args.seed + 3)
    t = lap("clip", t)

    # 3. save, reload, generate -----------------------------------------------------------------
    vae.save_pretrained(out / "vae")
    dalle.save_pretrained(out / "dalle")
    clip.save_pretrained(out / "clip")
    del dalle  # generation below uses only what is on disk
    dalle = DALLE.from_pretrained(out / "dalle").eval()
    clip = CLIP.from_pretrained(out / "clip").eval()
    assert dalle.tokenizer is not None, "the DALLE checkpoint should carry its tokenizer"

    prompts = [Spec(*p) for p in PROMPTS[: cfg.prompts]]
    results = []  # (spec, images sorted by CLIP score, scores, checker readings)
    pairs: list[tuple[Spec, Spec | None]] = []
    (out / "samples").mkdir(exist_ok=True)
    for i, spec in enumerate(tqdm(prompts, desc="  gen", unit="prompt", dynamic_ncols=True)):
        prompt_text = dalle.tokenizer.tokenize([spec.caption()] * cfg.per_prompt, TEXT_SEQ_LEN)
        generator = torch.Generator().manual_seed(args.seed * 1000 + i)
        generated, scores = dalle.generate_images(
            prompt_text, clip=clip, filter_thres=0.9, temperature=1.0, generator=generator,
        )
        order = scores.argsort(descending=True)
        generated, scores = generated[order], scores[order]
        seen = [judge(image) for image in generated]
        pairs += [(spec, s) for s in seen]
        results.append((spec, generated, scores, seen))
        under = [
            (f"{float(clip_score):.1f}: " + (f"{s.colour} {s.shape}" if s else "blank"),
             (20, 120, 40) if s and (s.colour, s.shape) == (spec.colour, spec.shape)
             else (180, 30, 30))
            for clip_score, s in zip(scores, seen)
        ]
        grid = image_rows([(spec.caption(), list(generated), under)], scale=4,
                          title="best CLIP score first; under each: score and what the pixel checker sees")
        grid.save(out / "samples" / f"{i:02d}-{slug(spec.caption())}.png")
    image_rows([(f"{spec.caption()}   ({tally(spec, seen)})", list(gen), None)
                for spec, gen, _, seen in results], scale=3,
               title=f"DALLE samples, best CLIP score first (seed {args.seed})").save(out / "samples.png")
    image_rows([("originals", list(images[recon_idx]), None),
                ("VAE reconstructions (from 8x8 codes)", list(recons), None)],
               scale=3).save(out / "reconstructions.png")
    loss_plot({"VAE": vae_losses, "DALLE": dalle_losses, "CLIP": clip_losses}, out / "loss.png")
    t = lap("generate", t)

    # 4. checker ---------------------------------------------------------------------------------
    generated_score = score(pairs)
    real = min(len(specs), 500)
    real_score = score([(specs[k], judge(images[k])) for k in range(real)])
    with torch.no_grad():
        recon_all = vae.decode(codes[:real])
    recon_score = score([(specs[k], judge(recon_all[k])) for k in range(real)])
    total = time.perf_counter() - started

    summary = {
        "seed": args.seed,
        "quick": args.quick,
        "steps": {"vae": cfg.steps_vae, "dalle": cfg.steps_dalle, "clip": cfg.steps_clip},
        "final_loss": {
            "vae": round(sum(vae_losses[-20:]) / len(vae_losses[-20:]), 5),
            "dalle": round(sum(dalle_losses[-20:]) / len(dalle_losses[-20:]), 5),
            "clip": round(sum(clip_losses[-20:]) / len(clip_losses[-20:]), 5),
        },
        "vae_codes_used": used,
        "vae_reconstruction_mse": round(hard_mse, 6),
        "checker": {
            "generated": {k: round(v, 3) for k, v in generated_score.items()},
            "real_images": {k: round(v, 3) for k, v in real_score.items()},
            "vae_reconstructions": {k: round(v, 3) for k, v in recon_score.items()},
            "generated_images": len(pairs),
        },
        "seconds": {**timings, "total": round(total, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    n = len(pairs)
    right = round(generated_score["colour"] * n)
    print()
    print(f"done in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"final losses: VAE {summary['final_loss']['vae']:.4f} (codes MSE {hard_mse:.4f}), "
          f"DALLE {summary['final_loss']['dalle']:.4f}, CLIP {summary['final_loss']['clip']:.4f}")
    print(f"checker: {right}/{n} generated images have the prompt's colour "
          f"({generated_score['colour']:.0%}); shape {generated_score['shape']:.0%}, "
          f"position {generated_score['position']:.0%}, size {generated_score['size']:.0%}, "
          f"all four {generated_score['all']:.0%}")
    print(f"         (same checker on real images: colour {real_score['colour']:.0%}, "
          f"shape {real_score['shape']:.0%}, all {real_score['all']:.0%}; "
          f"on VAE reconstructions: colour {recon_score['colour']:.0%}, "
          f"shape {recon_score['shape']:.0%}, all {recon_score['all']:.0%})")
    print(f"files in {out}/:")
    for name in ("samples.png", "samples/", "reconstructions.png", "loss.png", "summary.json",
                 "dalle/  (self-contained: vae/ and tokenizer/ inside)", "vae/", "clip/"):
        print(f"  {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
