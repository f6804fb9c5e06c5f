"""``dalle-train generate``: images for text prompts from a trained DALLE checkpoint.

::

    dalle-train generate --dalle-path OUT --text "a red circle|a blue square" --num-images 16

The checkpoint is enough: it carries its VAE and its tokenizer. ``--dalle-path`` is a model
directory (``config.json``), a run's output directory or its ``checkpoints/`` folder (the newest
checkpoint). Per prompt (prompts are separated by ``|``) it writes::

    OUTPUTS/<prompt as a file name>/0.png, 1.png, ...   the images (with --clip-path: best first)
    OUTPUTS/<prompt as a file name>/grid.png             all of them, in the same order
    OUTPUTS/<prompt as a file name>/caption.txt          the text the images were made from
    OUTPUTS/<prompt as a file name>/scores.json          with --clip-path: each file's CLIP score

Sampling: ``--top-k`` keeps the top ``1 - top_k`` share of the image codebook at each step, as
upstream's ``generate.py`` (``--top_k 0.9`` = ``filter_thres=0.9``: the best 10 % of codes);
``--top-p`` then applies nucleus sampling; ``--temperature``; ``--cond-scale`` for
classifier-free guidance. The same ``--seed``, prompt and ``--batch-size`` give the same
images: each prompt has its own random generator, seeded from the seed and the prompt.
``--compile`` (CPU, fp32) runs the cached step compiled ahead of time: the same images, faster,
after tens of seconds of compiling per batch size, once: the compiled step is kept on disk.
"""

from __future__ import annotations

import argparse
import math
import random
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dalle_core import CLIP, DALLE
from dalle_core.interfaces import Tokenizer
from dalle_core.plugins import vae_plugin_name
from dalle_core.pretrained import atomic_write_bytes, write_json
from dalle_train.choices import (
    TAMING_VAES,
    TokenizerFlags,
    VaeFlags,
    add_tokenizer_flags,
    add_vae_flags,
    as_train_error,
    tokenizer_from_args,
    vae_choice,
    vae_from_args,
)
from dalle_train.commands.common import device_from_flag
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.pictures import image_grid, save_png, slug
from dalle_train.prime_image import read_image, read_mask
from dalle_train.prompts import PromptTooLong, UnknownTokenIds, prompt_ids
from dalle_train.training.layout import find_model_dir
from dalle_train.training.precision import PRECISIONS, Precision

GRID_CELL = 128  # grids upscale small images to at least this many pixels per side


