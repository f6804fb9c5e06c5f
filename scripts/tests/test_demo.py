"""The repository's demo (``scripts/demo.py``) runs end to end in ``--quick`` mode.

It trains a VAE, a DALLE and a CLIP on the built-in synthetic shapes, saves them, reloads the
DALLE from its checkpoint alone and writes PNGs. The quick run takes well under a minute on
one CPU thread. Run by the ``demo_smoke`` nox session (dalle-core, pillow, tqdm installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "demo.py"


def test_demo_quick_writes_pictures_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    # core's built-ins only (no third-party entry points), one thread like the other tests
    env = {**os.environ, "DALLE_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--seed", "3",
               "--out", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}) after {seconds:.0f} s\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )

    for name in ("samples.png", "reconstructions.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 50, name
    grids = sorted((out / "samples").glob("*.png"))
    assert len(grids) == 2, grids  # one per prompt in quick mode
    assert grids[0].name == "00-a-small-red-circle-in-the-top-left.png"

    # checkpoints: the DALLE one carries its VAE and tokenizer
    for folder in ("vae", "clip", "dalle", "dalle/vae"):
        assert (out / folder / "config.json").is_file(), folder
        assert (out / folder / "model.safetensors").is_file(), folder
    assert (out / "dalle" / "tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads((out / "dalle" / "config.json").read_text())["config"]["text_seq_len"] == 48

    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["seed"] == 3
    assert set(summary["final_loss"]) == {"vae", "dalle", "clip"}
    assert summary["checker"]["generated_images"] == 8
    # the checker reads real pictures back correctly (what it says of samples is not asserted)
    assert summary["checker"]["real_images"]["colour"] == 1.0
    assert "checker:" in result.stdout and str(out) in result.stdout
