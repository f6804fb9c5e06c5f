"""``dalle-train plugins [--json]``: every registered name per hook, its package and version,
and whether it is usable here, including a test plugin registered with the pluggy hooks."""

from __future__ import annotations

import json

import pytest

from dalle_core import hookimpl
from dalle_core.attention.kernels import SDPAKernel
from dalle_core.plugins import (
    BLOCK_PLUGINS_ENV,
    DISABLE_AUTOLOAD_ENV,
    KINDS,
    get_plugin_manager,
    reset_plugins,
)
from dalle_train import cli


class ListedPlugin:
    """One usable VAE and one attention kernel whose library is missing."""

    @hookimpl
    def dalle_register_vaes(self, register):
        register("listed-vae", dict, description="a VAE for the listing test")

    @hookimpl
    def dalle_register_attention(self, register):
        register("needs-lib", SDPAKernel, requires=("dalle_missing_library_xyz",),
                 description="a kernel that cannot run here")


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    """Only dalle-core's plugins and `ListedPlugin`, whatever else is installed."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.delenv(BLOCK_PLUGINS_ENV, raising=False)
    reset_plugins()
    get_plugin_manager().register(ListedPlugin(), name="dalle-listed-plugin")
    yield
    reset_plugins()


def test_json_lists_every_name_per_hook(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing) == list(KINDS)
    names = {kind: [entry["name"] for entry in entries] for kind, entries in listing.items()}
    assert names == {"tokenizers": ["bytes"], "vaes": ["discrete", "listed-vae"],
                     "attention": ["sdpa", "flex", "needs-lib"], "backends": ["none"]}
    bytes_entry = listing["tokenizers"][0]
    assert bytes_entry["package"] == "dalle-core" and bytes_entry["usable"] is True
    assert bytes_entry["version"] and bytes_entry["reason"] == "" and bytes_entry["description"]
    needs = listing["attention"][2]
    assert (needs["package"], needs["version"], needs["usable"], needs["reason"]) == (
        "dalle-listed-plugin", "unknown", False, "dalle_missing_library_xyz not installed")


def test_table_has_a_section_per_hook_with_usability(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind, hook in KINDS.items():
        assert f"{kind} (hook {hook}):" in out
    lines = out.splitlines()
    header = next(line for line in lines if "NAME" in line)
    assert header.split() == ["NAME", "PACKAGE", "VERSION", "USABLE", "DESCRIPTION"]
    row = next(line for line in lines if line.split()[:1] == ["needs-lib"])
    assert "no: dalle_missing_library_xyz not installed" in row and "a kernel that cannot run here" in row
    listed = next(line for line in lines if line.split()[:1] == ["listed-vae"])
    assert listed.split()[1:4] == ["dalle-listed-plugin", "unknown", "yes"]
    assert row.index("no:") == listed.index("yes") == header.index("USABLE")  # aligned columns


def test_a_broken_plugin_is_a_one_line_error(capsys):
    class Duplicate:
        @hookimpl
        def dalle_register_tokenizers(self, register):
            register("bytes", dict)

    get_plugin_manager().register(Duplicate(), name="dalle-duplicate")
    assert cli.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dalle-train plugins: error: the installed plugins could not be loaded: tokenizer "
                          "'bytes' is registered by both dalle-core and dalle-duplicate")
    assert err.count("\n") == 1
