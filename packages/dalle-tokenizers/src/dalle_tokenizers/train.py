"""Training a byte-level BPE (Hugging Face ``tokenizers``) on captions, for ``--tokenizer hf``.

Sources are text files (one caption per line) or image-text folders: images and ``.txt``
files paired by name (the same stem in the same folder, at any depth, as dalle-train pairs
them), each non-empty line of a ``.txt`` a caption. The result is a ``tokenizer.json`` with
``<pad>`` at id 0::

    dalle-train-tokenizer ./data captions.txt --vocab-size 8000 --output bpe.json
    dalle-train --tokenizer hf --bpe_path bpe.json ...
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

from dalle_core.pretrained import atomic_write_bytes

PAD_TOKEN = "<pad>"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})  # those dalle-train reads
MIN_VOCAB_SIZE = 257  # the 256 byte symbols and <pad>


def caption_files(source: Path) -> list[Path]:
    """The caption files of one source: the file itself, or each ``.txt`` file of a folder that
    has an image of the same stem beside it (as dalle-train pairs them; hidden files and
    folders, whose names start with ".", are left out)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"caption source {source} does not exist (give a text file or an "
                                f"image-text folder)")
    files = [path for path in source.rglob("*")
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts)]
    images = {path.with_suffix("") for path in files if path.suffix.lower() in IMAGE_SUFFIXES}
    texts = sorted(path for path in files if path.suffix.lower() == ".txt" and path.with_suffix("") in images)
    if not texts:
        raise ValueError(f"image-text folder {source} has no .txt file beside an image of the same "
                         f"name (images: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return texts


def read_captions(sources: Sequence[str | Path]) -> Iterator[str]:
    """Every non-empty caption line of every source, stripped."""
    for source in sources:
        for path in caption_files(Path(source)):
            with path.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if line.strip():
                        yield line.strip()


def train_bpe(
    sources: str | Path | Sequence[str | Path],
    vocab_size: int,
    output: str | Path,
    *,
    min_frequency: int = 2,
    lowercase: bool = False,
) -> Path:
    """Train a byte-level BPE on the captions of ``sources`` and write it as a tokenizers JSON.

    Args:
        sources: text files (a caption per line) and/or image-text folders.
        vocab_size: ids in the result, ``<pad>`` (id 0) and the 256 byte symbols included; the
            result may be smaller when the captions hold fewer merges.
        output: the JSON file to write, or an existing folder to write ``tokenizer.json`` into.
        min_frequency: a pair merges only when it occurs at least this often.
        lowercase: lower-case texts before encoding them (stored in the file, so encoding does too).

    Returns:
        The path written, ready for ``HFTokenizer(path)`` / ``--tokenizer hf --bpe_path``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte symbols and "
                         f"{PAD_TOKEN}), got {vocab_size}")
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not sources:
        raise ValueError("train_bpe needs at least one caption source")
    for source in sources:  # errors about the sources before any training
        caption_files(Path(source))
    output = Path(output)
    if output.is_dir():
        output = output / "tokenizer.json"

    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    captions = list(read_captions(sources))
    if not captions:
        raise ValueError(f"no captions found in {', '.join(map(str, sources))}")
    tokenizer.train_from_iterator(captions, trainer=trainer)
    atomic_write_bytes(output, tokenizer.to_str(pretty=True).encode("utf-8"))
    return output


def main(argv: Sequence[str] | None = None) -> None:
    """``dalle-train-tokenizer``: train a BPE on captions, for ``--tokenizer hf``."""
    parser = argparse.ArgumentParser(
        prog="dalle-train-tokenizer",
        description="Train a byte-level BPE (Hugging Face tokenizers) on captions; use the result "
        "with --tokenizer hf --bpe_path OUTPUT.",
    )
    parser.add_argument("sources", nargs="+", type=Path,
                        help="text files (a caption per line) and/or image-text folders")
    parser.add_argument("--vocab-size", "--vocab_size", type=int, required=True, dest="vocab_size",
                        help=f"number of ids, at least {MIN_VOCAB_SIZE}")
    parser.add_argument("--output", "-o", type=Path, required=True, help="tokenizer JSON file to write")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    parser.add_argument("--lowercase", action="store_true", help="lower-case texts first")
    args = parser.parse_args(argv)
    try:
        path = train_bpe(args.sources, args.vocab_size, args.output,
                         min_frequency=args.min_frequency, lowercase=args.lowercase)
    except (OSError, ValueError) as error:
        parser.exit(2, f"dalle-train-tokenizer: error: {error}\n")
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(path)).get_vocab_size()
    print(f"wrote {path} ({size} ids); use it with --tokenizer hf --bpe_path {path}")
