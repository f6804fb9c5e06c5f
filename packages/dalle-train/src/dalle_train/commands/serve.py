"""``dalle-train serve``: a web page to generate images from a trained DALLE, and a JSON endpoint.

::

    pip install "dalle-train[serve]"
    dalle-train serve --dalle-path OUT [--clip-path CLIP] [--host 127.0.0.1] [--port 7860]

The model is loaded once. Open the printed address: type a prompt, choose the number of
images, top-k, top-p, temperature, guidance scale and seed, press Generate; images appear as
their batch finishes, ranked by the CLIP score with ``--clip-path``, each downloadable as a PNG
that carries its settings. Scripts POST the same fields as JSON to ``/generate`` and get the
PNGs as base64 with their scores. Requests queue and run together in batches of up to
``--max-batch`` images; when ``--queue-size`` requests wait, more are answered "busy, retry".
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dalle_train.choices import add_tokenizer_flags, add_vae_flags
from dalle_train.commands.common import device_from_flag
from dalle_train.commands.generate import add_dalle_path_flag, load_clip, load_dalle
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag
from dalle_train.training.layout import find_model_dir

INSTALL_HINT = 'pip install "dalle-train[serve]" (FastAPI and uvicorn)'


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a web page (and a JSON endpoint) that generates images from a trained DALLE",
        description=__doc__.split("\n\n")[0],
    )
    add_dalle_path_flag(parser)
    add_flag(parser, "--clip-path", metavar="PATH",
             help="a trained CLIP checkpoint: images ranked by its score")
    add_flag(parser, "--host", default="127.0.0.1",
             help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every network)")
    add_flag(parser, "--port", type=int, default=7860, help="port to listen on (default: 7860)")
    add_flag(parser, "--max-images", type=int, default=16, metavar="N",
             help="most images one request may ask for (default: 16)")
    add_flag(parser, "--max-batch", type=int, default=4, metavar="N",
             help="most images generated at once, shared by the requests with the same settings (default: 4)")
    add_flag(parser, "--queue-size", type=int, default=32, metavar="N",
             help="requests that may wait; more are answered 'busy, retry' (default: 32)")
    add_flag(parser, "--device", default="auto",
             help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    add_tokenizer_flags(parser, default_help="the checkpoint's own")
    add_vae_flags(parser, default_help="the checkpoint's own; these flags check or replace it")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the model once and serve until interrupted."""
    for flag, value in (("--max_images", args.max_images), ("--max_batch", args.max_batch),
                        ("--queue_size", args.queue_size)):
        if value < 1:
            raise TrainError(f"{flag} {value}: must be at least 1")
    if not 0 < args.port < 65536:
        raise TrainError(f"--port {args.port}: must be in 1 .. 65535")
    try:
        from dalle_train.serve.server import Server, is_loopback
    except ModuleNotFoundError as error:
        raise TrainError(f"dalle-train serve needs {error.name}: {INSTALL_HINT}") from error
    device = device_from_flag(args.device)
    dalle = load_dalle(args, device)
    clip = load_clip(args.clip_path, dalle, device) if args.clip_path else None
    server = Server(dalle, clip, host=args.host, port=args.port, max_images=args.max_images,
                    max_batch=args.max_batch, max_waiting=args.queue_size,
                    model_name=find_model_dir(args.dalle_path).name)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: other machines on the network can reach this server and "
              f"use its model (there is no login); use --host 127.0.0.1 to keep it to this machine",
              file=sys.stderr)
    print(f"serving {server.service.model_name} on {server.url} (Ctrl-C stops)", flush=True)
    server.serve_forever()
    return 0
