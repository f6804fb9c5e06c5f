"""Plugin discovery and the registries: entry points, env variables, errors, listing, loading.

Fake plugin packages are real ``.dist-info`` folders with an ``entry_points.txt`` in group
``dalle`` on a temporary ``sys.path`` entry; entry-point discovery is limited to that folder in
every test, so that plugins installed in the environment do not leak into the tests.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dalle_core import builtin, plugins
from dalle_core.attention.kernels import FlexKernel, SDPAKernel
from dalle_core.hookspecs import hookimpl
from dalle_core.plugins import (
    DuplicatePluginError,
    PluginNotUsableError,
    UnknownPluginError,
    create_attention_kernel,
    create_backend,
    create_tokenizer,
    create_vae,
    describe_plugins,
    get_plugin_manager,
    load_tokenizer,
    load_vae,
    registry,
    reset_plugins,
    usable_attention_kernels,
)
from dalle_core.tokenizers import ByteTokenizer

FAKE_VAE = """
    from dalle_core.hookspecs import hookimpl

    class FakeVAE:
        def __init__(self, **config):
            self.config = config

        @classmethod
        def from_pretrained(cls, directory):
            return cls(loaded_from=str(directory))

    @hookimpl
    def dalle_register_vaes(register):
        register("fake", FakeVAE, description="a VAE for tests")
