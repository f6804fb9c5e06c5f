"""Compiled generation (``compile=True``): the step generation runs eagerly (`DecoderStep`),
exported and compiled with AOTInductor on the CPU, or captured as a CUDA graph on a GPU, samples
the eager path's codes; compiled CPU steps are kept on disk for other processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_dalle

from dalle_core import DALLE, decoder_step, step_cache


@pytest.mark.slow
def test_compiled_generation_samples_the_eager_codes_and_follows_weight_changes(text):
    dalle = tiny_dalle(attn_types=("full", "conv_like"), sandwich_norm=True).eval()
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(mask=text != 0, cond_scale=3.0, img=image, num_init_img_tokens=5, filter_thres=0.5)

    def codes(compile: bool) -> torch.Tensor:
        return dalle.generate_image_codes(
            text, generator=torch.Generator().manual_seed(4), compile=compile, **kwargs
        )

    before = codes(False)
    assert torch.equal(codes(True), before)
    first = decoder_step._COMPILED[dalle][1]
    assert torch.equal(codes(True), before)
    assert decoder_step._COMPILED[dalle][1] is first and len(first) == 1  # compiled once
    with torch.no_grad():
        dalle.transformer.ff_branches[1].scale.mul_(30.0)  # as an optimizer step would
    after = codes(False)
    assert not torch.equal(after, before)  # the change shows in the codes
    assert torch.equal(codes(True), after)
    assert decoder_step._COMPILED[dalle][1] is not first  # recompiled for the new weights


AUTOCAST_REFUSAL = r"^compile=True does not run under autocast: the compiled step keeps the model dtype$"


def test_compile_needs_the_cache_and_no_autocast(text):
    dalle = tiny_dalle()
    with pytest.raises(ValueError, match="use_cache=True"):
        dalle.generate_image_codes(text, compile=True, use_cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match=AUTOCAST_REFUSAL):
        dalle.generate_image_codes(text, compile=True)


#: a new process: the saved model at argv[1] generates with compile=True; prints its codes
SECOND_PROCESS = """
import logging, sys, torch
from dalle_core import DALLE
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
torch.set_num_threads(int(sys.argv[2]))
dalle = DALLE.from_pretrained(sys.argv[1]).eval()
text = torch.tensor([[3, 9, 4, 0, 0, 0], [5, 5, 5, 5, 1, 0]])
codes = dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(4), compile=True)
print(codes.tolist())
"""


def entries() -> list[Path]:
    return sorted(step_cache.cache_folder().glob("*.pt2"))


@pytest.mark.slow
def test_compiled_steps_are_kept_on_disk_for_other_processes_and_never_trusted_blindly(tmp_path, caplog):
    tiny_dalle(attn_types=("full", "axial_row")).save_pretrained(tmp_path / "model")
    dalle = DALLE.from_pretrained(tmp_path / "model").eval()
    text = torch.tensor([[3, 9, 4, 0, 0, 0], [5, 5, 5, 5, 1, 0]])

    def codes(compile: bool) -> torch.Tensor:
        return dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(4), compile=compile)

    eager = codes(False)
    before = set(entries())
    with caplog.at_level(logging.INFO, logger="dalle_core"):
        assert torch.equal(codes(True), eager)
    assert "compiling the generation step" in caplog.text
    (package,) = set(entries()) - before
    assert package.with_suffix(".sha256").read_text().strip() == step_cache.sha256_of(package)

    # another process loads the package instead of compiling, and samples the same codes
    second = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(tmp_path / "model"), str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"loaded the compiled generation step from {package}" in second.stderr
    assert "compiling the generation step" not in second.stderr
    assert torch.tensor(json.loads(second.stdout)).equal(eager)

    # a truncated package is deleted and compiled again, never loaded
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    decoder_step._COMPILED.pop(dalle)  # forget the step in memory: as a new process would
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dalle_core"):
        assert torch.equal(codes(True), eager)
    assert "its digest does not match: truncated or changed: compiling again" in caplog.text
    assert "compiling the generation step" in caplog.text
    assert package.with_suffix(".sha256").read_text().strip() == step_cache.sha256_of(package)

    # a changed weight is another key: its own package, not the old one
    with torch.no_grad():
        dalle.transformer.ff_branches[0].scale.mul_(30.0)
    changed = codes(False)
    assert not torch.equal(changed, eager)
    assert torch.equal(codes(True), changed)
    assert len(set(entries()) - before) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_step_captured_as_a_cuda_graph_samples_the_eager_codes(text):
    dalle = tiny_dalle(attn_types=("full", "axial_row", "conv_like")).cuda().eval()
    text = text.cuda()

    def codes(compile: bool, **kwargs) -> torch.Tensor:
        generator = torch.Generator(device="cuda").manual_seed(4)
        return dalle.generate_image_codes(text, generator=generator, compile=compile, **kwargs)

    for kwargs in ({}, {"cond_scale": 3.0, "mask": text != 0}):
        assert torch.equal(codes(True, **kwargs), codes(False, **kwargs)), kwargs


def test_the_disk_cache_evicts_the_least_recently_used_entries_beyond_its_bound(monkeypatch, tmp_path):
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path))
    folder = step_cache.cache_folder()
    folder.mkdir(parents=True)
    for age, name in enumerate(("old", "used", "new")):  # 1 MiB packages, "old" least recently used
        package = folder / f"{name}.pt2"
        package.write_bytes(b"\0" * 2**20)
        package.with_suffix(".sha256").write_text("digest\n")
        os.utime(package, (1000 + age, 1000 + age))
    os.utime(folder / "old.pt2", (900, 900))
    os.utime(folder / "used.pt2", (5000, 5000))  # as a load marks it

    monkeypatch.setenv("DALLE_COMPILED_STEPS_MAX_MB", "2.5")
    step_cache.evict(keep=folder / "new.pt2")
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["new.pt2", "new.sha256", "used.pt2", "used.sha256"]
    monkeypatch.setenv("DALLE_COMPILED_STEPS_MAX_MB", "0")
    step_cache.evict(keep=folder / "new.pt2")  # the entry just stored stays, whatever the bound
    assert sorted(path.name for path in folder.iterdir()) == ["new.pt2", "new.sha256"]
    monkeypatch.setenv("DALLE_COMPILED_STEPS_MAX_MB", "lots")
    with pytest.raises(ValueError, match="^DALLE_COMPILED_STEPS_MAX_MB must be a number of megabytes >= 0"):
        step_cache.evict(keep=folder / "new.pt2")
    monkeypatch.delenv("DALLE_COMPILED_STEPS_MAX_MB")
    assert step_cache.max_bytes() == step_cache.DEFAULT_MAX_MB * 2**20
