"""Finding the files of an image(-text) folder: one sorted pass over the tree.

Folders are walked depth-first in name order (so the sample order never depends on the file
system), hidden files and folders (names starting with ".", such as macOS's ``._x.jpg``) are
ignored, symlinked folders are followed once. An image pairs with the ``.txt`` file of the same
stem in the same folder (``cat.png`` with ``cat.txt``); the caption lines are read here, once,
so empty captions are reported before training starts.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dalle_train.data.images import IMAGE_EXTENSIONS
from dalle_train.data.report import LOGGER, SkipReport
from dalle_train.errors import TrainError

CAPTION_EXTENSION = ".txt"


@dataclass(frozen=True)
class Pair:
    """An image and its caption lines (stripped, non-empty, at least one)."""

    image: Path
    captions: tuple[str, ...]


@dataclass
class Found:
    """What a scan saw, for error messages: image files, caption files, other files by ending."""

    images: int = 0
    captions: int = 0
    other: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        """E.g. "2 images, 3 .txt files and 4 other files (.gif: 3, .md: 1)"."""
        other = sum(self.other.values())
        text = f"{self.images} image{'s' if self.images != 1 else ''}, {self.captions} .txt file" + (
            "s" if self.captions != 1 else ""
        )
        if other:
            kinds = ", ".join(f"{ext or 'no ending'}: {n}" for ext, n in self.other.most_common(5))
            text += f" and {other} other file{'s' if other != 1 else ''} ({kinds})"
        return text


def check_folder(root: str | Path, what: str) -> Path:
    """``root`` as a Path; a `TrainError` if it is missing or not a folder. ``what`` says what
    it should hold ("images", "images with .txt captions")."""
    root = Path(root)
    if not root.exists():
        raise TrainError(f"{root} does not exist: give a folder of {what}")
    if not root.is_dir():
        raise TrainError(f"{root} is a file, not a folder: give a folder of {what}")
    return root


def walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each folder under ``root`` (itself first, then depth-first by name) with the sorted names
    of the regular files in it."""
    stack, visited = [root], set()
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop, or two links to one folder
            continue
        visited.add(real)
        files, folders = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        folders.append(entry.name)
                    elif entry.is_file():
                        files.append(entry.name)
        except OSError as error:
            LOGGER.warning("skipping folder %s: %s", folder, error.strerror or error)
            continue
        yield folder, sorted(files)
        stack.extend(folder / name for name in sorted(folders, reverse=True))


def _split(name: str) -> tuple[str, str]:
    """``("cat", ".png")`` for "cat.PNG": the stem and the lower-cased ending."""
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def scan_images(root: Path) -> tuple[list[Path], Found]:
    """Every image file under ``root``, in walk order, and what else was there."""
    images, found = [], Found()
    for folder, names in walk(root):
        for name in names:
            ext = _split(name)[1]
            if ext in IMAGE_EXTENSIONS:
                images.append(folder / name)
                found.images += 1
            elif ext == CAPTION_EXTENSION:
                found.captions += 1
            else:
                found.other[ext] += 1
    return images, found


def read_captions(path: Path) -> tuple[str, ...]:
    """The stripped, non-empty lines of a UTF-8 text file (a byte-order mark is dropped).

    Raises OSError or UnicodeDecodeError for a file that cannot be read as text.
    """
    text = path.read_text(encoding="utf-8-sig")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def scan_pairs(root: Path, report: SkipReport) -> tuple[list[Pair], Found]:
    """Every image under ``root`` that has a usable caption file, in walk order.

    Images without a ``.txt``, ``.txt`` files without an image, empty and unreadable caption
    files are told to ``report`` (one warning per file) and left out.
    """
    pairs, found = [], Found()
    for folder, names in walk(root):
        images: list[tuple[str, str]] = []  # (stem, name)
        texts: dict[str, str] = {}  # stem -> name of its caption file (first by name)
        for name in names:
            stem, ext = _split(name)
            if ext in IMAGE_EXTENSIONS:
                images.append((stem, name))
                found.images += 1
            elif ext == CAPTION_EXTENSION:
                texts.setdefault(stem, name)
                found.captions += 1
            else:
                found.other[ext] += 1
        captions: dict[str, tuple[str, ...] | None] = {}  # stem -> lines, None if unusable
        for stem, name in images:
            image = folder / name
            if stem not in texts:
                reason = f"no caption file {stem}{CAPTION_EXTENSION} next to it"
                report.add("missing_caption", str(image), reason)
                continue
            if stem not in captions:
                captions[stem] = _usable_captions(folder / texts[stem], name, report)
            if captions[stem] is not None:
                pairs.append(Pair(image, captions[stem]))
        endings = "/".join(IMAGE_EXTENSIONS)
        for stem, name in texts.items():
            if stem not in captions:
                report.add("missing_image", str(folder / name), f"no image {stem}{endings} next to it")
    return pairs, found


def _usable_captions(path: Path, image_name: str, report: SkipReport) -> tuple[str, ...] | None:
    """The caption lines of ``path``, or None (reported) when it has none or cannot be read."""
    try:
        lines = read_captions(path)
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else f"not UTF-8 text ({error.reason})"
        report.add("unreadable_caption", str(path), f"{reason}; {image_name} skipped")
        return None
    if not lines:
        report.add("empty_caption", str(path), f"no caption in it (only blank lines); {image_name} skipped")
        return None
    return lines
