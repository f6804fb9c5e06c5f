"""Finding plugins and building what they register.

The plugin manager is created on first use, once: it registers core's built-in plugin
(`dalle_core.builtin`), then loads every installed package's entry points in group ``dalle``.
Each hook is then called once per plugin to fill a `Registry` per kind of plugin
(``tokenizers``, ``vaes``, ``attention``, ``backends``) whose entries know the package and
version that registered them.

Environment variables (read when the manager is created):

- ``DALLE_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points, only core's built-ins.
- ``DALLE_BLOCK_PLUGINS=name1,name2``: skip these entry points (names as in ``entry_points``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pluggy

from dalle_core import builtin, hookspecs
from dalle_core.attention.kernels import AttentionKernel
from dalle_core.interfaces import TOKENIZER_CONFIG, DistributedBackend, Tokenizer
from dalle_core.pretrained import CONFIG_NAME, package_version, read_config, write_json

DISABLE_AUTOLOAD_ENV = "DALLE_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_PLUGINS_ENV = "DALLE_BLOCK_PLUGINS"
CORE_DISTRIBUTION = "dalle-core"

#: kind of plugin -> the hook that registers it
KINDS: dict[str, str] = {
    "tokenizers": "dalle_register_tokenizers",
    "vaes": "dalle_register_vaes",
    "attention": "dalle_register_attention",
    "backends": "dalle_register_backends",
}

#: kind of plugin -> how messages call one of them
LABELS: dict[str, str] = {
    "tokenizers": "tokenizer",
    "vaes": "VAE",
    "attention": "attention kernel",
    "backends": "distributed backend",
}

#: metadata keys ``register`` understands, per kind (see `dalle_core.hookspecs`)
METADATA_KEYS: dict[str, frozenset[str]] = {
    "tokenizers": frozenset({"requires", "install", "description"}),
    "vaes": frozenset({"requires", "install", "description", "loader"}),
    "attention": frozenset({"requires", "install", "description"}),
    "backends": frozenset({"requires", "install", "description"}),
}

#: names provided by this project's optional packages, to say what to install
INSTALL_HINTS: dict[str, dict[str, str]] = {
    "tokenizers": {name: "dalle-tokenizers" for name in ("bpe", "hf", "yttm", "chinese")},
    "vaes": {
        "openai": "dalle-vae-openai",
        "vqgan": "dalle-vae-taming",
        "gumbel-vqgan": "dalle-vae-taming",
    },
    "attention": {"triton": "dalle-attn-sparse"},
    "backends": {
        "ddp": "dalle-train",
        "fsdp": "dalle-train",
        "deepspeed": "dalle-dist-deepspeed", "horovod": "dalle-dist-horovod",
    },
}


class UnknownPluginError(KeyError, ValueError):
    """A name no installed plugin registered (or an unknown kind of plugin)."""

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicatePluginError(ValueError):
    """Two plugins registered the same name for the same hook."""


class PluginNotUsableError(ImportError):
    """A registered plugin whose ``requires`` modules are not installed here."""


@dataclass(frozen=True)
class PluginEntry:
    """One registered name: its factory, where it comes from, and its metadata."""

    name: str
    factory: Callable[..., Any]
    package: str
    version: str
    metadata: Mapping[str, Any]

    @property
    def description(self) -> str:
        """The ``description`` metadata, or the first docstring line of the factory."""
        doc = (self.factory.__doc__ or "").strip().splitlines()
        return self.metadata.get("description") or (doc[0] if doc else "")

    def usable(self) -> tuple[bool, str]:
        """Whether every module in ``requires`` can be imported here, and if not why not (and
        the ``install`` metadata's command, when there is one)."""
        missing = [module for module in self.metadata["requires"] if not _importable(module)]
        if missing:
            install = self.metadata.get("install")
            remedy = f"; install it with: {install}" if install else ""
            return False, f"{', '.join(missing)} not installed{remedy}"
        return True, ""

    def create(self, **kwargs: Any) -> Any:
        """Call the factory; an error saying what to install when it is not usable here."""
        self.require_usable()
        return self.factory(**kwargs)

    def require_usable(self) -> None:
        """Raise `PluginNotUsableError`, saying what is missing, unless `usable`."""
        usable, reason = self.usable()
        if not usable:
            remedy = "" if self.metadata.get("install") else f"; install what is missing to use {self.name!r}"
            raise PluginNotUsableError(
                f"{self.name!r} (from {self.package}) cannot be used here: {reason}{remedy}"
            )


class Registry(Mapping[str, PluginEntry]):
    """The names registered for one kind of plugin, in registration order (core's first)."""

    def __init__(self, kind: str, entries: Mapping[str, PluginEntry]):
        self.kind = kind
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> PluginEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownPluginError(
                _unknown_name_message(self.kind, name, self._entries)
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the plugin registered as ``name`` with ``kwargs``."""
        return self[name].create(**kwargs)


class PluginRow(NamedTuple):
    """One line of the ``plugins`` listing."""

    kind: str
    name: str
    package: str
    version: str
    usable: bool
    reason: str
    description: str


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first call (see the module docstring)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(builtin)
    for name in _blocked_plugins():
        manager.set_blocked(name)
    if not autoload_disabled():
        manager.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    return manager


def reset_plugins() -> None:
    """Forget the plugin manager and registries (tests; after changing the env variables)."""
    get_plugin_manager.cache_clear()
    registry.cache_clear()
    usable_attention_kernels.cache_clear()


def autoload_disabled() -> bool:
    """Whether ``DALLE_DISABLE_PLUGIN_AUTOLOAD`` turns entry-point loading off."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@functools.cache
def registry(kind: str) -> Registry:
    """The `Registry` of ``kind`` (``tokenizers``, ``vaes``, ``attention`` or ``backends``)."""
    if kind not in KINDS:
        raise UnknownPluginError(
            f"unknown kind of plugin {kind!r}; valid kinds are {', '.join(KINDS)}"
        )
    manager = get_plugin_manager()
    origins = {
        id(plugin): (dist.project_name, dist.version)
        for plugin, dist in manager.list_plugin_distinfo()
    }
    origins[id(builtin)] = (CORE_DISTRIBUTION, package_version(CORE_DISTRIBUTION))
    entries: dict[str, PluginEntry] = {}
    for impl in getattr(manager.hook, KINDS[kind]).get_hookimpls():
        package, version = origins.get(id(impl.plugin), (impl.plugin_name, "unknown"))
        register = _register_function(kind, entries, impl.plugin_name, package, version)
        impl.function(**{arg: register for arg in impl.argnames})
    return Registry(kind, entries)


def create_tokenizer(name: str, **kwargs: Any) -> Tokenizer:
    """Build the tokenizer registered as ``name`` (``bytes`` is always there)."""
    return registry("tokenizers").create(name, **kwargs)


def default_tokenizer_name() -> str:
    """The tokenizer used when none is chosen: ``bpe`` (CLIP's BPE, upstream's default, from
    dalle-tokenizers) when it is installed and usable here, else dalle-core's ``bytes``."""
    entry = registry("tokenizers").get("bpe")
    return "bpe" if entry is not None and entry.usable()[0] else "bytes"


def create_vae(name: str, **kwargs: Any) -> Any:
    """Build the VAE registered as ``name`` (``discrete`` is always there); the VAE is
    remembered as made by ``name`` (`vae_plugin_name`), so `save_vae` can record it."""
    return _remember(registry("vaes").create(name, **kwargs), name)


def create_attention_kernel(name: str, **kwargs: Any) -> AttentionKernel:
    """Build the attention kernel registered as ``name`` (``sdpa``, ``flex`` are always there)."""
    return registry("attention").create(name, **kwargs)


def create_backend(name: str, **kwargs: Any) -> DistributedBackend:
    """Build the distributed backend registered as ``name`` (``none`` is always there)."""
    return registry("backends").create(name, **kwargs)


#: written by `save_vae` beside a VAE's own files: which registered plugin made it
VAE_RECORD = "dalle_plugin.json"

#: VAEs built or loaded through the registry -> the name they were built by
_vae_names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _remember(vae: Any, name: str) -> Any:
    with contextlib.suppress(TypeError):  # not weakly referable: found by type or plugin_name
        _vae_names[vae] = name
    return vae


def vae_plugin_name(vae: Any) -> str | None:
    """The registered name of the plugin that makes ``vae``, or None when none is known: the
    name it was built or loaded by (`create_vae`, `load_vae`), else its ``plugin_name`` when
    registered, else the name of the plugin whose factory is its class."""
    vaes = registry("vaes")
    remembered = None
    with contextlib.suppress(TypeError):
        remembered = _vae_names.get(vae)
    if remembered in vaes:
        return remembered
    own = getattr(vae, "plugin_name", "")
    if isinstance(own, str) and own in vaes:
        return own
    return next((name for name, entry in vaes.items() if entry.factory is type(vae)), None)


def vae_save_problem(vae: Any) -> str | None:
    """Why ``vae`` could not be saved and rebuilt by name (inside a DALLE checkpoint), or None
    when it can: it needs a ``save_pretrained(directory)``, a registered plugin that makes it,
    and a way for that plugin to load it (``loader`` metadata or ``factory.from_pretrained``)."""
    return _rebuilding_plugin(vae)[1]


def save_vae(vae: Any, directory: str | Path) -> None:
    """``vae.save_pretrained(directory)``, then `VAE_RECORD` beside its files: the registered
    name, package and version of the plugin that makes it, which `load_vae` rebuilds it with.
    A VAE that could not be rebuilt (`vae_save_problem`) is refused before anything is
    written."""
    entry, problem = _rebuilding_plugin(vae)
    if entry is None:
        raise TypeError(problem)
    directory = Path(directory)
    vae.save_pretrained(directory)
    record = {"name": entry.name, "package": entry.package, "version": entry.version,
              "class": f"{type(vae).__module__}.{type(vae).__qualname__}"}
    write_json(directory / VAE_RECORD, record)


def _rebuilding_plugin(vae: Any) -> tuple[PluginEntry | None, str | None]:
    """``(entry, None)``: the registered plugin that saves and rebuilds ``vae``; else ``(None,
    why not)``."""
    kind = type(vae).__name__
    if not callable(getattr(vae, "save_pretrained", None)):
        return None, f"the VAE ({kind}) has no save_pretrained(directory)"
    name = vae_plugin_name(vae)
    if name is None:
        return None, (f"the VAE ({kind}) was not made by a registered VAE plugin, so it could not be "
                      f"rebuilt by name: register its class with the dalle_register_vaes hook, build it "
                      f"with create_vae(name), or give it the plugin_name it is registered under")
    entry = registry("vaes")[name]
    if _vae_loader(entry) is None:
        return None, (f"VAE {name!r} (from {entry.package}) registers no loader and its factory has no "
                      f"from_pretrained, so a saved one could not be rebuilt")
    return entry, None


def saved_vae_name(directory: str | Path) -> str:
    """The plugin name a saved VAE is rebuilt by: from `VAE_RECORD` (`save_vae`), else from
    the ``name`` of a ``config.json`` written by ``PretrainedMixin.save_pretrained``."""
    directory = Path(directory)
    record = directory / VAE_RECORD
    if record.is_file():
        try:
            name = json.loads(record.read_text())["name"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{record} is not a VAE record with a 'name' field: {error}") from error
    else:
        name = read_config(directory).get("name")
    if not name:
        raise ValueError(
            f"{directory / CONFIG_NAME} names no VAE plugin (its 'name' field is empty) and there is "
            f"no {VAE_RECORD}; only a VAE saved with save_vae (or a class with a plugin_name) can be "
            f"reloaded by name"
        )
    return str(name)


def load_vae(directory: str | Path) -> Any:
    """Rebuild a VAE saved with `save_vae` (or ``PretrainedMixin.save_pretrained``) through the
    plugin that made it: its ``loader`` metadata, else its factory's ``from_pretrained``."""
    directory = Path(directory)
    name = saved_vae_name(directory)
    entry = registry("vaes")[name]
    loader = _vae_loader(entry)
    if loader is None:
        raise TypeError(
            f"VAE {name!r} (from {entry.package}) cannot be reloaded: it registers no loader "
            f"and its factory has no from_pretrained"
        )
    entry.require_usable()
    return _remember(loader(directory), name)


def _vae_loader(entry: PluginEntry) -> Callable[[Path], Any] | None:
    return entry.metadata.get("loader") or getattr(entry.factory, "from_pretrained", None)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer saved with ``Tokenizer.save_pretrained``."""
    path = Path(directory) / TOKENIZER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no saved tokenizer: {TOKENIZER_CONFIG} is missing "
            f"(it is written by Tokenizer.save_pretrained)"
        )
    try:
        meta = json.loads(path.read_text())
        name, config = meta["name"], meta.get("config", {})
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a tokenizer config with a 'name' field: {error}"
        ) from error
    entry = registry("tokenizers")[name]
    from_pretrained = getattr(entry.factory, "from_pretrained", None)
    if from_pretrained is None:
        return entry.create(**config)
    entry.require_usable()
    return from_pretrained(Path(directory), **config)


@functools.cache
def usable_attention_kernels() -> tuple[AttentionKernel, ...]:
    """One instance of every registered attention kernel usable here (for ``auto``)."""
    return tuple(entry.create() for entry in registry("attention").values() if entry.usable()[0])


def describe_plugins() -> list[PluginRow]:
    """Every registered name of every kind, with package, version and usability here."""
    return [
        PluginRow(
            kind, entry.name, entry.package, entry.version, *entry.usable(), entry.description
        )
        for kind in KINDS
        for entry in registry(kind).values()
    ]


def _blocked_plugins() -> list[str]:
    return [
        name.strip() for name in os.environ.get(BLOCK_PLUGINS_ENV, "").split(",") if name.strip()
    ]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False


def _register_function(
    kind: str, entries: dict[str, PluginEntry], plugin: str, package: str, version: str
) -> hookspecs.Register:
    """The ``register`` callback given to one plugin's hook: adds to ``entries``."""

    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{package}: a {LABELS[kind]} name must be a non-empty string, got {name!r}"
            )
        if not callable(factory):
            raise TypeError(f"{package}: the factory of {LABELS[kind]} {name!r} is not callable")
        if name in entries:
            raise DuplicatePluginError(
                f"{LABELS[kind]} {name!r} is registered by both {entries[name].package} and "
                f"{package}; uninstall one of them, or block {package}'s plugin with "
                f"{BLOCK_PLUGINS_ENV}={plugin}"
            )
        metadata = _checked_metadata(kind, name, package, metadata)
        entries[name] = PluginEntry(name, factory, package, version, metadata)

    return register


def _checked_metadata(
    kind: str, name: str, package: str, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Validate ``register`` metadata; ``requires`` becomes a tuple of module names."""
    where = f"{package}: register({name!r})"
    unknown = sorted(set(metadata) - METADATA_KEYS[kind])
    if unknown:
        raise TypeError(
            f"{where} got unknown metadata {unknown}; valid keys for {kind} are "
            f"{sorted(METADATA_KEYS[kind])}"
        )
    requires = metadata.get("requires", ())
    requires = (requires,) if isinstance(requires, str) else tuple(requires)
    if not all(isinstance(module, str) and module for module in requires):
        raise TypeError(f"{where}: requires must be a tuple of module names, got {requires!r}")
    loader = metadata.get("loader")
    if loader is not None and not callable(loader):
        raise TypeError(f"{where}: loader must be callable(directory) -> vae")
    return {**metadata, "requires": requires}


def _unknown_name_message(kind: str, name: str, available: Mapping[str, PluginEntry]) -> str:
    message = (
        f"unknown {LABELS[kind]} {name!r}; available: {', '.join(sorted(available)) or 'none'}"
    )
    package = INSTALL_HINTS[kind].get(name)
    if package:
        message += f". {name!r} is provided by {package}: pip install {package}"
    if autoload_disabled():
        message += f" (installed plugins are not loaded while {DISABLE_AUTOLOAD_ENV} is set)"
    return message
