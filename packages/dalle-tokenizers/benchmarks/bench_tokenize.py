"""Batched tokenisation speed: captions/s of ``tokenize`` against a plain per-caption loop,
both measured in this run on the same captions, with equal outputs checked.

- ``bpe``: `BPETokenizer.tokenize` against `ReferenceBPETokenizer` (the upstream
  ``SimpleTokenizer``: ftfy on every caption, the quadratic merge loop) padded row by row;
- ``hf``: `HFTokenizer.tokenize` (the library's parallel ``encode_batch``, one padding write)
  against `per_caption` (``encode`` and a tensor per caption, as upstream), on a BPE of
  ``--hf-vocab-size`` ids trained on the captions first (not timed);
- ``yttm``, when youtokentome is installed: the same comparison on a YouTokenToMe model.

Captions are synthetic by default (deterministic: 4 to 20 words drawn with a Zipf law from
CLIP's whole-word tokens, some capitalised, some punctuation), or the lines of ``--source``
(text files or image-text folders) repeated up to ``--captions``::

    OMP_NUM_THREADS=1 python packages/dalle-tokenizers/benchmarks/bench_tokenize.py
    python packages/dalle-tokenizers/benchmarks/bench_tokenize.py --source ../shared/datasets/emoji-twemoji
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dalle_core.interfaces import Tokenizer
from dalle_tokenizers import BPETokenizer, HFTokenizer, ReferenceBPETokenizer, train_bpe
from dalle_tokenizers.clip_vocab import default_merges_path, load_vocabulary
from dalle_tokenizers.train import read_captions


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of Zipf-distributed CLIP words (a realistic mix of repeated and rare words)."""
    vocabulary = load_vocabulary(default_merges_path())
    # whole-word tokens that are plain ASCII words, in merge order: the most frequent first
    words = [word for word in (vocabulary.id_to_bytes[index] for index in sorted(vocabulary.encoder.values()))
             if word.endswith(b" ") and len(word) > 3 and word[:-1].isascii() and word[:-1].isalpha()]
    words = [word[:-1].decode() for word in words[:20_000]]
    weights = list(itertools.accumulate(1 / (rank + 10) ** 1.1 for rank in range(len(words))))
    generator = random.Random(seed)
    captions = []
    for _ in range(count):
        caption = generator.choices(words, cum_weights=weights, k=generator.randint(4, 20))
        if generator.random() < 0.3:
            caption[0] = caption[0].capitalize()
        if generator.random() < 0.2:
            caption[generator.randrange(len(caption))] += generator.choice([",", ".", "!", "'s"])
        captions.append(" ".join(caption))
    return captions


def train_yttm(corpus: Path, model: Path, vocab_size: int) -> None:
    """Train a YouTokenToMe model in a child process, whose chatty output is shown only on failure."""
    code = ("import sys, youtokentome as y; "
            "y.BPE.train(data=sys.argv[1], model=sys.argv[2], vocab_size=int(sys.argv[3]))")
    result = subprocess.run([sys.executable, "-c", code, str(corpus), str(model), str(vocab_size)],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"training the YouTokenToMe model failed:\n{result.stdout}{result.stderr}")


def per_caption(tokenizer: Tokenizer, texts: Sequence[str], context: int) -> Tensor:
    """The upstream way: ``encode`` each caption and write it into its row, truncated."""
    result = torch.zeros(len(texts), context, dtype=torch.long)
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text)[:context]
        result[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


def timed(tokenize: Callable[[], Tensor]) -> tuple[Tensor, float]:
    """The result of ``tokenize()`` and the seconds it took."""
    start = time.perf_counter()
    result = tokenize()
    return result, time.perf_counter() - start


def compare(name: str, fast: Tokenizer, reference: Callable[[Sequence[str]], Tensor],
            captions: Sequence[str], context: int) -> None:
    """Time ``fast.tokenize`` and ``reference`` on ``captions``; check they agree; print a row."""
    expected, reference_seconds = timed(lambda: reference(captions))
    result, fast_seconds = timed(lambda: fast.tokenize(captions, context, truncate_text=True))
    if not torch.equal(result, expected):
        raise AssertionError(f"{name}: batched tokenize differs from the reference")
    count = len(captions)
    print(f"{name:5s} {count / fast_seconds:12,.0f} {count / reference_seconds:12,.0f} "
          f"{reference_seconds / fast_seconds:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=100_000, help="number of captions")
    parser.add_argument("--context", type=int, default=256, help="context length (text_seq_len)")
    parser.add_argument("--source", type=Path, nargs="*", help="caption files / image-text folders")
    parser.add_argument("--hf-vocab-size", type=int, default=8000, help="ids of the trained hf BPE")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.source:
        lines = list(read_captions(args.source))
        captions = list(itertools.islice(itertools.cycle(lines), args.captions))
        origin = f"{len(lines)} distinct lines of {', '.join(map(str, args.source))}"
    else:
        captions = synthetic_captions(args.captions)
        origin = "synthetic"
    print(f"{len(captions):,} captions ({origin}), context {args.context}; captions/s, best of 1 run")
    print(f"{'':5s} {'batched':>12s} {'per-caption':>12s} {'ratio':>8s}")

    compare("bpe", BPETokenizer(), lambda texts: per_caption(ReferenceBPETokenizer(), texts, args.context),
            captions, args.context)

    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "captions.txt"
        corpus.write_text("\n".join(captions) + "\n", encoding="utf-8")
        hf = HFTokenizer(train_bpe(corpus, args.hf_vocab_size, Path(folder) / "bpe.json"))
        compare("hf", hf, lambda texts: per_caption(hf, texts, args.context),
                captions, args.context)
        if importlib.util.find_spec("youtokentome") is None:
            print("yttm  skipped: youtokentome is not installed")
            return
        from dalle_tokenizers import YTTMTokenizer

        model = Path(folder) / "bpe.model"
        train_yttm(corpus, model, args.hf_vocab_size)
        yttm = YTTMTokenizer(model)
        compare("yttm", yttm, lambda texts: per_caption(yttm, texts, args.context),
                captions, args.context)


if __name__ == "__main__":
    main()
