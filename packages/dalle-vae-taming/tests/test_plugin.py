"""Registration, DALL-E checkpoints that carry a VQGanVAE, and the package without taming."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from vqgan_files import VQGanFiles

from dalle_core import DALLE
from dalle_core.plugins import create_vae, load_vae, registry
from dalle_vae_taming import VQGanVAE


def test_registered_by_this_package() -> None:
    for name in ("vqgan", "gumbel-vqgan"):
        entry = registry("vaes")[name]
        assert entry.package == "dalle-vae-taming"
        assert entry.usable() == (True, "")
        assert entry.metadata["loader"] == VQGanVAE.from_pretrained


def test_create_by_name_with_upstream_keywords(vq_files: VQGanFiles) -> None:
    vae = create_vae("vqgan", vqgan_model_path=str(vq_files.model), vqgan_config_path=str(vq_files.config))
    assert isinstance(vae, VQGanVAE) and vae.num_tokens == 64


def test_dalle_checkpoint_carries_the_vqgan(gumbel_files: VQGanFiles, tmp_path: Path) -> None:
    vae = VQGanVAE(vqgan_model_path=gumbel_files.model, vqgan_config_path=gumbel_files.config)
    torch.manual_seed(0)
    dalle = DALLE(dim=32, vae=vae, num_text_tokens=50, text_seq_len=8, depth=1, heads=2, dim_head=16).eval()
    assert dalle.num_image_tokens == 128 and dalle.fmap_size == 8  # read from the VAE
    text = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loss = dalle(text, images, return_loss=True)

    dalle.save_pretrained(tmp_path / "dalle")
    # the VAE travels inside the checkpoint: no paths, no download needed to reload it
    gumbel_files.model.rename(tmp_path / "moved.ckpt")
    try:
        loaded = DALLE.from_pretrained(tmp_path / "dalle").eval()
    finally:
        (tmp_path / "moved.ckpt").rename(gumbel_files.model)
    assert isinstance(loaded.vae, VQGanVAE) and loaded.vae.is_gumbel
    assert loaded.vae.config == vae.config
    assert torch.equal(loaded.vae.get_codebook_indices(images), vae.get_codebook_indices(images))
    assert torch.equal(loaded(text, images, return_loss=True), loss)
    generated = loaded.generate_images(text[:1], generator=torch.Generator().manual_seed(3))
    assert generated.shape == (1, 3, 32, 32) and 0 <= generated.min() and generated.max() <= 1


def test_load_vae_uses_the_loader(vq_files: VQGanFiles, tmp_path: Path) -> None:
    vae = VQGanVAE(vqgan_model_path=vq_files.model, vqgan_config_path=vq_files.config)
    vae.save_pretrained(tmp_path / "vae")
    assert isinstance(load_vae(tmp_path / "vae"), VQGanVAE)


def test_without_taming_the_package_imports_lists_vqgan_and_says_what_to_install(
    vq_files: VQGanFiles,
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["taming"] = None  # as if taming-transformers-rom1504 were not installed
        import dalle_vae_taming
        from dalle_core.plugins import PluginNotUsableError, create_vae, describe_plugins
        rows = {{row.name: row for row in describe_plugins() if row.kind == "vaes"}}
        print("listed", rows["vqgan"].package, rows["vqgan"].usable, rows["vqgan"].reason)
        try:
            create_vae("vqgan")
        except PluginNotUsableError as error:
            print("create_vae:", error)
        try:
            dalle_vae_taming.VQGanVAE(vqgan_model_path={str(vq_files.model)!r},
                                      vqgan_config_path={str(vq_files.config)!r})
        except ModuleNotFoundError as error:
            print("direct:", error)
        print("taming imported:", "taming.modules" in str(list(sys.modules)))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "listed dalle-vae-taming False taming not installed" in out
    assert "create_vae: 'vqgan' (from dalle-vae-taming) cannot be used here: taming not installed" in out
    assert "direct: VQGanVAE needs Taming Transformers" in out
    assert "pip install --no-deps taming-transformers-rom1504==0.0.6" in out
    assert "taming imported: False" in out
