"""The plugin without Horovod: it imports, ``dalle-train plugins`` lists ``horovod`` as not usable
with how to get it, choosing it says what to install, and outside ``horovodrun`` the error
names the launcher. These run whether or not Horovod is installed (it is hidden from a child
process when it is)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dalle_core.plugins import registry
from dalle_dist_horovod import HorovodBackend
from dalle_dist_horovod.backend import LAUNCHER_VARIABLES

#: runs dalle-train with ``horovod`` made unimportable (as on a machine without it)
WITHOUT_HOROVOD = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class HideHorovod(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "horovod" or name.startswith("horovod."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideHorovod())
    from dalle_train import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def dalle_train_without_horovod(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_HOROVOD, *args], capture_output=True, text=True,
                          timeout=120)


def test_registered_under_horovod_by_this_package() -> None:
    entry = registry("backends")["horovod"]
    assert entry.factory is HorovodBackend and entry.package == "dalle-dist-horovod"
    assert entry.metadata["requires"] == ("horovod",)
    assert HorovodBackend.plugin_name == "horovod"


def test_without_horovod_it_is_listed_as_unusable_with_the_install_hint() -> None:
    result = dalle_train_without_horovod("plugins", "--json")
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout)["backends"] if r["name"] == "horovod")
    assert row["package"] == "dalle-dist-horovod" and row["usable"] is False
    assert row["reason"] == "horovod not installed; install it with: dalle-build-horovod --install"
    table = dalle_train_without_horovod("plugins").stdout
    assert "no: horovod not installed; install it with: dalle-build-horovod --install" in table


def test_without_horovod_choosing_it_says_what_to_install(tmp_path) -> None:
    result = dalle_train_without_horovod("dalle", "--dataset", "shapes", "--output-dir", str(tmp_path),
                                         "--distributed-backend", "horovod")
    assert result.returncode == 2
    assert "--distributed-backend horovod" in result.stderr
    assert "horovod not installed; install it with: dalle-build-horovod --install" in result.stderr


def test_outside_horovodrun_the_error_names_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    backend = HorovodBackend()  # constructing it imports nothing
    expected = r"runs under horovodrun .*horovodrun -np N .*--distributed-backend horovod"
    with pytest.raises(RuntimeError, match=expected):
        backend.initialize()
    with pytest.raises(RuntimeError, match="not initialized"):
        _ = backend.rank


def test_importing_the_package_does_not_import_horovod() -> None:
    code = "import sys, dalle_dist_horovod, dalle_dist_horovod.plugin; print('horovod' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
