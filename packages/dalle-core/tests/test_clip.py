"""CLIP: shapes, loss, masking, save/load and input validation (tiny sizes, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_core.clip import CLIP
from dalle_core.encoder import Encoder

SMALL = {
    "dim_text": 32,
    "dim_image": 32,
    "dim_latent": 16,
    "num_text_tokens": 100,
    "text_enc_depth": 2,
    "text_seq_len": 12,
    "text_heads": 2,
    "num_visual_tokens": 64,
    "visual_enc_depth": 2,
    "visual_heads": 2,
    "visual_image_size": 16,
    "visual_patch_size": 4,
}


def small_clip(**overrides) -> CLIP:
    torch.manual_seed(0)
    return CLIP(**{**SMALL, **overrides})


def batch(b: int = 3, channels: int = 3):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 100, (b, 12), generator=g)
    image = torch.rand(b, channels, 16, 16, generator=g)
    return text, image


def test_readme_snippet_small():
    clip = CLIP(
        dim_text=32,
        dim_image=32,
        dim_latent=32,
        num_text_tokens=100,
        text_enc_depth=1,
        text_seq_len=16,
        text_heads=2,
        num_visual_tokens=64,
        visual_enc_depth=1,
        visual_image_size=32,
        visual_patch_size=8,
        visual_heads=2,
    )
    text = torch.randint(0, 100, (4, 16))
    images = torch.randn(4, 3, 32, 32)
    mask = torch.ones_like(text).bool()
    loss = clip(text, images, text_mask=mask, return_loss=True)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_defaults_match_upstream():
    with torch.device("meta"):  # full size, without allocating or initialising weights
        clip = CLIP()
    assert clip.text_seq_len == 256 and clip.visual_image_size == 256
    assert clip.visual_patch_size == 32 and clip.channels == 3
    assert clip.text_emb.weight.shape == (10000, 512)
    assert clip.visual_pos_emb.weight.shape == (64, 512)
    assert clip.to_visual_embedding.in_features == 3 * 32 * 32
    assert clip.to_text_latent.bias is None and clip.to_visual_latent.bias is None
    assert len(clip.text_transformer.layers) == 6
    assert small_clip().temperature.item() == 1.0


def test_scores_are_diagonal_of_similarity():
    clip = small_clip().eval()
    text, image = batch()
    scores = clip(text, image)
    assert scores.shape == (3,)
    t, i = clip.embed_text(text), clip.embed_image(image)
    assert t.shape == i.shape == (3, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    full = t @ i.t() * clip.temperature.exp()
    assert torch.allclose(scores, full.diagonal(), atol=1e-5)


def test_loss_is_symmetric_cross_entropy():
    clip = small_clip().eval()
    text, image = batch()
    loss = clip(text, image, return_loss=True)
    sim = clip.embed_text(text) @ clip.embed_image(image).t() * clip.temperature.exp()
    labels = torch.arange(3)
    expected = (
        torch.nn.functional.cross_entropy(sim, labels)
        + torch.nn.functional.cross_entropy(sim.t(), labels)
    ) / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert clip.temperature.grad is not None


def test_mask_ignores_padding():
    clip = small_clip().eval()
    text, image = batch()
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[:, 7:] = False
    other = text.clone()
    other[:, 7:] = torch.randint(1, 100, (3, 5))
    a = clip(text, image, text_mask=mask)
    b = clip(other, image, text_mask=mask)
    assert torch.allclose(a, b, atol=1e-5)
    # a shorter text (no padding) is the same text
    short = clip(text[:, :7], image)
    assert torch.allclose(a, short, atol=1e-5)


def test_empty_text_mask_is_finite():
    clip = small_clip()
    text, image = batch()
    mask = torch.zeros_like(text, dtype=torch.bool)
    mask[0, :3] = True
    loss = clip(text, image, text_mask=mask, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in clip.parameters() if p.grad is not None)


def test_patchify_order():
    clip = small_clip()
    image = torch.arange(2 * 3 * 16 * 16, dtype=torch.float).view(2, 3, 16, 16)
    patches = clip.patchify(image)
    assert patches.shape == (2, 16, 4 * 4 * 3)
    # patch 5 = grid row 1, column 1; element (p1=2, p2=3, c=1)
    assert patches[1, 5, (2 * 4 + 3) * 3 + 1] == image[1, 1, 4 + 2, 4 + 3]


def test_overfit_loss_decreases():
    clip = small_clip()
    text, image = batch(b=4)
    opt = torch.optim.Adam(clip.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = clip(text, image, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_rgba():
    clip = small_clip(channels=4)
    text, image = batch(channels=4)
    clip(text, image, return_loss=True).backward()
    with pytest.raises(ValueError, match=r"\[B, 4, 16, 16\]"):
        clip(text, batch(channels=3)[1])


def test_save_load_round_trip(tmp_path):
    clip = small_clip(channels=4).eval()
    clip.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["name"] == "clip" and meta["config"]["channels"] == 4
    loaded = CLIP.from_pretrained(tmp_path).eval()
    assert loaded.config == clip.config
    text, image = batch(channels=4)
    assert torch.equal(loaded(text, image), clip(text, image))


@pytest.mark.parametrize("tamper", ["extra", "missing"])
def test_load_tampered_weights_raises(tmp_path, tamper):
    small_clip().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    if tamper == "extra":
        key = "bogus.weight"
        state[key] = torch.zeros(1)
    else:
        key = "temperature"
        del state[key]
    save_file(state, path)
    with pytest.raises(KeyError, match=key):
        CLIP.from_pretrained(tmp_path)


def test_bad_inputs():
    clip = small_clip()
    text, image = batch()
    with pytest.raises(ValueError, match="text_seq_len=12") as info:
        clip(torch.randint(0, 100, (3, 13)), image)
    assert "[3, 13]" in str(info.value)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        clip(text[0], image)
    with pytest.raises(ValueError, match="integer"):
        clip(text.float(), image)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]") as info:
        clip(text, torch.rand(3, 3, 32, 32))
    assert "[3, 3, 32, 32]" in str(info.value)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        clip(text, torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="same batch size"):
        clip(text, image[:2])
    with pytest.raises(ValueError, match="text_mask"):
        clip(text, image, text_mask=torch.ones(3, 5, dtype=torch.bool))


def test_bad_construction():
    with pytest.raises(ValueError, match="divisible by visual_patch_size 5"):
        CLIP(**{**SMALL, "visual_patch_size": 5})
    with pytest.raises(ValueError, match="text_heads"):
        CLIP(**{**SMALL, "text_heads": 0})


def test_encoder_padding_mask():
    torch.manual_seed(0)
    enc = Encoder(dim=16, depth=2, heads=2, dim_head=8).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = enc(x, mask=mask)
    assert out.shape == (2, 6, 16)
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 16)
    # real positions do not see padded keys
    assert torch.allclose(enc(changed, mask=mask)[0, :4], out[0, :4], atol=1e-5)
    assert torch.allclose(enc(x[:1, :4])[0], out[0, :4], atol=1e-5)
