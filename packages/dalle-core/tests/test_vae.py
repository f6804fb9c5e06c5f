"""DiscreteVAE: shapes, losses, estimators, save/load and input validation (tiny sizes, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_core.interfaces import ImageVAE
from dalle_core.vae import DiscreteVAE

SMALL = {
    "image_size": 16,
    "num_layers": 2,
    "num_tokens": 32,
    "codebook_dim": 16,
    "hidden_dim": 16,
    "num_resnet_blocks": 1,
}


def small_vae(**overrides) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(**{**SMALL, **overrides})


def images(batch: int = 2, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_readme_snippet_small():
    vae = DiscreteVAE(
        image_size=32,
        num_layers=3,
        num_tokens=64,
        codebook_dim=32,
        hidden_dim=16,
        num_resnet_blocks=1,
        temperature=0.9,
        straight_through=False,
    )
    imgs = torch.randn(4, 3, 32, 32)  # as in the README: not in [0, 1], still accepted
    loss = vae(imgs, return_loss=True)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_defaults_match_upstream():
    vae = DiscreteVAE()
    assert (vae.image_size, vae.num_tokens, vae.num_layers, vae.channels) == (256, 512, 3, 3)
    assert vae.fmap_size == 32
    assert vae.codebook.weight.shape == (512, 512)
    assert vae.temperature == 0.9 and not vae.straight_through and not vae.reinmax
    assert vae.config["normalization"] == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]


@pytest.mark.parametrize("num_resnet_blocks", [0, 2])
def test_shapes(num_resnet_blocks):
    vae = small_vae(num_resnet_blocks=num_resnet_blocks)
    x = images()
    assert isinstance(vae, ImageVAE)
    assert vae.fmap_size == 4
    assert vae(x, return_logits=True).shape == (2, 32, 4, 4)
    recons = vae(x)
    assert recons.shape == x.shape
    assert recons.min() >= 0 and recons.max() <= 1
    codes = vae.get_codebook_indices(x)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    decoded = vae.decode(codes)
    assert decoded.shape == x.shape and decoded.min() >= 0 and decoded.max() <= 1
    loss, recons = vae(x, return_loss=True, return_recons=True)
    assert loss.ndim == 0 and recons.shape == x.shape


def test_get_codebook_indices_is_argmax_and_keeps_mode():
    vae = small_vae()
    vae.train()
    x = images()
    codes = vae.get_codebook_indices(x)
    assert vae.training
    assert not codes.requires_grad
    expected = vae(x, return_logits=True).argmax(dim=1).flatten(1)
    assert torch.equal(codes, expected)


def test_codes_flatten_row_major():
    """Code i of the sequence is position (i // f, i % f) of the grid, encoder and decoder alike."""
    vae = small_vae()
    codes = torch.randint(0, 32, (1, 16))
    grid = vae.codebook(codes).transpose(1, 2).reshape(1, 16, 4, 4)
    assert torch.equal(grid[0, :, 1, 2], vae.codebook.weight[codes[0, 1 * 4 + 2]])


def test_overfit_loss_decreases():
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=16)
    # structured images: a 2x2 grid of flat colours each
    grid = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    x = grid.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # [4, 3, 16, 16]
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = vae(x, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_rgba():
    vae = small_vae(channels=4)
    x = images(channels=4)
    assert vae.config["normalization"] == [[0.5, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 1.0]]
    vae(x, return_loss=True).backward()
    codes = vae.get_codebook_indices(x)
    assert vae.decode(codes).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match=r"\[B, 4, 16, 16\]"):
        vae(images(channels=3))


def test_normalization_applied_and_optional():
    vae = small_vae()
    x = images()
    assert torch.allclose(vae.norm(x), x * 2 - 1)
    assert torch.allclose(vae.denorm(vae.norm(x)), x)
    plain = small_vae(normalization=None)
    assert torch.equal(plain.norm(x), x)
    plain(x, return_loss=True).backward()
    with pytest.raises(ValueError, match="at least 5 means"):
        DiscreteVAE(**{**SMALL, "channels": 5})
    DiscreteVAE(**{**SMALL, "channels": 5, "normalization": ((0.5,) * 5, (0.5,) * 5)})


