"""The README's example VAE package works as written: its files are taken from the README,
installed as a distribution (a ``.dist-info`` with its entry point on ``sys.path``), and its own
tests (the conformance suite) pass in a fresh interpreter; a DALLE carrying it reloads it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def readme_file(caption: str) -> str:
    """The fenced block that follows the line ```caption`:`` in the README."""
    text = README.read_text()
    found = re.search(rf"^`{re.escape(caption)}`:\n\n```\w+\n(.*?)^```", text, re.S | re.M)
    assert found, f"the README has no block for {caption}"
    return found[1]


ROUND_TRIP = """
import torch
from dalle_core import DALLE
from dalle_core.plugins import create_vae

vae = create_vae("patch", image_size=32, patch_size=8, num_tokens=64, dim=16)
dalle = DALLE(dim=16, vae=vae, num_text_tokens=20, text_seq_len=4, depth=1, heads=2, dim_head=8)
dalle.save_pretrained("model")
loaded = DALLE.from_pretrained("model")
images = torch.rand(2, 3, 32, 32)
assert type(loaded.vae).__name__ == "PatchVAE"
assert torch.equal(loaded.vae.get_codebook_indices(images), vae.get_codebook_indices(images))
print("round trip ok")
"""


@pytest.mark.slow
def test_the_readme_vae_package_passes_its_tests_and_reloads_inside_a_dalle(tmp_path):
    site = tmp_path / "site"
    (site / "dalle_vae_patch").mkdir(parents=True)
    (site / "dalle_vae_patch" / "__init__.py").write_text(readme_file("src/dalle_vae_patch/__init__.py"))
    info = site / "dalle_vae_patch-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dalle-vae-patch\nVersion: 0.1.0\n")
    example = README.read_text().split("### Example: a VAE package")[1]
    entry_point = re.search(r"^\[project\.entry-points\.dalle\]\n(.+)$", example, re.M)[1]
    (info / "entry_points.txt").write_text(f"[dalle]\n{entry_point.replace(chr(34), '')}\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_patch_vae.py").write_text(readme_file("tests/test_patch_vae.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("DALLE_DISABLE_PLUGIN_AUTOLOAD", None)

    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert int(re.search(r"(\d+) passed", tested.stdout)[1]) >= 8, tested.stdout  # the suite ran

    reloaded = subprocess.run([sys.executable, "-c", ROUND_TRIP], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert reloaded.returncode == 0, reloaded.stderr
    assert "round trip ok" in reloaded.stdout
