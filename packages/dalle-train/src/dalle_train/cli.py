"""``dalle-train``: one command, a subcommand per job.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser
and sets ``run`` (``args -> exit code``) as the parser's default ``run``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from dalle_train import __version__
from dalle_train.errors import TrainError

#: modules under dalle_train.commands, in the order ``--help`` lists them
COMMANDS = ("vae", "dalle", "clip", "generate", "serve", "shards", "encode", "convert", "plugins", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, every subcommand included."""
    from importlib import import_module

    parser = argparse.ArgumentParser(
        prog="dalle-train",
        description="Train DiscreteVAE, DALLE and CLIP on image-text data and generate images.",
    )
    parser.add_argument("--version", action="version", version=f"dalle-train {__version__}")
    # the deepspeed launcher passes --local_rank=N before the command; backends read LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f"dalle_train.commands.{name}").register(subparsers)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser under it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def given_flags(argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every flag written on the command line (defaults left out), so a
    resumed run can tell a flag the user gave from one it may take from the checkpoint."""
    shadow = build_parser()
    for parser in _parsers(shadow):
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return set(vars(shadow.parse_args(argv))) - {"command", "run", "local_rank"}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; a `TrainError` becomes one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    try:
        return int(args.run(args) or 0)
    except TrainError as error:
        print(f"dalle-train {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        if getattr(args, "distributed_backend", "none") != "none":
            # an FSDP model is left in reference cycles: freed here, it frees the process group,
            # whose gloo threads are then joined now instead of at the interpreter's teardown
            # (a crash there: see `dalle_train.backends.fsdp.release_dtensor_caches`)
            gc.collect()


if __name__ == "__main__":
    sys.exit(main())