"""


class FakePlugins:
    """Writes fake plugin distributions into one temporary site folder."""

    def __init__(self, site: Path):
        self.site = site
        self.modules: list[str] = []

    def add(self, source: str, dist: str = "dalle-fake-vae", version: str = "1.2.3") -> str:
        """A distribution ``dist`` whose entry point (its module's name) holds ``source``."""
        module = dist.replace("-", "_")
        (self.site / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[dalle]\n{module} = {module}\n")
        importlib.invalidate_caches()
        self.modules.append(module)
        return module


@pytest.fixture(autouse=True)
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Fresh plugins, found only in an empty site folder that tests add fake packages to."""
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(plugins.BLOCK_PLUGINS_ENV, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    distributions = importlib.metadata.distributions
    monkeypatch.setattr(
        importlib.metadata, "distributions", lambda **_: distributions(path=[str(site)])
    )
    fakes = FakePlugins(site)
    reset_plugins()
    yield fakes
    reset_plugins()
    for module in fakes.modules:
        sys.modules.pop(module, None)


def test_builtins_are_registered_as_plugins_of_dalle_core(monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    expected = {
        "tokenizers": ["bytes"],
        "vaes": ["discrete"],
        "attention": ["sdpa", "flex"],
        "backends": ["none"],
    }
    for kind, names in expected.items():
        assert list(registry(kind)) == names
        assert {entry.package for entry in registry(kind).values()} == {"dalle-core"}
    assert builtin.dalle_register_vaes.dalle_impl is not None  # the public @hookimpl marker
    assert hookimpl.project_name == "dalle"


def test_builtin_factories():
    assert isinstance(create_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(create_attention_kernel("sdpa"), SDPAKernel)
    assert create_attention_kernel("flex", compile=False).compile is False
    assert create_backend("none").world_size == 1


def test_entry_point_plugin_is_found_with_its_package_and_version(fake):
    fake.add(FAKE_VAE)
    entry = registry("vaes")["fake"]
    assert (entry.package, entry.version, entry.description) == (
        "dalle-fake-vae",
        "1.2.3",
        "a VAE for tests",
    )
    assert create_vae("fake", size=3).config == {"size": 3}
    assert list(registry("vaes")) == ["discrete", "fake"]  # core's first


def test_plugin_registered_in_process_is_named_after_itself():
    class Inline:
        @hookimpl
        def dalle_register_backends(self, register):
            register("inline", object)

    get_plugin_manager().register(Inline(), name="inline-plugin")
    assert (registry("backends")["inline"].package, registry("backends")["inline"].version) == (
        "inline-plugin",
        "unknown",
    )


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes"])
def test_autoload_can_be_disabled(fake, monkeypatch, value):
    fake.add(FAKE_VAE)
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, value)
    assert list(registry("vaes")) == ["discrete"]
    with pytest.raises(UnknownPluginError, match=plugins.DISABLE_AUTOLOAD_ENV):
        create_vae("fake")


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_autoload_stays_on_otherwise(fake, monkeypatch, value):
    fake.add(FAKE_VAE)
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, value)
    assert "fake" in registry("vaes")


def test_plugins_can_be_blocked_by_entry_point_name(fake, monkeypatch):
    blocked = fake.add(FAKE_VAE)
    fake.add(FAKE_VAE.replace('"fake"', '"other"'), dist="dalle-other-vae")
    monkeypatch.setenv(plugins.BLOCK_PLUGINS_ENV, f" something-else , {blocked}")
    assert list(registry("vaes")) == ["discrete", "other"]
    assert get_plugin_manager().is_blocked(blocked)


@pytest.mark.parametrize(
    ("create", "name", "package"),
    [
        (create_tokenizer, "bpe", "dalle-tokenizers"),
        (create_tokenizer, "chinese", "dalle-tokenizers"),
        (create_vae, "openai", "dalle-vae-openai"),
        (create_vae, "gumbel-vqgan", "dalle-vae-taming"),
        (create_attention_kernel, "triton", "dalle-attn-sparse"),
        (create_backend, "deepspeed", "dalle-dist-deepspeed"),
        (create_backend, "horovod", "dalle-dist-horovod"),
    ],
)
def test_unknown_name_lists_names_and_says_what_to_install(create, name, package):
    with pytest.raises(UnknownPluginError) as error:
        create(name)
    assert isinstance(error.value, KeyError) and isinstance(error.value, ValueError)
    message = str(error.value)
    assert f"pip install {package}" in message
    assert "available: " in message and repr(name) in message


def test_unknown_name_without_a_hint():
    with pytest.raises(KeyError) as error:
        create_attention_kernel("no-such-kernel")
    assert str(error.value) == "unknown attention kernel 'no-such-kernel'; available: flex, sdpa"


def test_unknown_kind():
    with pytest.raises(ValueError, match="valid kinds are tokenizers, vaes, attention, backends"):
        registry("vae")


def test_duplicate_of_a_builtin_names_both_packages(fake):
    fake.add(FAKE_VAE.replace('"fake"', '"discrete"'))
    with pytest.raises(DuplicatePluginError, match="by both dalle-core and dalle-fake-vae"):
        registry("vaes")


def test_duplicate_across_plugins_names_both_packages(fake):
    fake.add(FAKE_VAE, dist="dalle-first")
    fake.add(FAKE_VAE, dist="dalle-second")
    with pytest.raises(DuplicatePluginError) as error:
        registry("vaes")
    assert "dalle-first" in str(error.value) and "dalle-second" in str(error.value)


MISSING_REQUIREMENT = """
    from dalle_core.attention.kernels import SDPAKernel
    from dalle_core.hookspecs import hookimpl

    @hookimpl
    def dalle_register_attention(register):
        register("needs-missing", SDPAKernel, requires=("dalle_missing_module_xyz",))
        register("needs-submodule", SDPAKernel, requires="dalle_missing_pkg.sub",
                 install="pip install dalle-missing-pkg==2")
"""


def test_missing_requirement_makes_an_entry_unusable(fake):
    fake.add(MISSING_REQUIREMENT, dist="dalle-needy")
    entry = registry("attention")["needs-missing"]
    assert entry.usable() == (False, "dalle_missing_module_xyz not installed")
    assert registry("attention")["needs-submodule"].usable() == (
        False,
        "dalle_missing_pkg.sub not installed; install it with: pip install dalle-missing-pkg==2",
    )
    with pytest.raises(PluginNotUsableError, match="dalle_missing_module_xyz not installed; install what"):
        create_attention_kernel("needs-missing")
    missing_sub = "cannot be used here: dalle_missing_pkg.sub not installed; install it with: pip install "
    with pytest.raises(PluginNotUsableError, match=f"{missing_sub}dalle-missing-pkg==2$"):
        create_attention_kernel("needs-submodule")
    kernels = usable_attention_kernels()
    assert [type(kernel) for kernel in kernels] == [SDPAKernel, FlexKernel]
    assert usable_attention_kernels() is kernels  # built once

    rows = {(row.kind, row.name): row for row in describe_plugins()}
    assert rows["attention", "needs-missing"][2:6] == (
        "dalle-needy",
        "1.2.3",
        False,
        "dalle_missing_module_xyz not installed",
    )
    assert rows["attention", "sdpa"].usable and rows["attention", "sdpa"].reason == ""
    assert {kind for kind, _ in rows} == set(plugins.KINDS)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('register("x", 42)', "not callable"),
        ('register("", object)', "non-empty string"),
        ('register("x", object, loader=print)', r"valid keys for attention are \['description'"),
        ('register("x", object, requires=(None,))', "tuple of module names"),
    ],
)
def test_bad_registrations_are_errors(fake, call, message):
    fake.add(
        f"""
        from dalle_core.hookspecs import hookimpl

        @hookimpl
        def dalle_register_attention(register):
            {call}
        """
    )
    with pytest.raises(TypeError, match=message):
        registry("attention")


def test_manager_and_registries_are_built_once():
    manager, vaes = get_plugin_manager(), registry("vaes")
    assert get_plugin_manager() is manager and registry("vaes") is vaes
    reset_plugins()
    assert get_plugin_manager() is not manager and registry("vaes") is not vaes


def write_vae_config(directory: Path, name: str) -> Path:
    directory.mkdir()
    meta = {"class": "fake.FakeVAE", "name": name, "config": {}}
    (directory / "config.json").write_text(json.dumps(meta))
    return directory


def test_load_vae_defaults_to_the_factory_from_pretrained(fake, tmp_path):
    fake.add(FAKE_VAE)
    directory = write_vae_config(tmp_path / "vae", "fake")
    assert load_vae(directory).config == {"loaded_from": str(directory)}


def test_load_vae_uses_the_registered_loader(fake, tmp_path):
    fake.add(
        """
        from dalle_core.hookspecs import hookimpl

        @hookimpl
        def dalle_register_vaes(register):
            register("fake", dict, loader=lambda directory: ("loaded", directory.name))
        """
    )
    assert load_vae(write_vae_config(tmp_path / "vae", "fake")) == ("loaded", "vae")


def test_load_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_vae(tmp_path)
    with pytest.raises(ValueError, match="names no VAE plugin .* and there is no dalle_plugin.json"):
        load_vae(write_vae_config(tmp_path / "unnamed", ""))
    with pytest.raises(
        UnknownPluginError, match=r"unknown VAE 'openai'.*pip install dalle-vae-openai"
    ):
        load_vae(write_vae_config(tmp_path / "openai", "openai"))


OWN_FORMAT_VAE = """
    import json
    from pathlib import Path

    import pluggy
    import torch
    from torch import nn

    hookimpl = pluggy.HookimplMarker("dalle")  # no import of dalle-core at all

    class OwnFormatVAE(nn.Module):
        \"\"\"A VAE as plugin authors write one: its own config.json, no 'class' field.\"\"\"

        def __init__(self, image_size=8, num_tokens=5, sharpness=1.0):
            super().__init__()
            self.image_size, self.channels, self.num_tokens, self.fmap_size = image_size, 3, num_tokens, 2
            self.sharpness = sharpness
            self.to_logits = nn.Conv2d(3, num_tokens, 1)
            self.codebook = nn.Embedding(num_tokens, 3)

        def get_codebook_indices(self, images):  # [B, 3, H, W] -> [B, 4]
            pooled = nn.functional.adaptive_avg_pool2d(images, 2)
            return (self.to_logits(pooled) * self.sharpness).argmax(1).flatten(1)

        def decode(self, codes):  # [B, 4] -> [B, 3, H, W]
            grid = self.codebook(codes).view(-1, 2, 2, 3).permute(0, 3, 1, 2)
            return nn.functional.interpolate(grid, size=self.image_size).sigmoid()

        def save_pretrained(self, directory):
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            config = {"image_size": self.image_size, "num_tokens": self.num_tokens,
                      "sharpness": self.sharpness}
            (directory / "config.json").write_text(json.dumps(config))
            torch.save(self.state_dict(), directory / "weights.pt")

        @classmethod
        def from_pretrained(cls, directory):
            directory = Path(directory)
            vae = cls(**json.loads((directory / "config.json").read_text()))
            vae.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
            return vae

    def build(**kwargs):
        return OwnFormatVAE(**kwargs)

    @hookimpl
    def dalle_register_vaes(register):
        register("own-format", OwnFormatVAE)
        register("own-format-by-function", build, loader=OwnFormatVAE.from_pretrained)
"""


@pytest.mark.parametrize("name", ["own-format", "own-format-by-function"])
def test_a_vae_with_its_own_files_round_trips_inside_a_dalle_checkpoint(fake, tmp_path, name):
    from dalle_core import DALLE

    fake.add(OWN_FORMAT_VAE, dist="dalle-own-format-vae", version="0.4.0")
    vae = create_vae(name, sharpness=3.0)
    dalle = DALLE(dim=16, vae=vae, num_text_tokens=20, text_seq_len=4, depth=1, heads=2, dim_head=8)
    dalle.save_pretrained(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "vae" / plugins.VAE_RECORD).read_text())
    assert record == {"name": name, "package": "dalle-own-format-vae", "version": "0.4.0",
                      "class": "dalle_own_format_vae.OwnFormatVAE"}
    assert "class" not in json.loads((tmp_path / "model" / "vae" / "config.json").read_text())

    loaded = DALLE.from_pretrained(tmp_path / "model")
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert loaded.vae.sharpness == 3.0
    assert torch.equal(loaded.vae.get_codebook_indices(images), vae.get_codebook_indices(images))
    assert plugins.vae_plugin_name(loaded.vae) == name  # saved again, it is recorded again


def test_a_vae_of_a_registered_class_is_known_without_create_vae(fake):
    module = fake.add(OWN_FORMAT_VAE, dist="dalle-own-format-vae")
    vae = importlib.import_module(module).OwnFormatVAE()  # built directly, not through the registry
    assert plugins.vae_plugin_name(vae) == "own-format"
    assert plugins.vae_save_problem(vae) is None


def test_a_vae_that_could_not_be_rebuilt_is_refused_before_anything_is_written(fake, tmp_path):
    module = importlib.import_module(fake.add(OWN_FORMAT_VAE, dist="dalle-own-format-vae"))

    class Unregistered(module.OwnFormatVAE):
        pass

    with pytest.raises(TypeError, match=r"\(Unregistered\) was not made by a registered VAE plugin.*"
                                        r"dalle_register_vaes"):
        plugins.save_vae(Unregistered(), tmp_path / "a")
    fake.add(
        """
        from dalle_core.hookspecs import hookimpl

        class NoLoader:
            def save_pretrained(self, directory):
                raise AssertionError("never called: refused first")

        @hookimpl
        def dalle_register_vaes(register):
            register("no-loader", NoLoader)
        """,
        dist="dalle-no-loader",
    )
    reset_plugins()  # the registry was built before this package was added
    with pytest.raises(TypeError, match=r"'no-loader' \(from dalle-no-loader\) registers no loader and "
                                        r"its factory has no from_pretrained"):
        plugins.save_vae(create_vae("no-loader"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_broken_vae_record_is_named(tmp_path):
    (tmp_path / plugins.VAE_RECORD).write_text("{}")
    with pytest.raises(ValueError, match=r"dalle_plugin\.json is not a VAE record with a 'name' field"):
        load_vae(tmp_path)


def test_load_tokenizer_without_from_pretrained_calls_the_factory(fake, tmp_path):
    fake.add(
        """
        from dalle_core.hookspecs import hookimpl

        @hookimpl
        def dalle_register_tokenizers(register):
            register("words", lambda **config: ("built", config))
        """
    )
    meta = {"name": "words", "config": {"lowercase": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(meta))
    assert load_tokenizer(tmp_path) == ("built", {"lowercase": True})


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"config": {}}')
    with pytest.raises(ValueError, match="'name' field"):
        load_tokenizer(tmp_path)
