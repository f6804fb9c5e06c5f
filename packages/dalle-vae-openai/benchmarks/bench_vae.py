"""Time OpenAIDiscreteVAE's encode and decode at full size (random weights of OpenAI's
architecture: 8192 codes, 256 px, f8), and decoding by gathered embeddings against the
reference one-hot decoding, measured in the same run (the gather saves the one-hot input,
``B x 8192 x 32 x 32`` floats = 32 MiB per image, and one 1 x 1 convolution over it).

    python benchmarks/bench_vae.py [--device cpu|cuda] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dalle_vae_openai import Decoder, Encoder, OpenAIDiscreteVAE, unmap_pixels


def best_times(fns, repeats: int, device: torch.device) -> list[float]:
    """Fastest of ``repeats`` runs of each of ``fns`` after one warm-up, in seconds; the
    functions take turns, so that a busy machine slows them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            fn_times.append(time.perf_counter() - start)
    return [min(fn_times) for fn_times in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    vae = OpenAIDiscreteVAE.from_networks(Encoder(), Decoder()).to(device)
    images = torch.rand(args.batch, 3, 256, 256, device=device)  # [B, 3, 256, 256]
    codes = vae.get_codebook_indices(images)  # [B, 1024]

    def reference_decode() -> torch.Tensor:  # OpenAI's way: a one-hot [B, 8192, 32, 32] input
        one_hot = F.one_hot(codes.view(-1, 32, 32), vae.num_tokens).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return unmap_pixels(torch.sigmoid(vae.dec(one_hot)[:, :3]))

    torch.testing.assert_close(vae.decode(codes), reference_decode(), atol=1e-4, rtol=1e-4)
    encode_s, decode_s, reference_s = best_times(
        [lambda: vae.get_codebook_indices(images), lambda: vae.decode(codes), reference_decode],
        args.repeats, device,
    )
    print(f"device {device}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"encode: {args.batch / encode_s:.2f} images/s")
    print(f"decode: {args.batch / decode_s:.2f} images/s (one-hot reference: {args.batch / reference_s:.2f} "
          f"images/s, speed-up {reference_s / decode_s:.2f}x)")


if __name__ == "__main__":
    main()
