"""Guarantees of dalle-core, each a test that fails when the promise breaks.

- Models: the images ``DiscreteVAE.decode`` makes of ``get_codebook_indices(x)`` are the ones
  its own forward pass reconstructs with hard codes, and those of a plain reference (argmax of
  the logits -> codebook rows -> decoder); the images ``DALLE.generate_images`` returns are
  ``vae.decode`` of the codes it sampled.
- Defaults the upstream README states: priming keeps "a little less than ~1/2 of the tokens"
  (``num_init_img_tokens = (14 * 32)`` of a 32 x 32 grid), full attention in every layer,
  the sequence length and code count read from the VAE (``256 / (2 ** 3) = (32 x 32 feature map)``).
- Safe loading: a checkpoint (``config.json`` + ``model.safetensors``) or training state whose
  file is a pickle that would run code is refused with an error naming the file, and the code
  never runs.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TEXT_SEQ_LEN, tiny_dalle

from dalle_core import DALLE, DiscreteVAE
from dalle_core.plugins import load_vae
from dalle_core.testing.pickles import write_code_pickle

VAE_SIZES = dict(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)


def rand_images(batch: int, channels: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("options", [{}, {"num_resnet_blocks": 1, "channels": 4}])
def test_discrete_vae_decodes_its_codes_to_the_hard_forward_reconstruction(options):
    """decode(get_codebook_indices(x)) == the forward pass with hard (straight-through) codes
    == decoder(codebook[argmax logits]) laid out [B, d, f, f] row-major, within 1e-5."""
    torch.manual_seed(0)
    vae = DiscreteVAE(**VAE_SIZES, straight_through=True, **options).eval()
    with torch.no_grad():  # logits far apart: Gumbel noise cannot move the hard sample off the argmax
        vae.encoder[-1].weight.normal_(std=1e6)
        vae.encoder[-1].bias.normal_(std=1e4)  # also where the ReLU features are all zero
    x = rand_images(3, vae.channels)
    with torch.no_grad():
        logits = vae.encoder(vae.norm(x))  # [B, num_tokens, f, f]
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 100  # Gumbel noise differs by less than 41

    codes = vae.get_codebook_indices(x)
    assert torch.equal(codes, logits.argmax(dim=1).flatten(1))
    grids = codes.view(3, vae.fmap_size, vae.fmap_size)
    assert not torch.equal(grids, grids.transpose(1, 2))  # a transposed layout would show
    decoded = vae.decode(codes)

    torch.manual_seed(1)
    with torch.no_grad():
        forward = vae(x)
    torch.testing.assert_close(decoded, forward, atol=1e-5, rtol=0)

    grid = vae.codebook.weight[logits.argmax(dim=1)].permute(0, 3, 1, 2)  # [B, d, f, f]
    with torch.no_grad():
        reference = vae.denorm(vae.decoder(grid))
    torch.testing.assert_close(decoded, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [
    {"filter_thres": 0.2, "top_p": 0.9, "temperature": 0.7},
    {"cond_scale": 3.0, "mask": torch.tensor([[True] * 6, [True] * 3 + [False] * 3])},
    {"img": rand_images(2, seed=5), "num_init_img_tokens": 5},
])
def test_generated_images_are_the_vae_decoding_of_the_sampled_codes(text, kwargs, monkeypatch):
    """generate_images == vae.decode(generate_image_codes) for the same generator state, with
    every sampling option passed through; with clip= the scores are clip's of those images."""
    dalle = tiny_dalle()
    decoded_codes = []
    decode = dalle.vae.decode
    monkeypatch.setattr(dalle.vae, "decode", lambda codes: decoded_codes.append(codes) or decode(codes))

    images = dalle.generate_images(text, generator=torch.Generator().manual_seed(7), **kwargs)
    codes = dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(7), **kwargs)
    assert len(decoded_codes) == 1 and torch.equal(decoded_codes[0], codes)
    assert torch.equal(images, decode(codes))

    clip = lambda text_, images_, text_mask=None: images_.flatten(1).sum(1)  # noqa: E731
    ranked, scores = dalle.generate_images(
        text, clip=clip, generator=torch.Generator().manual_seed(7), **kwargs
    )
    assert torch.equal(ranked, images) and torch.equal(scores, images.flatten(1).sum(1))


