"""``dalle-train demo --quick``, the README's main job in its quick mode, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dalle_train.cli import main
from dalle_train.pictures import slug


@pytest.mark.slow
def test_demo_quick_trains_generates_and_writes_pictures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--threads", "1", "--seed", "3", "--output-dir", str(out)]) == 0
    for name in ("samples.png", "samples-extra.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 50, name
    summary = json.loads((out / "summary.json").read_text())
    prompts = sorted(p.name for p in (out / "generated").iterdir())
    assert prompts == sorted(["a-large-blue-square-in-the-center", "a-small-red-circle-in-the-top-left",
                              *(slug(caption) for caption in summary["extra_prompts"])])
    assert len(summary["extra_prompts"]) == 2
    assert len(list((out / "generated" / prompts[0]).glob("[0-9]*.png"))) == 4
    for run in ("vae", "dalle", "clip"):
        assert (out / run / "checkpoints" / "latest").is_file(), run
    assert summary["quick"] is True and summary["seed"] == 3 and summary["checker"]["images"] == 8
    checker = summary["checker"]
    assert checker["extra_images"] == 8 and checker["held_out"] == 64
    for scores in ("generated", "extra", "vae_ceiling", "dataset", "chance"):
        assert set(checker[scores]) == {"colour", "shape", "position", "size", "all"}, scores
    assert checker["dataset"]["all"] >= 0.9  # the checker reads the held-out pictures themselves right
    assert summary["vae"]["num_tokens"] == 64 and summary["vae"]["codes_per_image"] == 64
    assert 1 <= summary["vae"]["codes_used"] <= 64
    assert set(summary["seconds"]) == {"vae", "dalle", "clip", "generate", "judge", "total"}
    assert (out / "report.md").read_text().startswith("# dalle-train demo, seed 3 (--quick)")
    assert "demo done" in capsys.readouterr().out
