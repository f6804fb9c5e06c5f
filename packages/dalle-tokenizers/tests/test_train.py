"""Training a BPE for ``hf``: `train_bpe` and the ``dalle-train-tokenizer`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dalle_core.plugins import create_tokenizer
from dalle_tokenizers import HFTokenizer, train_bpe
from dalle_tokenizers.train import caption_files, main

COMMAND = Path(sys.executable).with_name("dalle-train-tokenizer")


def image_text_folder(root: Path) -> Path:
    """Images with captions paired by name at several depths, plus files that are no pair."""
    (root / "a" / "b").mkdir(parents=True)
    pairs = {
        "cube": "a small red cube on a wooden table\na red cube\n\n",
        "a/cats": "two cats\ntwo cats on a sofa\n",
        "a/b/fox": "a painting of a fox in the snow\n",
    }
    for index, (stem, captions) in enumerate(pairs.items()):
        (root / f"{stem}{('.png', '.JPG', '.webp')[index]}").write_bytes(b"\x89PNG\r\n")
        (root / f"{stem}.txt").write_text(captions * 10)
    # not caption files: no image beside them, hidden, not .txt
    for path in ("orphan.txt", "a/b/cube.txt", ".hidden/cube.txt", "a/.cats.txt"):
        (root / path).parent.mkdir(exist_ok=True)
        (root / path).write_text("zyxwvzyxwv\n" * 100)
    (root / ".hidden" / "cube.png").write_bytes(b"")
    (root / "a" / ".cats.png").write_bytes(b"")
    (root / "a" / "notes.md").write_text("not a caption\n")
    return root


def test_image_text_folder(tmp_path: Path) -> None:
    folder = image_text_folder(tmp_path / "data")
    assert [p.relative_to(folder).as_posix() for p in caption_files(folder)] == [
        "a/b/fox.txt", "a/cats.txt", "cube.txt"
    ]
    (tmp_path / "out").mkdir()
    path = train_bpe(folder, 300, tmp_path / "out", lowercase=True)  # a folder: tokenizer.json in it
    assert path == tmp_path / "out" / "tokenizer.json"
    tokenizer = create_tokenizer("hf", bpe_path=str(path))
    assert not any("zyx" in token for token in tokenizer.tokenizer.get_vocab())  # none read
    # frequent caption words became single tokens; lower-casing is stored in the file
    assert len(tokenizer.encode("Two CATS")) == 2
    assert tokenizer.decode(tokenizer.encode("Two CATS")).strip() == "two cats"


def test_text_file_and_vocabulary_size(corpus: Path, tmp_path: Path) -> None:
    small = HFTokenizer(train_bpe(corpus, 270, tmp_path / "small.json"))
    large = HFTokenizer(train_bpe([corpus], 400, tmp_path / "large.json"))
    assert small.vocab_size == 270 and 270 < large.vocab_size <= 400
    assert large.tokenizer.token_to_id("<pad>") == 0 == small.tokenizer.token_to_id("<pad>")
    for text in sorted(set(corpus.read_text(encoding="utf-8").splitlines())):
        # at most a token per byte, plus the space the byte-level pre-tokenizer puts first
        assert len(large.encode(text)) < len(small.encode(text)) <= len(text.encode()) + 1
        assert large.decode(large.encode(text)).strip() == text


def test_bad_sources_and_sizes(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"caption source .*missing does not exist"):
        train_bpe(tmp_path / "missing", 300, tmp_path / "out.json")
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"images has no \.txt file beside an image of the same name"):
        train_bpe(tmp_path / "images", 300, tmp_path / "out.json")
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe(corpus, 100, tmp_path / "out.json")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"no captions found in .*blank\.txt"):
        train_bpe(tmp_path / "blank.txt", 300, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_main_reports_errors_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "missing.txt"), "--vocab-size", "300", "-o", str(tmp_path / "x.json")])
    assert exit_.value.code == 2
    assert "dalle-train-tokenizer: error: caption source" in capsys.readouterr().err


def test_command(tmp_path: Path, corpus: Path) -> None:
    folder = image_text_folder(tmp_path / "data")
    output = tmp_path / "bpe.json"
    result = subprocess.run(
        [str(COMMAND), str(corpus), str(folder), "--vocab_size", "320", "--output", str(output)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"wrote {output} (320 ids); use it with --tokenizer hf --bpe_path {output}"
    )
    assert HFTokenizer(output).vocab_size == 320