# ----------------------------------------------------------------------------- upstream defaults


def test_priming_keeps_14_of_32_rows_by_default(text, monkeypatch):
    """Upstream README: ``num_init_img_tokens = (14 * 32)  # ... defaults to a little less than
    ~1/2 of the tokens, as done in the paper``: with a 32 x 32 grid, exactly the first 448
    codes come from the image, the rest are sampled."""
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=64, num_layers=1, num_tokens=16, codebook_dim=8, hidden_dim=4)
    dalle = DALLE(dim=16, vae=vae, num_text_tokens=50, text_seq_len=TEXT_SEQ_LEN, depth=1, heads=1,
                  dim_head=16)
    assert dalle.image_seq_len == 32 * 32
    primed_code = 3
    monkeypatch.setattr(vae, "get_codebook_indices",
                        lambda images: torch.full((images.shape[0], 32 * 32), primed_code))
    with torch.no_grad():
        dalle.image_head.bias[primed_code] = -1e9  # never sampled: only priming can place it
    img = rand_images(2, size=64)

    codes = dalle.generate_image_codes(text, img=img, generator=torch.Generator().manual_seed(0))
    first_rows = (torch.arange(32 * 32) < 14 * 32).expand(2, -1)
    assert torch.equal(codes == primed_code, first_rows)
    explicit = dalle.generate_image_codes(text, img=img, num_init_img_tokens=14 * 32,
                                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, explicit)


def test_every_layer_uses_full_attention_by_default(text):
    """Upstream README: "By default `DALLE` will use full attention for all layers"."""
    dalle = tiny_dalle(depth=3)
    assert [pattern.kind for pattern in dalle.transformer.patterns] == ["full"] * 3
    assert dalle.config["attn_types"] == ["full"]
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    explicit = tiny_dalle(depth=3, attn_types=("full",))
    assert torch.equal(dalle(text, codes), explicit(text, codes))


def test_sequence_length_and_codes_come_from_the_readme_vae():
    """Upstream README: ``num_layers = 3  # number of downsamples - ex. 256 / (2 ** 3) = (32 x 32
    feature map)``, ``num_tokens = 8192``, and DALLE's ``vae = vae  # automatically infer (1)
    image sequence length and (2) number of image tokens``."""
    vae = DiscreteVAE(image_size=256, num_layers=3, num_tokens=8192, codebook_dim=1024, hidden_dim=64,
                      num_resnet_blocks=1, temperature=0.9)
    assert vae.fmap_size == 32
    dalle = DALLE(dim=16, vae=vae, num_text_tokens=10000, text_seq_len=256, depth=1, heads=1, dim_head=16)
    assert (dalle.image_seq_len, dalle.num_image_tokens) == (32 * 32, 8192)
    assert dalle.image_emb.num_embeddings == 8192 and dalle.image_head.out_features == 8192
    assert dalle.seq_len == 256 + 32 * 32


# ----------------------------------------------------------------------------- safe loading











@pytest.mark.parametrize("weights", ["model.safetensors", "vae/model.safetensors"])
def test_checkpoint_weights_that_are_a_code_pickle_are_refused_unrun(tmp_path, weights):
    """DALLE.from_pretrained: its own weights file or its embedded VAE's is a pickle."""
    directory = tmp_path / "dalle"
    tiny_dalle().save_pretrained(directory)
    marker = tmp_path / "marker"
    write_code_pickle(directory / weights, marker)
    with pytest.raises(ValueError, match=f"{re.escape(str(directory / weights))} is not a safetensors file"):
        DALLE.from_pretrained(directory)
    assert not marker.exists()


@pytest.mark.parametrize("load", [DiscreteVAE.from_pretrained, load_vae])
def test_vae_weights_that_are_a_code_pickle_are_refused_unrun(tmp_path, load):
    DiscreteVAE(**VAE_SIZES).save_pretrained(tmp_path / "vae")
    marker = tmp_path / "marker"
    write_code_pickle(tmp_path / "vae" / "model.safetensors", marker)
    weights = re.escape(str(tmp_path / "vae" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{weights} is not a safetensors file"):
        load(tmp_path / "vae")
    assert not marker.exists()
