"""``dalle-train demo --quick``, the README's main job in its quick mode, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dalle_train.cli import main


@pytest.mark.slow
def test_demo_quick_trains_generates_and_writes_pictures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--threads", "1", "--seed", "3", "--output-dir", str(out)]) == 0
    for name in ("samples.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 50, name
    prompts = sorted(p.name for p in (out / "generated").iterdir())
    assert prompts == ["a-large-blue-square-in-the-center", "a-small-red-circle-in-the-top-left"]
    assert len(list((out / "generated" / prompts[0]).glob("[0-9]*.png"))) == 4
    for run in ("vae", "dalle", "clip"):
        assert (out / run / "checkpoints" / "latest").is_file(), run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["seed"] == 3 and summary["checker"]["images"] == 8
    assert "demo done" in capsys.readouterr().out