@pytest.mark.parametrize(
    "options",
    [
        {"straight_through": True},
        {"straight_through": True, "reinmax": True},
        {"reinmax": True},
        {"kl_div_loss_weight": 0.1},
        {"smooth_l1_loss": True},
    ],
)
def test_estimators_give_finite_grads(options):
    vae = small_vae(**options)
    loss = vae(images(), return_loss=True, temp=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert vae.encoder[0][0].weight.grad.abs().sum() > 0  # gradient reaches the encoder


def test_hard_codes_are_one_hot():
    for options in ({"straight_through": True}, {"reinmax": True}):
        vae = small_vae(**options)
        logits = vae(images(), return_logits=True)
        one_hot = vae._sample_codes(logits, 0.9)
        assert torch.allclose(one_hot.sum(dim=1), torch.ones(()))
        assert torch.allclose(one_hot.amax(dim=1), torch.ones(()))


def test_kl_loss_weight_adds_kl():
    x = images()
    base = small_vae()
    weighted = small_vae(kl_div_loss_weight=1.0)
    torch.manual_seed(3)
    loss_base = base(x, return_loss=True)
    torch.manual_seed(3)
    loss_kl = weighted(x, return_loss=True)
    assert loss_kl > loss_base  # KL to uniform is positive for a random encoder


def test_save_load_round_trip(tmp_path):
    vae = small_vae(channels=4, straight_through=True, kl_div_loss_weight=0.5)
    vae.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["name"] == "discrete"
    assert meta["config"]["normalization"] == [[0.5, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 1.0]]
    loaded = DiscreteVAE.from_pretrained(tmp_path)
    assert loaded.config == vae.config
    assert loaded.normalization == vae.normalization
    x = images(channels=4)
    assert torch.equal(loaded.get_codebook_indices(x), vae.get_codebook_indices(x))
    codes = vae.get_codebook_indices(x)
    assert torch.equal(loaded.decode(codes), vae.decode(codes))
    assert torch.equal(loaded(x, return_logits=True), vae(x, return_logits=True))

    none = small_vae(normalization=None)
    none.save_pretrained(tmp_path / "none")
    assert DiscreteVAE.from_pretrained(tmp_path / "none").normalization is None


@pytest.mark.parametrize("tamper", ["extra", "missing"])
def test_load_tampered_weights_raises(tmp_path, tamper):
    small_vae().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    if tamper == "extra":
        state["encoder.99.weight"] = torch.zeros(1)
        key = "encoder.99.weight"
    else:
        key = "codebook.weight"
        del state[key]
    save_file(state, path)
    with pytest.raises(KeyError, match=key):
        DiscreteVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "shape",
    [(3, 16, 16), (2, 3, 16, 8), (2, 3, 32, 32), (2, 1, 16, 16), (1, 2, 3, 16, 16)],
)
def test_bad_image_shape(shape):
    vae = small_vae()
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]") as info:
        vae(torch.rand(*shape))
    assert str(list(shape)) in str(info.value)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        vae.get_codebook_indices(torch.rand(*shape))


def test_integer_images_rejected():
    with pytest.raises(ValueError, match="floating point"):
        small_vae()(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_bad_codes():
    vae = small_vae()
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vae.decode(torch.full((1, 16), 32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vae.decode(torch.full((1, 16), -1))
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        vae.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        vae.decode(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vae.decode(torch.zeros(1, 16))


def test_bad_construction():
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* num_layers = 8"):
        DiscreteVAE(image_size=20, num_layers=3)
    with pytest.raises(ValueError, match="num_layers"):
        DiscreteVAE(image_size=16, num_layers=0)
    with pytest.raises(ValueError, match="normalization"):
        DiscreteVAE(**{**SMALL, "normalization": (0.5, 0.5)})
    # not a power of two, but divisible: allowed
    assert DiscreteVAE(**{**SMALL, "image_size": 24}).fmap_size == 6
