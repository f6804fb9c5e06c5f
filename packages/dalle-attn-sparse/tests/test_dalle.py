"""A tiny DALLE with every attention pattern on the ``triton`` kernel (Triton's interpreter)
against the same model on core's dense ``sdpa`` kernel: loss, gradients and cached generation."""

from __future__ import annotations

import torch
from conftest import requires_interpreter

from dalle_attn_sparse import TritonSparseKernel
from dalle_core import DALLE, DiscreteVAE

pytestmark = requires_interpreter

ALL_TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")


def tiny_dalle(attn_kernel: str) -> DALLE:
    """6 text tokens, 4 x 4 image codes (22 positions), one layer per pattern, one head."""
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    return DALLE(
        dim=32, vae=vae, num_text_tokens=50, text_seq_len=6, depth=5, heads=1, dim_head=32,
        attn_types=ALL_TYPES, attn_kernel=attn_kernel,
    )


TEXT = torch.tensor([[3, 7, 9, 11, 2, 5], [4, 8, 1, 0, 0, 0]])  # the second caption is padded
IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_loss_and_gradients_match_the_dense_kernel():
    codes = torch.randint(0, 32, (2, 16))
    losses, grads = [], []
    for name in ("triton", "sdpa"):
        dalle = tiny_dalle(name)
        loss = dalle(TEXT, codes, mask=TEXT != 0, return_loss=True)
        loss.backward()
        losses.append(loss.detach())
        grads.append({key: p.grad for key, p in dalle.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-4, msg=key)


def test_cached_generation_and_the_decode_kernel_match_the_dense_kernel():
    """Generation (the prompt through the triton kernel, then dalle-core's one-token step, which
    attends densely under the pattern's mask row) samples the codes of the sdpa model; the
    transformer run one token at a time at an offset, as a caller stepping it by hand would,
    runs the decode kernel for every pattern and gives the outputs of the sdpa model."""
    codes, stepped = {}, {}
    x = torch.randn(2, 22, 32, generator=torch.Generator().manual_seed(5))
    for name in ("triton", "sdpa"):
        dalle = tiny_dalle(name).eval()
        codes[name] = dalle.generate_image_codes(  # codes 0-11 primed, 12-15 generated
            TEXT, mask=TEXT != 0, img=IMAGES, num_init_img_tokens=12,
            generator=torch.Generator().manual_seed(3),
        )
        transformer = dalle.transformer
        with torch.no_grad():
            cache = transformer.new_cache(2, 22, x)
            transformer(x[:, :18], cache=cache)
            stepped[name] = [transformer(x[:, p : p + 1], offset=p, cache=cache) for p in range(18, 22)]
        if name == "triton":
            chosen = transformer.kernels._choices
            assert {kind for kind, *_, decoding in chosen if decoding} == set(ALL_TYPES)
            assert all(isinstance(kernel, TritonSparseKernel) for kernel in chosen.values())
    assert torch.equal(codes["triton"], codes["sdpa"])
    for got, expected in zip(stepped["triton"], stepped["sdpa"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
