"""One generation request, parsed once from its JSON body into a typed `GenerationRequest`.

Every field is checked against the loaded model and the server's limits; a bad one is a
`RequestError` naming the field and what would be valid, which the page shows and the JSON
endpoint returns with status 400.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dalle_core import DALLE
from dalle_train.prompts import PromptTooLong, UnknownTokenIds, prompt_ids

#: the sampling settings a request may give, with the defaults of ``dalle-train generate``
DEFAULTS: dict[str, Any] = {"top_k": 0.9, "top_p": None, "temperature": 1.0, "cond_scale": 1.0}
FIELDS = ("prompt", "num_images", "top_k", "top_p", "temperature", "cond_scale", "seed")


class RequestError(ValueError):
    """A request field that cannot be used: ``field`` names it, the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingSettings:
    """What decides how codes are drawn; requests with equal settings are batched together."""

    top_k: float
    top_p: float | None
    temperature: float
    cond_scale: float


@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class GenerationRequest:
    """A checked request: the prompt and its token ids ``[1, text_seq_len]``, how many images,
    the sampling settings and the seed (image ``i`` is drawn from `image_seed` ``(seed, i)``)."""

    prompt: str
    text: torch.Tensor
    num_images: int
    sampling: SamplingSettings
    seed: int

    def describe(self) -> dict[str, Any]:
        """The request as JSON values (what the page shows and each PNG carries)."""
        return {"prompt": self.prompt, "num_images": self.num_images, "seed": self.seed,
                **asdict(self.sampling)}


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` of a request: the same image for the same seed,
    prompt and settings, whatever else is batched with it and however many images are asked."""
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % 2**63


def parse_request(body: Any, dalle: DALLE, max_images: int) -> GenerationRequest:
    """The JSON ``body`` of a request -> `GenerationRequest`; `RequestError` naming the first bad
    field. ``prompt`` is required; ``num_images`` defaults to 1, ``seed`` to a random one."""
    if not isinstance(body, dict):
        raise RequestError("body", f"the request must be a JSON object with the fields {', '.join(FIELDS)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt", "the prompt is empty: write what the images should show")
    prompt = prompt.strip()
    num_images = _integer(body, "num_images", 1)
    if not 1 <= num_images <= max_images:
        raise RequestError("num_images", f"num_images {num_images}: this server makes 1 to {max_images} "
                                         f"images per request")
    top_k = _number(body, "top_k")
    if not 0 <= top_k < 1:
        raise RequestError("top_k", f"top_k {top_k}: must be in [0, 1) (0.9 keeps the best 10 % of codes)")
    top_p = body.get("top_p", DEFAULTS["top_p"])
    if top_p is not None:
        top_p = _number(body, "top_p")
        if not 0 < top_p <= 1:
            raise RequestError("top_p", f"top_p {top_p}: must be in (0, 1], or null for none")
    temperature = _number(body, "temperature")
    if not 0 <= temperature <= 10:
        raise RequestError("temperature", f"temperature {temperature}: must be in [0, 10] (0 = always the "
                                          f"likeliest code)")
    cond_scale = _number(body, "cond_scale")
    if not 0 <= cond_scale <= 100:
        raise RequestError("cond_scale", f"cond_scale {cond_scale}: must be in [0, 100] (1 = no guidance)")
    seed = body.get("seed")
    seed = random.SystemRandom().randrange(2**31) if seed is None else _integer(body, "seed", 0)
    if not 0 <= seed < 2**63:
        raise RequestError("seed", f"seed {seed}: must be in [0, 2**63)")
    text = prompt_tokens(prompt, dalle)
    sampling = SamplingSettings(top_k, top_p, temperature, cond_scale)
    return GenerationRequest(prompt, text, num_images, sampling, seed)


def prompt_tokens(prompt: str, dalle: DALLE) -> torch.Tensor:
    """The prompt's ids ``[1, text_seq_len]``; `RequestError` when the model cannot read it."""
    try:
        return prompt_ids(prompt, dalle)
    except PromptTooLong as error:
        raise RequestError("prompt", f"{error}: shorten it") from error
    except UnknownTokenIds as error:
        raise RequestError("prompt", f"{error}: the model's tokenizer cannot write this prompt") from error


def _number(body: dict, field: str) -> float:
    value = body.get(field, DEFAULTS[field])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(field, f"{field} must be a number, not {value!r}")
    return float(value)


def _integer(body: dict, field: str, default: int) -> int:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RequestError(field, f"{field} must be a whole number, not {value!r}")
    return value
