"""The published VQGANs this package can download by name: a YAML config and a Lightning
checkpoint each, at the URLs of the Taming Transformers authors (the ones upstream dalle-pytorch
used). The authors publish no checksums; ``sha256`` stays ``None`` until one is recorded here,
and meanwhile the digest of what was downloaded is kept in the source record of every saved model.
"""

from __future__ import annotations

from dataclasses import dataclass

from dalle_core.download import RemoteFile

_HEIBOX = "https://heibox.uni-heidelberg.de"


@dataclass(frozen=True)
class PretrainedVQGAN:
    """A published VQGAN: its config and checkpoint files."""

    name: str
    config: RemoteFile
    model: RemoteFile


#: name -> published model
PRETRAINED: dict[str, PretrainedVQGAN] = {
    model.name: model
    for model in (
        # ImageNet, f16, 1024 codes: upstream's default (file names as upstream's cache)
        PretrainedVQGAN(
            "imagenet-f16-1024",
            RemoteFile(f"{_HEIBOX}/f/6ecf2af6c658432c8298/?dl=1", "vqgan.1024.config.yml"),
            RemoteFile(f"{_HEIBOX}/f/140747ba53464f49b476/?dl=1", "vqgan.1024.model.ckpt"),
        ),
        # Open Images, f8, 8192 codes, Gumbel quantization
        PretrainedVQGAN(
            "openimages-f8-8192-gumbel",
            RemoteFile(
                f"{_HEIBOX}/d/2e5662443a6b4307b470/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
                "vqgan.gumbel.f8.8192.config.yml",
            ),
            RemoteFile(
                f"{_HEIBOX}/d/2e5662443a6b4307b470/files/?p=%2Fckpts%2Flast.ckpt&dl=1",
                "vqgan.gumbel.f8.8192.model.ckpt",
            ),
        ),
    )
}

#: what ``VQGanVAE()`` loads
DEFAULT_PRETRAINED = "imagenet-f16-1024"
#: what ``create_vae("gumbel-vqgan")`` loads
GUMBEL_PRETRAINED = "openimages-f8-8192-gumbel"
