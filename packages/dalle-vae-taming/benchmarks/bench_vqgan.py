"""Encode/decode time of VQGanVAE against the plain taming calls upstream dalle-pytorch made,
on the architecture of the published ImageNet f16 1024-code VQGAN (random weights: the speed
does not depend on them; nothing is downloaded).

    OMP_NUM_THREADS=1 python benchmarks/bench_vqgan.py [--batch 2] [--repeats 3] [--device cpu]

Prints milliseconds per image for both and their ratio (VQGanVAE / reference; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dalle_vae_taming import VQGanVAE
from dalle_vae_taming.config import parse_vqgan_config
from dalle_vae_taming.network import TamingVQGAN

#: ``model`` section of the published vqgan.1024.config.yml (lossconfig left out: training only)
IMAGENET_F16_1024 = """model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 1024
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
"""


def reference_encode(model: TamingVQGAN, images: torch.Tensor) -> torch.Tensor:
    """Upstream's get_codebook_indices: ``(2x - 1)`` -> encoder -> quant_conv -> quantize."""
    h = model.quant_conv(model.encoder(2 * images - 1))
    _, _, (_, _, indices) = model.quantize(h)
    return indices.view(images.shape[0], -1)


def reference_decode(model: TamingVQGAN, codes: torch.Tensor, fmap: int) -> torch.Tensor:
    """Upstream's decode: one-hot @ codebook -> post_quant_conv -> decoder -> clamp -> [0, 1]."""
    one_hot = F.one_hot(codes, model.quantize.n_e).float()
    z = (one_hot @ model.quantize.embedding.weight).view(codes.shape[0], fmap, fmap, -1).permute(0, 3, 1, 2)
    return (model.decoder(model.post_quant_conv(z)).clamp(-1, 1) + 1) * 0.5


def timed_pair(ours, reference, repeats: int) -> tuple[float, float]:
    """Best of ``repeats`` wall times of ``ours()`` and ``reference()``, in seconds, measured
    alternately (so load from other processes hits both alike), after one warm-up call each."""
    best = [float("inf"), float("inf")]
    for repeat in range(repeats + 1):
        for index, fn in enumerate((ours, reference)):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if repeat:
                best[index] = min(best[index], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:  # the published file formats, random weights
        config, ckpt = Path(tmp, "model.yaml"), Path(tmp, "last.ckpt")
        config.write_text(IMAGENET_F16_1024)
        torch.manual_seed(0)
        torch.save(
            {"state_dict": TamingVQGAN(parse_vqgan_config(IMAGENET_F16_1024, "bench")).state_dict()}, ckpt
        )
        vae = VQGanVAE(vqgan_model_path=ckpt, vqgan_config_path=config).to(args.device)
    model = vae.model
    images = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(args.device)
    codes = vae.get_codebook_indices(images)
    with torch.no_grad():
        assert torch.equal(reference_encode(model, images), codes)
        torch.testing.assert_close(
            vae.decode(codes), reference_decode(model, codes, vae.fmap_size), atol=1e-5, rtol=0
        )

        rows = []
        for name, ours, ref in (
            ("encode", lambda: vae.get_codebook_indices(images), lambda: reference_encode(model, images)),
            ("decode", lambda: vae.decode(codes), lambda: reference_decode(model, codes, vae.fmap_size)),
        ):
            t_ours, t_ref = timed_pair(ours, ref, args.repeats)
            rows.append((name, t_ours, t_ref))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"ImageNet f16 1024 architecture ({params:.1f}M parameters), batch {args.batch}, {args.device}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )
    for name, t_ours, t_ref in rows:
        print(
            f"{name}: VQGanVAE {1e3 * t_ours / args.batch:.0f} ms/image, reference "
            f"{1e3 * t_ref / args.batch:.0f} ms/image, ratio {t_ours / t_ref:.3f}"
        )


if __name__ == "__main__":
    main()
