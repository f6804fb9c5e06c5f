"""``dalle-train plugins [--json]``: every registered name per hook, where it comes from, and
whether it can be used here (``triton not installed``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dalle_core.plugins import KINDS, describe_plugins
from dalle_train.errors import TrainError
from dalle_train.flags import add_flag


def register(subparsers: Any) -> None:
    """Add the ``plugins`` subcommand."""
    parser = subparsers.add_parser(
        "plugins",
        help="list the installed tokenizers, VAEs, attention kernels and distributed backends",
        description=__doc__,
    )
    add_flag(parser, "--json", action="store_true",
             help="print JSON: {kind: [{name, package, version, usable, reason, description}]}")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the plugin listing as a table, or as JSON with ``--json``."""
    try:
        rows = describe_plugins()
    except (ValueError, TypeError, ImportError) as error:  # a broken or duplicate plugin
        raise TrainError(f"the installed plugins could not be loaded: {error}") from error
    listing: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for row in rows:
        entry = row._asdict()
        del entry["kind"]
        listing[row.kind].append(entry)
    print(json.dumps(listing, indent=2) if args.json else table(listing))
    return 0


def table(listing: dict[str, list[dict[str, Any]]]) -> str:
    """One aligned section per kind of plugin: name, package, version, usable (or why not),
    description."""
    header = ("NAME", "PACKAGE", "VERSION", "USABLE", "DESCRIPTION")
    cells = {
        kind: [
            (e["name"], e["package"], e["version"], "yes" if e["usable"] else f"no: {e['reason']}",
             e["description"])
            for e in entries
        ]
        for kind, entries in listing.items()
    }
    every = [header] + [row for rows in cells.values() for row in rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]

    lines: list[str] = []
    for kind, rows in cells.items():
        lines += [f"{kind} (hook {KINDS[kind]}):", "  " + line(header).rstrip()]
        lines += ["  " + line(row).rstrip() for row in rows] or ["  (none)"]
        lines.append("")
    return "\n".join(lines).rstrip()
