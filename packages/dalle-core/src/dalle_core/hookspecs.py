"""The plugin hooks of dalle, and the markers to declare and implement them.

A plugin is a module (or object) whose functions are marked with `hookimpl` and named after
one of the hooks below. Installed packages are found through the entry-point group ``dalle``::

    [project.entry-points.dalle]
    my_vae = "my_package.plugin"

Every hook takes one argument, ``register``, and calls it once per thing it provides::

    register(name, factory, **metadata)

- ``name``: the name users pass (``--vae NAME``, ``attn_kernel=NAME``); unique across all
  installed packages for one hook.
- ``factory``: a callable (usually a class) that builds the thing; it is called only when the
  name is used. Register factories, never instances: listing plugins must not download weights
  or import heavy libraries, so a factory imports them when it is called.
- ``metadata``, all optional:

  - ``requires``: tuple of importable module names the factory needs (``("triton",)``); while
    one is missing the entry is listed as unusable, e.g. "triton not installed".
  - ``install``: the command that installs what ``requires`` names, when a plain ``pip install``
    of a module name is not it (``"pip install --no-build-isolation youtokentome==1.0.6"``);
    using the entry while it is unusable says to run it.
  - ``description``: one line shown by ``dalle-train plugins``.
  - ``loader``: VAEs only: ``callable(directory) -> vae`` that rebuilds a saved VAE
    (default: ``factory.from_pretrained``).

Core's own tokenizer, VAE, kernels and backend are registered by `dalle_core.builtin` with the
same `hookimpl`, exactly as a third-party plugin would.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT_NAME = "dalle"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: ``register(name, factory, **metadata)``, as passed to every hook
Register = Callable[..., None]


@hookspec
def dalle_register_tokenizers(register: Register) -> None:
    """Register text tokenizers: ``register(name, factory, **metadata)``.

    ``factory(**kwargs)`` receives the user's tokenizer options (for example ``bpe_path``) and
    returns a `dalle_core.interfaces.Tokenizer` whose ``plugin_name`` is ``name``. A tokenizer
    saved with ``Tokenizer.save_pretrained`` is rebuilt by ``factory.from_pretrained(directory,
    **config)`` when the factory has that method, otherwise by ``factory(**config)``.
    """


@hookspec
def dalle_register_vaes(register: Register) -> None:
    """Register image VAEs: ``register(name, factory, loader=..., **metadata)``.

    ``factory(**kwargs)`` receives constructor keywords and returns an ``nn.Module`` fitting
    `dalle_core.interfaces.ImageVAE` (``image_size``, ``channels``, ``num_tokens``,
    ``fmap_size``, ``get_codebook_indices``, ``decode``) with a ``save_pretrained(directory)``
    that writes its own files in its own format. `dalle_core.plugins.save_vae` (which a DALLE
    checkpoint uses) records ``name`` beside them, and `dalle_core.plugins.load_vae` rebuilds
    the VAE with the ``loader`` metadata, ``loader(directory) -> vae``, defaulting to
    ``factory.from_pretrained``.
    """


@hookspec
def dalle_register_attention(register: Register) -> None:
    """Register attention kernels: ``register(name, factory, **metadata)``.

    ``factory(**kwargs)`` returns a `dalle_core.attention.kernels.AttentionKernel`; the kernel
    itself declares the patterns, devices and dtypes it supports. ``attn_kernel="auto"``
    builds every usable kernel with no arguments, so each keyword needs a default, and
    construction must stay cheap (compile lazily, on the first call). Use ``requires`` for
    optional libraries such as triton.
    """


@hookspec
def dalle_register_backends(register: Register) -> None:
    """Register distributed backends: ``register(name, factory, **metadata)``.

    ``factory(**kwargs)`` returns a `dalle_core.interfaces.DistributedBackend` without joining
    any process group (the trainer calls ``initialize``). Use ``requires`` for optional
    libraries such as deepspeed or horovod.
    """
