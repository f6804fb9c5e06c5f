"""Pre-encoded shards: the image codes a VAE gave once (`dalle-train encode`), with every
caption line, as WebDataset shards and a manifest saying what made them.

A folder of pre-encoded shards holds ``00000.tar``, ``00001.tar``... whose sample ``KEY`` is
``KEY.codes.npy`` (the image's codes, int32 ``[image_seq_len]``, NumPy's format, read without
pickles), ``KEY.txt`` (every caption line), ``KEY.json`` (where the pair came from) and, when
a tokenizer was given,
``KEY.tokens.json`` (each line's token ids); and ``manifest.json``: the format, the VAE (its
registry name, class, config and a SHA-256 of its weights), the tokenizer's name, class and
config (or None),
image size, codes per image, the crop, the samples per shard and what was skipped.

`dalle-train dalle --tokens DIR` trains from them without reading pixels or running the VAE's
encoder; a DALLE whose VAE differs from the manifest's (another weights hash) is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dalle_train.data.report import SkipReport
from dalle_train.data.sample import Sample
from dalle_train.data.seeding import generator
from dalle_train.data.stream import caption_lines, source_of
from dalle_train.errors import TrainError

MANIFEST = "manifest.json"
FORMAT = "dalle-train-tokens/1"
CODES = "codes.npy"
CAPTIONS = "txt"
TOKENS = "tokens.json"


def weights_sha256(module: Any) -> str | None:
    """SHA-256 over a module's state (every tensor's name, dtype, shape and bytes, in name
    order); None for an object that is not an ``nn.Module``."""
    if not isinstance(module, nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def identity(part: Any) -> dict[str, Any] | None:
    """What names a VAE or tokenizer in a manifest: registry name, class, config, weights hash."""
    if part is None:
        return None
    config = getattr(part, "config", None)
    config = config() if callable(config) else config  # a tokenizer's is a method, a model's a dict
    return {
        "name": getattr(part, "plugin_name", None) or type(part).__name__,
        "class": f"{type(part).__module__}.{type(part).__qualname__}",
        "config": config if isinstance(config, dict) else None,
        "weights_sha256": weights_sha256(part),
    }


def codes_bytes(codes: torch.Tensor) -> bytes:
    """``[m]`` codes as the bytes of a ``.npy`` file of int32."""
    buffer = io.BytesIO()
    np.save(buffer, codes.to(torch.int32).cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def read_codes(data: bytes) -> torch.Tensor:
    """The ``[m]`` int64 codes of a ``.npy`` file's bytes (pickles refused)."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-d integer array, got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(array.astype(np.int64))


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder``'s manifest; a `TrainError` naming ``--tokens`` when it is missing or not ours."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise TrainError(f"--tokens {folder} is not a folder: give the --output of dalle-train encode")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"--tokens {folder} has no {MANIFEST}: give the --output of dalle-train "
                         f"encode") from None
    except (OSError, ValueError) as error:
        raise TrainError(f"--tokens: {path} cannot be read ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrainError(f"--tokens: {path} is not a manifest of dalle-train encode (format {FORMAT})")
    return manifest


def check_vae(manifest: dict[str, Any], vae: Any, folder: Path) -> None:
    """A `TrainError` naming both VAEs when ``vae`` is not the one that encoded ``folder``."""
    made, have = manifest["vae"], identity(vae)
    assert have is not None
    if made.get("weights_sha256") != have["weights_sha256"]:
        raise TrainError(
            f"--tokens {folder} was encoded by VAE {made.get('name')!r} ({made.get('class')}, weights "
            f"sha256 {str(made.get('weights_sha256'))[:12]}...), but this DALLE's VAE is {have['name']!r} "
            f"({have['class']}, weights sha256 {str(have['weights_sha256'])[:12]}...): train with the "
            f"VAE that encoded them (--vae-path), or encode again with this one"
        )


class CodeDecoder:
    """Raw pre-encoded sample -> `Sample` whose ``image`` is its codes (``LongTensor[m]``) and
    whose caption is one of its lines, drawn from ``(seed, epoch, shard, index)``; None (told
    to ``report``) for a sample without codes or caption, or with unreadable ones."""

    def __init__(self, image_seq_len: int, seed: int = 0, report: SkipReport | None = None) -> None:
        self.image_seq_len, self.seed = image_seq_len, seed
        self.report = SkipReport() if report is None else report

    def __call__(self, raw: dict[str, Any], epoch: int, shard: int, index: int) -> Sample | None:
        source = source_of(raw)
        if CODES not in raw:
            self.report.add("missing_image", source, f"no {CODES} file in the sample")
            return None
        lines = caption_lines(raw, CAPTIONS, self.report)
        if lines is None:
            return None
        try:
            codes = read_codes(raw[CODES])
        except ValueError as error:
            self.report.add("corrupt_image", source, f"unreadable codes ({error})")
            return None
        if codes.shape[0] != self.image_seq_len:
            self.report.add("corrupt_image", source, f"{codes.shape[0]} codes, not {self.image_seq_len}")
            return None
        rng = generator(self.seed, epoch, shard, index)
        caption = lines[int(torch.randint(len(lines), (1,), generator=rng))]
        return Sample(codes, caption, source)