def register(subparsers: Any) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images for text prompts from a trained DALLE checkpoint",
        description=__doc__.split("\n\n")[0],
    )
    add_dalle_path_flag(parser)
    add_flag(parser, "--text", metavar="PROMPTS",
             help="prompts separated by '|' (optional with --gentext: start from nothing)")
    add_flag(parser, "--outputs-dir", default="./outputs", type=Path, metavar="DIR",
             help="where the images go, a folder per prompt (default: ./outputs)")
    add_flag(parser, "--num-images", type=int, default=128, metavar="N",
             help="images per prompt (default: 128)")
    add_flag(parser, "--batch-size", type=int, default=4, metavar="N",
             help="images generated at once (default: 4)")
    add_flag(parser, "--top-k", type=float, default=0.9, metavar="THRES",
             help="top-k filter threshold, as upstream: keep the top (1 - THRES) share of the "
                  "codebook at each step (default: 0.9)")
    add_flag(parser, "--top-p", type=float, metavar="P", help="nucleus sampling: keep the codes "
             "holding probability mass P (after --top-k)")
    add_flag(parser, "--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    add_flag(parser, "--cond-scale", type=float, default=1.0, metavar="SCALE",
             help="classifier-free guidance scale; 1 = none (default: 1)")
    add_flag(parser, "--seed", type=int, metavar="N",
             help="random seed; the same seed gives the same images (default: a random one, printed)")
    add_flag(parser, "--gentext", "--gentxt", action="store_true",
             help="complete each prompt with the DALLE's text model first (saved as caption.txt)")
    add_flag(parser, "--truncate-captions", action="store_true",
             help="cut prompts longer than the model's text length instead of refusing them")
    add_flag(parser, "--clip-path", metavar="PATH",
             help="a trained CLIP checkpoint: images saved best first, scores in scores.json")
    add_flag(parser, "--device", default="auto",
             help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    add_flag(parser, "--precision", choices=PRECISIONS, default="fp32",
             help="transformer precision (autocast); the VAE always decodes in fp32 (default: fp32)")
    add_flag(parser, "--compile", action="store_true",
             help="CPU, fp32: run the generation step compiled ahead of time (generate_images("
                  "compile=True)); compiling takes tens of seconds once per batch size, so make "
                  "--num_images a multiple of --batch_size")
    add_flag(parser, "--img", type=Path, metavar="PATH",
             help="an image to start from: its first codes prime every image (--num-init-img-tokens), "
                  "or with --mask only its masked part is generated (its largest centred square, "
                  "resized to the model's image size)")
    add_flag(parser, "--num-init-img-tokens", type=int, metavar="N",
             help="with --img: keep the image's first N codes (raster order) and generate the rest; "
                  "without it, 14/32 of the codes are kept, as generate_images does")
    add_flag(parser, "--mask", type=Path, metavar="PNG",
             help="with --img: inpaint; white pixels of this PNG (the --img file's size) are generated, "
                  "black ones kept (every code whose cell a white pixel touches is sampled)")
    add_tokenizer_flags(parser, default_help="the checkpoint's own")
    add_vae_flags(parser, default_help="the checkpoint's own; these flags check or replace it")
    parser.set_defaults(run=run)


def add_dalle_path_flag(parser: argparse.ArgumentParser) -> None:
    """``--dalle-path``, the checkpoint to generate from (what `load_dalle` reads)."""
    add_flag(parser, "--dalle-path", required=True, metavar="PATH",
             help="a DALLE checkpoint directory, a dalle-train dalle output directory or its "
                  "checkpoints/ folder (the newest checkpoint)")


def run(args: argparse.Namespace) -> int:
    """Generate ``--num-images`` images per prompt and write them under ``--outputs-dir``."""
    check_numbers(args)
    device = device_from_flag(args.device)
    if args.compile and (device.type != "cpu" or args.precision != "fp32"):
        raise TrainError(
            f"--compile compiles the generation step for the CPU in fp32, not --device {device} "
            f"--precision {args.precision}: drop --compile or use --device cpu --precision fp32"
        )
    dalle = load_dalle(args, device)
    start = start_image(args, dalle, device)
    clip = load_clip(args.clip_path, dalle, device) if args.clip_path else None
    prompts = args.text.split("|") if args.text is not None else [""]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if args.seed is None:
        print(f"seed {seed} (pass --seed {seed} to get these images again)")
    precision = Precision(args.precision, device)
    used: set[str] = set()
    for index, prompt in enumerate(prompts):
        prompt = prompt.strip()
        folder = args.outputs_dir / unique_name(slug(prompt) or f"prompt-{index}", used)
        generator = torch.Generator(device).manual_seed(prompt_seed(seed, prompt))
        with precision.autocast():
            text, caption = prompt_tokens(args, dalle, prompt, generator)
            images, scores = generate(args, dalle, clip, text, generator, desc=caption, start_from=start)
        write_outputs(folder, caption, images, scores)
        if start:
            write_start(folder, start)
        print(f"{len(images)} images for {caption!r} in {folder}")
    return 0


def check_numbers(args: argparse.Namespace) -> None:
    """Flag values out of range are a `TrainError` naming the flag."""
    if args.text is None and not args.gentext:
        raise TrainError("give prompts with --text 'a prompt|another prompt' (or use --gentext)")
    if args.num_images < 1 or args.batch_size < 1:
        raise TrainError("--num_images and --batch_size must be at least 1")
    if not 0 <= args.top_k < 1:
        raise TrainError(
            f"--top_k {args.top_k}: the threshold must be in [0, 1) (0.9 keeps the best 10 % of codes)"
        )
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise TrainError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.temperature < 0:
        raise TrainError(f"--temperature {args.temperature}: must be >= 0 (0 = always the likeliest code)")
    needs_img = [flag for flag, given in (("--num_init_img_tokens", args.num_init_img_tokens is not None),
                                         ("--mask", args.mask is not None)) if given]
    if needs_img and args.img is None:
        raise TrainError(f"{' and '.join(needs_img)} need(s) --img, the image to start from")
    if len(needs_img) == 2:
        raise TrainError("--mask and --num_init_img_tokens both say which codes of --img are kept: give one")


def start_image(args: argparse.Namespace, dalle: DALLE, device: torch.device) -> dict[str, Any]:
    """The `generate_images` keywords of ``--img`` and ``--num-init-img-tokens`` or ``--mask``
    (``img [1, C, H, W]``, ``img_mask [1, 1, H, W]``); empty without ``--img``."""
    if args.img is None:
        return {}
    img, file_size = read_image(args.img, dalle.image_size, dalle.channels)
    if args.mask is not None:
        mask = read_mask(args.mask, dalle.image_size, file_size)
        return {"img": img.to(device), "img_mask": mask.to(device)}
    codes, count = args.num_init_img_tokens, dalle.image_seq_len
    if codes is not None and not 0 <= codes < count:
        raise TrainError(f"--num_init_img_tokens {codes}: the model's images have {count} codes, so give 0 "
                         f"to {count - 1}")
    return {"img": img.to(device), "num_init_img_tokens": codes}


def write_start(folder: Path, start: dict[str, Any]) -> None:
    """``start.png``: the image generation started from, as the model took it, its generated
    part (``--mask``) shown darkened."""
    img = start["img"].float().cpu()  # [1, C, H, W]
    if "img_mask" in start:
        img = torch.where(start["img_mask"].cpu(), img * 0.3, img)
    save_png(image_grid(img, nrow=1, padding=0), folder / "start.png")


def load_dalle(args: argparse.Namespace, device: torch.device) -> DALLE:
    """The checkpoint's DALLE on ``device``, in eval mode, with a tokenizer flag's tokenizer
    and a VAE flag's VAE in place of its own (both checked against the model)."""
    directory = find_model_dir(args.dalle_path)
    vae_flags = VaeFlags.from_args(args)
    choice = vae_choice(vae_flags)  # flag combinations first: fail before loading anything
    dalle = as_train_error(
        f"--dalle_path {directory}", lambda: DALLE.from_pretrained(directory, map_location=device)
    ).eval()
    tokenizer = tokenizer_from_args(TokenizerFlags.from_args(args), default=None)
    if tokenizer is not None:
        check_tokenizer(tokenizer, dalle)
        dalle.tokenizer = tokenizer
    if dalle.tokenizer is None:
        raise TrainError(
            f"{directory} holds no tokenizer: pass the one it was trained with (--tokenizer NAME, "
            f"--bpe_path FILE, --chinese)"
        )
    own = vae_plugin_name(dalle.vae)
    if choice.path is None and not choice.kwargs and choice.name is not None:
        # --vae NAME or a bare --taming: the checkpoint's own VAE must be that one
        if own != choice.name and not (args.taming and own in TAMING_VAES):
            raise TrainError(
                f"{directory} was trained with VAE {own!r}, not {choice.name!r}: drop --vae/--taming"
            )
    elif choice.name is not None:
        vae = vae_from_args(vae_flags)
        check_vae(vae, dalle)
        dalle.vae = vae.to(device).eval()
    return dalle


def check_tokenizer(tokenizer: Tokenizer, dalle: DALLE) -> None:
    """A tokenizer given by flags must fit the model's text embedding."""
    if tokenizer.vocab_size > dalle.num_text_tokens:
        raise TrainError(
            f"tokenizer {tokenizer.plugin_name!r} has {tokenizer.vocab_size} ids but the model "
            f"knows {dalle.num_text_tokens}: pass the tokenizer it was trained with, or none"
        )


def check_vae(vae: Any, dalle: DALLE) -> None:
    """A VAE given by flags must decode the model's codes: same codebook, grid and channels."""
    want = (dalle.num_image_tokens, dalle.fmap_size, dalle.channels)
    have = (vae.num_tokens, vae.fmap_size, vae.channels)
    if have != want:
        raise TrainError(
            f"the VAE from the flags ({have[0]} codes, {have[1]}x{have[1]} grid, {have[2]} channels) "
            f"cannot decode this model's codes ({want[0]} codes, {want[1]}x{want[1]} grid, "
            f"{want[2]} channels): drop the VAE flags to use the checkpoint's own VAE"
        )


def load_clip(path: str, dalle: DALLE, device: torch.device) -> CLIP:
    """The CLIP at ``path`` on ``device``; it must read the DALLE's text and images."""
    directory = find_model_dir(path)
    clip = as_train_error(
        f"--clip_path {directory}", lambda: CLIP.from_pretrained(directory, map_location=device)
    ).eval()
    problems = []
    if clip.text_seq_len < dalle.text_seq_len:
        problems.append(f"text length {clip.text_seq_len} < the DALLE's {dalle.text_seq_len}")
    if clip.num_text_tokens < dalle.tokenizer.vocab_size:
        problems.append(f"{clip.num_text_tokens} text ids < the tokenizer's {dalle.tokenizer.vocab_size}")
    if (clip.visual_image_size, clip.channels) != (dalle.image_size, dalle.channels):
        problems.append(
            f"images {clip.visual_image_size} px x {clip.channels} channels, not the DALLE's "
            f"{dalle.image_size} px x {dalle.channels}"
        )
    if problems:
        raise TrainError(f"--clip_path {directory} does not fit the DALLE: {'; '.join(problems)}")
    return clip


def prompt_seed(seed: int, prompt: str) -> int:
    """The generator seed of one prompt: the same for the same seed and prompt, whatever
    other prompts are given."""
    return (seed * 0x9E3779B1 + zlib.crc32(prompt.encode())) % 2**63


def unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... when an earlier prompt of this run took it."""
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def prompt_tokens(
    args: argparse.Namespace, dalle: DALLE, prompt: str, generator: torch.Generator
) -> tuple[torch.Tensor, str]:
    """``(text [1, text_seq_len], caption)``: the prompt's ids, or with ``--gentext`` the
    prompt completed by the DALLE's text model (and its decoded text)."""
    device = dalle.text_emb.weight.device
    if args.gentext:
        text, texts = dalle.generate_texts(
            prompt, filter_thres=args.top_k, top_p=args.top_p, temperature=args.temperature,
            generator=generator,
        )
        return text.to(device), texts[0]
    try:
        text = prompt_ids(prompt, dalle, truncate=args.truncate_captions)
    except PromptTooLong as error:
        raise TrainError(f"{error}: shorten it or pass --truncate_captions") from error
    except UnknownTokenIds as error:
        raise TrainError(f"{error}: use the tokenizer it was trained with") from error
    return text.to(device), prompt


def generate(
    args: argparse.Namespace,
    dalle: DALLE,
    clip: CLIP | None,
    text: torch.Tensor,
    generator: torch.Generator,
    desc: str,
    start_from: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``--num-images`` images ``[N, C, H, W]`` (fp32, CPU) for ``text [1, L]`` in batches of
    ``--batch-size``, and their CLIP scores ``[N]`` when a CLIP is given; ``start_from``: the
    `start_image` keywords (priming or inpainting)."""
    images, scores = [], []
    with tqdm(total=args.num_images, desc=desc[:40] or "generating", unit="image", dynamic_ncols=True) as bar:
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            batch = text.expand(count, -1)  # [count, L]
            output = dalle.generate_images(
                batch, clip=clip, filter_thres=args.top_k, top_p=args.top_p,
                temperature=args.temperature, cond_scale=args.cond_scale, generator=generator,
                compile=args.compile, **(start_from or {}),
            )
            if clip is not None:
                output, score = output
                scores.append(score.float().cpu())
            images.append(output.float().cpu())
            bar.update(count)
    return torch.cat(images), (torch.cat(scores) if clip is not None else None)


def write_outputs(folder: Path, caption: str, images: torch.Tensor, scores: torch.Tensor | None) -> None:
    """``i.png`` per image and ``grid.png`` (best CLIP score first when ``scores`` are given),
    ``caption.txt``, and ``scores.json`` with the scores."""
    folder.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        order = scores.argsort(descending=True, stable=True)
        images, scores = images[order], scores[order]
    for i, image in enumerate(images):
        save_png(image_grid(image[None], nrow=1, padding=0), folder / f"{i}.png")
    scale = max(1, GRID_CELL // images.shape[-1])
    nrow = math.ceil(math.sqrt(len(images)))
    save_png(image_grid(images, nrow=nrow, scale=scale), folder / "grid.png")
    atomic_write_bytes(folder / "caption.txt", (caption + "\n").encode())
    if scores is not None:
        ranked = [{"file": f"{i}.png", "score": round(float(score), 6)} for i, score in enumerate(scores)]
        write_json(folder / "scores.json", {"caption": caption, "best_first": ranked})
