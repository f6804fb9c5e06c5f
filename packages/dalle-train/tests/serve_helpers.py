"""Shared by the serve tests: a tiny DALLE trained through the command line, a gate that holds
the worker before each batch, JSON requests over HTTP, and the images a request should get
when made alone."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dalle_core import DALLE
from dalle_train.imageio import to_tensor
from dalle_train.serve.requests import image_seed, parse_request
from dalle_train.training.layout import find_model_dir


class Gate:
    """Holds the worker before each batch until opened (``on_batch`` hook); records the batches."""

    def __init__(self, opened: bool = True):
        self.event = threading.Event()
        if opened:
            self.event.set()
        self.batches: list[list[tuple[str, int]]] = []
        self.reached = threading.Semaphore(0)

    def __call__(self, rows) -> None:
        self.batches.append([(row.job.request.prompt, row.index) for row in rows])
        self.reached.release()
        assert self.event.wait(60), "the test never opened the gate"


def train_tiny_dalle(out: Path, vae_dir: Path, steps: int = 3) -> Path:
    """A tiny DALLE trained for ``steps`` steps on the built-in shapes (bytes tokenizer, 32 px,
    4 x 4 codes): its run directory."""
    from conftest import dalle_args

    from dalle_train.cli import main

    assert main(dalle_args(out, vae_dir, "--max-steps", str(steps))) == 0
    return out


def load_dalle(run_dir: Path) -> DALLE:
    return DALLE.from_pretrained(find_model_dir(run_dir)).eval()


def post(url: str, body: Any, timeout: float = 60) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST ``body`` as JSON (bytes as they are) -> (status, JSON answer, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def png_pixels(data: bytes) -> torch.Tensor:
    """A PNG's pixels ``[C, H, W]`` in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        return to_tensor(image.convert("RGB"))


def images_alone(dalle: DALLE, body: dict[str, Any]) -> torch.Tensor:
    """The images ``[N, 3, H, W]`` (as 8-bit PNG pixels are) that ``body`` asks for, each made
    alone with `DALLE.generate_images` and its own generator (rounded to 8 bits, as a PNG)."""
    request = parse_request(body, dalle, max_images=64)
    settings = request.sampling
    images = []
    for index in range(request.num_images):
        generator = torch.Generator().manual_seed(image_seed(request.seed, index))
        image = dalle.generate_images(
            request.text, filter_thres=settings.top_k, top_p=settings.top_p, temperature=settings.temperature,
            cond_scale=settings.cond_scale, generator=[generator],
        )[0]
        images.append((image.clamp(0, 1) * 255).round() / 255)
    return torch.stack(images)
