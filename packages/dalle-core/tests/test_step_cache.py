"""The disk cache of compiled generation steps (`dalle_core.step_cache`), without compiling: what
its key depends on, and how it loads, refuses, stores and bounds entries. The loader of
AOTInductor packages is replaced by one that reads the file, so that these tests run in
milliseconds; the real compile and load, across processes, are in ``test_compiled_step.py``
(marked slow)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch._inductor
from conftest import tiny_dalle

from dalle_core import step_cache

CALL = dict(rows=2, max_len=40, dtype=torch.float32, threads=2, head="image")
CALL_WITHOUT_HEAD = {name: value for name, value in CALL.items() if name != "head"}


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty cache folder under ``$DALLE_CACHE_DIR``; packages "load" as their bytes, and a
    package holding ``b"corrupt"`` fails to load as AOTInductor would fail."""
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(step_cache.MAX_MB_ENV, raising=False)

    def load_package(path: str) -> bytes:
        data = Path(path).read_bytes()
        if data == b"corrupt":
            raise RuntimeError("not an AOTInductor package")
        return data

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load_package)
    return tmp_path / "cache" / "compiled-steps"


def key(model, **changes) -> str:
    return step_cache.step_key(model, **{**CALL, **changes})


def test_the_cache_folder_is_under_the_cache_dir(cache):
    assert step_cache.cache_folder() == cache


def test_the_key_is_the_same_for_the_same_model_and_call():
    model = tiny_dalle()
    same = key(model)
    assert len(same) == 64 and int(same, 16) >= 0  # a hex SHA-256
    assert key(model) == same
    copy = tiny_dalle()  # another object, the same configuration and weights
    assert key(copy) == same


def test_the_key_takes_any_module_and_any_configuration():
    plain = torch.nn.Linear(2, 2)  # no configuration
    configured = torch.nn.Linear(2, 2)
    configured.load_state_dict(plain.state_dict())
    configured.config = {"where": Path("/models/x"), "dtype": torch.float16}  # not JSON: written as text
    assert key(configured) != key(plain)
    assert step_cache.step_key(plain, **CALL_WITHOUT_HEAD) == key(plain, head="image")  # the default head


@pytest.mark.parametrize("change", [
    {"rows": 3}, {"max_len": 41}, {"dtype": torch.float64}, {"threads": 1}, {"head": "text"},
])
def test_each_part_of_the_call_shape_is_in_the_key(change):
    model = tiny_dalle()
    assert key(model, **change) != key(model)


def test_a_changed_weight_or_configuration_is_another_key_a_changed_vae_is_not():
    model = tiny_dalle()
    before = key(model)
    with torch.no_grad():
        model.vae.codebook.weight.add_(1.0)  # the step ends at the image logits: the VAE is not in it
    assert key(model) == before
    with torch.no_grad():
        model.transformer.ff_branches[0].scale.mul_(2.0)
    changed = key(model)
    assert changed != before
    with torch.no_grad():
        model.transformer.ff_branches[0].scale.div_(2.0)
    assert key(model) == before  # the weights' values, not their history
    assert key(tiny_dalle(stable=True)) != before  # the same weights under another configuration
    half = tiny_dalle().to(torch.bfloat16)
    assert key(half) != before  # the same configuration in another dtype


def test_the_torch_build_the_cpu_and_the_step_code_are_in_the_key(monkeypatch, tmp_path):
    model = tiny_dalle()
    before = key(model)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert key(model) != before
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO VECTORS")
    assert key(model) != before
    monkeypatch.undo()

    # the source of every module the step is made of: edited, the key changes
    (tmp_path / "step_module_for_test.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(step_cache, "STEP_MODULES", (*step_cache.STEP_MODULES, "step_module_for_test"))
    with_module = key(model)
    assert with_module != before
    (tmp_path / "step_module_for_test.py").write_text("X = 2\n")
    assert key(model) != with_module
    sys.modules.pop("step_module_for_test", None)
    assert set(step_cache.STEP_MODULES) >= {"dalle_core.decoder_step", "dalle_core.transformer",
                                           "dalle_core.layers", "dalle_core.attention.patterns",
                                           "dalle_core.dalle"}


def built(data: bytes):
    """A stand-in for the compiler: writes ``data`` as the package."""
    return lambda path: path.write_bytes(data)


def test_a_stored_entry_is_whole_and_loads_in_another_call(cache, caplog):
    assert step_cache.load("k") is None  # nothing there: nothing said
    assert not cache.exists() and caplog.text == ""
    paths = []
    assert step_cache.store("k", lambda path: paths.append(path) or built(b"package")(path)) == b"package"
    # built in a hidden folder beside the entries (so that it is moved, not copied), as a .pt2
    # package (AOTInductor's suffix)
    (path,) = paths
    assert path.suffix == ".pt2" and path.parent.parent == cache and path.parent.name.startswith(".")
    assert sorted(p.name for p in cache.iterdir()) == ["k.pt2", "k.sha256"]  # no build folder left
    assert (cache / "k.sha256").read_text() == step_cache.sha256_of(cache / "k.pt2") + "\n"
    os.utime(cache / "k.pt2", (1000, 1000))
    with caplog.at_level(logging.INFO, logger="dalle_core"):
        assert step_cache.load("k") == b"package"
    assert caplog.messages == [f"loaded the compiled generation step from {cache / 'k.pt2'}"]
    assert (cache / "k.pt2").stat().st_mtime > time.time() - 60  # marked used: evicted last


def test_a_failed_build_leaves_no_entry(cache):
    def failing(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("the compiler failed")

    with pytest.raises(RuntimeError, match="the compiler failed"):
        step_cache.store("k", failing)
    assert list(cache.iterdir()) == []
    assert step_cache.load("k") is None


@pytest.mark.parametrize("damage, problem", [
    (lambda pt2, sha: sha.unlink(), "incomplete"),
    (lambda pt2, sha: pt2.unlink(), "incomplete"),
    (lambda pt2, sha: pt2.write_bytes(b"pack"), "its digest does not match: truncated or changed"),
    (lambda pt2, sha: sha.write_text("0" * 64 + "\n"), "its digest does not match: truncated or changed"),
])
def test_a_damaged_entry_is_deleted_never_loaded(cache, caplog, damage, problem):
    step_cache.store("k", built(b"package"))
    damage(cache / "k.pt2", cache / "k.sha256")
    with caplog.at_level(logging.WARNING, logger="dalle_core"):
        assert step_cache.load("k") is None
    assert caplog.messages == [f"compiled step {cache / 'k.pt2'} is not used, {problem}: compiling again"]
    assert list(cache.iterdir()) == []


def test_an_entry_that_does_not_load_is_deleted(cache, caplog):
    with pytest.raises(RuntimeError, match="not an AOTInductor package"):
        step_cache.store("k", built(b"corrupt"))  # storing loads what it stored
    assert (cache / "k.pt2").exists()  # as a package of another build that slipped through
    with caplog.at_level(logging.WARNING, logger="dalle_core"):
        assert step_cache.load("k") is None
    assert "is not used, it does not load (RuntimeError: not an AOTInductor package)" in caplog.text
    assert list(cache.iterdir()) == []


def test_storing_bounds_the_folder_keeping_the_new_entry(cache, monkeypatch, caplog):
    monkeypatch.setenv(step_cache.MAX_MB_ENV, str(3 / 1024))  # 3 KiB: three 1 KiB packages
    for age, name in enumerate(("z", "y", "x")):  # "z" least recently used, though last by name
        step_cache.store(name, built(b"x" * 1024))
        os.utime(cache / f"{name}.pt2", (1000 + age, 1000 + age))
    assert len(list(cache.glob("*.pt2"))) == 3  # at the bound, not over it: all kept
    (cache / "z.sha256").unlink()  # an entry whose digest is gone is evicted all the same
    with caplog.at_level(logging.INFO, logger="dalle_core"):
        step_cache.store("a", built(b"x" * 1024))
    assert caplog.messages == [f"deleted the compiled step {cache / 'z.pt2'}, the least recently used "
                               f"(DALLE_COMPILED_STEPS_MAX_MB)"]
    assert sorted(p.name for p in cache.iterdir()) == [f"{name}.{suffix}" for name in "axy"
                                                       for suffix in ("pt2", "sha256")]
    step_cache.store("big", built(b"x" * 4096))  # over the bound alone: kept, the others go
    assert sorted(p.name for p in cache.iterdir()) == ["big.pt2", "big.sha256"]


@pytest.mark.parametrize("value, megabytes", [("", 2048), ("  ", 2048), ("1.5", 1.5), (" 3 ", 3), ("0", 0)])
def test_the_bound_is_read_from_the_environment(monkeypatch, value, megabytes):
    monkeypatch.setenv(step_cache.MAX_MB_ENV, value)
    assert step_cache.max_bytes() == int(megabytes * 2**20)


@pytest.mark.parametrize("value", ["-1", "lots"])
def test_a_bad_bound_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(step_cache.MAX_MB_ENV, value)
    with pytest.raises(ValueError, match=f"^DALLE_COMPILED_STEPS_MAX_MB must be a number of megabytes "
                                         f">= 0, got '{value}'$"):
        step_cache.max_bytes()
