"""DiscreteVAE against its contract: upstream layout, a plain reference forward, validation.

The reference below is written from the documented formulas (module docstring of
``dalle_core.vae`` and the upstream DALLE-pytorch ``DiscreteVAE``), addressing the weights by
their upstream state-dict names only:

- encoder: ``relu(conv4x4/2)`` per layer, residual blocks ``x + c3(relu(c2(relu(c1(x)))))``,
  a 1x1 conv to ``num_tokens`` logits; decoder: the mirror image with transposed convs;
- codes: ``F.gumbel_softmax(logits, tau=temp, dim=1, hard=straight_through)``, or ReinMax
  (arXiv 2304.08612, Algorithm 2); the code vectors are ``codes . codebook``;
- loss: MSE (or smooth L1) between the decoder output and the normalised input, plus
  ``kl_div_loss_weight * sum(q * log(q * num_tokens)) / batch``;
- images returned are ``clamp(out * std + mean, 0, 1)``.

Everything runs in float64 on tiny models, so reference and model agree to 1e-10 (same
operations, different code paths); random draws are aligned by re-seeding the global generator.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from dalle_core.vae import DiscreteVAE

# 16 px images, 2 stride-2 layers -> fmap 4 x 4 = 16 codes out of 12 tokens
SIZES = dict(image_size=16, num_layers=2, num_tokens=12, codebook_dim=6, hidden_dim=5)
TOL = dict(rtol=1e-10, atol=1e-10)  # float64, same maths on both sides


def make_vae(**overrides) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(**{**SIZES, **overrides}).double()


def rand_images(batch: int = 2, channels: int = 3, size: int = 16) -> torch.Tensor:
    """``[batch, channels, size, size]`` float64 in [0, 1]."""
    gen = torch.Generator().manual_seed(1)
    return torch.rand(batch, channels, size, size, generator=gen, dtype=torch.float64)


# -- the upstream layout ---------------------------------------------------------------------


def upstream_layout(image_size=16, num_layers=2, num_tokens=12, codebook_dim=6, hidden_dim=5,
                    channels=3, num_resnet_blocks=0) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the upstream ``DiscreteVAE`` (nothing else is saved)."""
    layout: dict[str, tuple[int, ...]] = {"codebook.weight": (num_tokens, codebook_dim)}

    def conv(name, cin, cout, k, transposed=False):
        layout[f"{name}.weight"] = (cin, cout, k, k) if transposed else (cout, cin, k, k)
        layout[f"{name}.bias"] = (cout,)

    def resblock(name):
        conv(f"{name}.net.0", hidden_dim, hidden_dim, 3)
        conv(f"{name}.net.2", hidden_dim, hidden_dim, 3)
        conv(f"{name}.net.4", hidden_dim, hidden_dim, 1)

    r, n = num_resnet_blocks, num_layers
    for i in range(n):
        conv(f"encoder.{i}.0", channels if i == 0 else hidden_dim, hidden_dim, 4)
    for i in range(r):
        resblock(f"encoder.{n + i}")
    conv(f"encoder.{n + r}", hidden_dim, num_tokens, 1)

    first = 0
    if r:
        conv("decoder.0", codebook_dim, hidden_dim, 1)
        for i in range(r):
            resblock(f"decoder.{1 + i}")
        first = 1 + r
    for j in range(n):
        cin = codebook_dim if (j == 0 and not r) else hidden_dim
        conv(f"decoder.{first + j}.0", cin, hidden_dim, 4, transposed=True)
    conv(f"decoder.{first + n}", hidden_dim, channels, 1)
    return layout


@pytest.mark.parametrize("num_resnet_blocks", [0, 2])
def test_state_dict_is_the_upstream_layout(num_resnet_blocks):
    """Exactly the upstream keys and shapes (no normalisation buffers, no extra modules), and an
    upstream-shaped state dict loads with ``strict=True``."""
    vae = make_vae(num_resnet_blocks=num_resnet_blocks)
    state = vae.state_dict()
    expected = upstream_layout(num_resnet_blocks=num_resnet_blocks)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    upstream_state = {k: torch.randn(shape, dtype=torch.float64) for k, shape in expected.items()}
    vae.load_state_dict(upstream_state, strict=True)


# -- a plain reference forward ---------------------------------------------------------------


def ref_resblock(p, name, x):
    h = F.relu(F.conv2d(x, p[f"{name}.net.0.weight"], p[f"{name}.net.0.bias"], padding=1))
    h = F.relu(F.conv2d(h, p[f"{name}.net.2.weight"], p[f"{name}.net.2.bias"], padding=1))
    return x + F.conv2d(h, p[f"{name}.net.4.weight"], p[f"{name}.net.4.bias"])


def ref_encode(vae, x_normed, n, r):
    """normalised images ``[B, C, H, W]`` -> logits ``[B, num_tokens, f, f]``."""
    p = dict(vae.named_parameters())
    h = x_normed
    for i in range(n):
        h = F.relu(F.conv2d(h, p[f"encoder.{i}.0.weight"], p[f"encoder.{i}.0.bias"], stride=2, padding=1))
    for i in range(r):
        h = ref_resblock(p, f"encoder.{n + i}", h)
    return F.conv2d(h, p[f"encoder.{n + r}.weight"], p[f"encoder.{n + r}.bias"])


def ref_decode(vae, z, n, r):
    """code vectors ``[B, d, f, f]`` -> decoder output ``[B, C, H, W]`` (normalised space)."""
    p = dict(vae.named_parameters())
    h, first = z, 0
    if r:
        h = F.conv2d(h, p["decoder.0.weight"], p["decoder.0.bias"])
        for i in range(r):
            h = ref_resblock(p, f"decoder.{1 + i}", h)
        first = 1 + r
    for j in range(n):
        w, b = p[f"decoder.{first + j}.0.weight"], p[f"decoder.{first + j}.0.bias"]
        h = F.relu(F.conv_transpose2d(h, w, b, stride=2, padding=1))
    return F.conv2d(h, p[f"decoder.{first + n}.weight"], p[f"decoder.{first + n}.bias"])


def ref_reinmax(logits, temp):
    """ReinMax, arXiv 2304.08612 Algorithm 2 (as upstream): value D, second-order gradient."""
    hard = F.gumbel_softmax(logits, tau=temp, dim=1, hard=True).detach()  # D ~ softmax(logits)
    pi0 = logits.softmax(dim=1)
    pi1 = (hard + (logits / temp).softmax(dim=1)) / 2
    pi1 = ((torch.log(pi1.clamp(min=1e-20)) - logits).detach() + logits).softmax(dim=1)
    pi2 = 2 * pi1 - 0.5 * pi0
    return pi2 - pi2.detach() + hard


def reference_forward(vae, img, *, mean, std, smooth_l1, kl_weight, straight_through, reinmax, temp,
                      n=2, r=0, seed=7):
    """(loss, recons, logits) from the documented formulas; ``mean``/``std`` are per channel."""
    m = torch.tensor(mean, dtype=img.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(1, -1, 1, 1)
    x = (img - m) / s  # [B, C, H, W]
    logits = ref_encode(vae, x, n, r)  # [B, N, f, f]
    torch.manual_seed(seed)
    if reinmax:
        codes = ref_reinmax(logits, temp)
    else:
        codes = F.gumbel_softmax(logits, tau=temp, dim=1, hard=straight_through)  # [B, N, f, f]
    z = (codes.permute(0, 2, 3, 1) @ vae.codebook.weight).permute(0, 3, 1, 2)  # [B, d, f, f]
    out = ref_decode(vae, z, n, r)  # [B, C, H, W]
    recon = F.smooth_l1_loss(out, x) if smooth_l1 else ((out - x) ** 2).mean()
    q = logits.softmax(dim=1)  # per position, over the N codes
    kl = (q * torch.log(q * vae.num_tokens)).sum() / img.shape[0]
    recons = (out * s + m).clamp(0, 1)
    return recon + kl_weight * kl, recons, logits


CASES = {
    "defaults": {},
    "smooth_l1": {"smooth_l1_loss": True},
    "kl": {"kl_div_loss_weight": 0.7},
    "kl_smooth_l1_resnet": {"kl_div_loss_weight": 0.3, "smooth_l1_loss": True, "num_resnet_blocks": 1},
    "straight_through": {"straight_through": True, "kl_div_loss_weight": 0.2},
    "reinmax": {"reinmax": True},
    "reinmax_straight_through": {"reinmax": True, "straight_through": True, "num_resnet_blocks": 1},
    "custom_norm": {"normalization": ((0.25, 0.375, 0.625), (0.25, 0.5, 0.75))},
    "no_norm": {"normalization": None, "kl_div_loss_weight": 0.1},
}


@pytest.mark.parametrize("temp", [None, 0.4, 2.5])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_the_reference(case, temp):
    """Loss, reconstructions, logits and every parameter's gradient equal the reference's, for
    each loss / estimator / normalisation option and temperature (None: the constructor's 0.9).
    Batch 2 (not 1, not 3 = channels) so the KL's batch averaging is checked."""
    options = CASES[case]
    vae = make_vae(**options)
    img = rand_images()  # [2, 3, 16, 16]
    norm = options.get("normalization", ((0.5,) * 3, (0.5,) * 3))
    mean, std = norm if norm is not None else ((0.0,) * 3, (1.0,) * 3)
    kwargs = dict(
        mean=mean, std=std, smooth_l1=options.get("smooth_l1_loss", False),
        kl_weight=options.get("kl_div_loss_weight", 0.0),
        straight_through=options.get("straight_through", False),
        reinmax=options.get("reinmax", False), temp=0.9 if temp is None else temp,
        r=options.get("num_resnet_blocks", 0),
    )
    ref_loss, ref_recons, ref_logits = reference_forward(vae, img, **kwargs)
    params = list(vae.parameters())
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)

    torch.manual_seed(7)
    loss, recons = vae(img, return_loss=True, return_recons=True, temp=temp)  # scalar, [2, 3, 16, 16]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(recons, ref_recons, **TOL)
    for name, g, ref_g in zip(dict(vae.named_parameters()), grads, ref_grads):
        assert (g is None) == (ref_g is None), name
        if g is not None:
            torch.testing.assert_close(g, ref_g, **TOL, msg=name)

    torch.manual_seed(7)
    torch.testing.assert_close(vae(img, return_loss=True, temp=temp), ref_loss, **TOL)  # loss alone
    torch.manual_seed(7)
    torch.testing.assert_close(vae(img, temp=temp), ref_recons, **TOL)  # return_loss=False
    torch.testing.assert_close(vae(img, return_logits=True), ref_logits, **TOL)
    codes = vae.get_codebook_indices(img)  # [2, 16], argmax of the logits, row-major
    assert torch.equal(codes, ref_logits.argmax(dim=1).flatten(1))


def test_kl_term_is_the_documented_kl_to_uniform():
    """``loss(w) - loss(0) == w * KL`` with KL = sum over positions and codes of
    ``q log(q N)``, divided by the batch size, for batches 1 and 2 (a batch-1 KL is > 0)."""
    for batch in (1, 2):
        img = rand_images(batch)  # [batch, 3, 16, 16]
        plain, weighted = make_vae(), make_vae(kl_div_loss_weight=2.0)
        torch.manual_seed(3)
        base = plain(img, return_loss=True)
        torch.manual_seed(3)
        loss = weighted(img, return_loss=True)
        logits = plain(img, return_logits=True).flatten(2)  # [batch, N, 16]
        q = logits.softmax(dim=1)
        kl = (q * (q.log() + math.log(12))).sum() / batch
        assert kl > 0
        torch.testing.assert_close(loss - base, 2.0 * kl, **TOL)


# -- temperature -----------------------------------------------------------------------------


def test_temperature_sharpens_soft_codes_and_forward_temp_overrides():
    """Soft Gumbel-softmax codes approach one-hot as temp -> 0 and uniform as temp -> inf;
    ``forward(temp=t)`` behaves as a model built with ``temperature=t``."""
    vae = make_vae()
    img = rand_images()
    captured = []
    vae.decoder.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    for temp in (1e-4, 1e4):
        captured.clear()
        torch.manual_seed(5)
        vae(img, temp=temp)
        z = captured[0]  # [2, d, 4, 4] = codes . codebook
        weights = vae.codebook.weight.detach()
        if temp < 1:  # every code vector is (within 1e-3) one row of the codebook
            dist = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 6), weights)  # [32, 12]
            assert dist.min(dim=1).values.max() < 1e-3
        else:  # every code vector is (within 1e-2) the codebook mean
            mean = weights.mean(dim=0)
            assert (z.permute(0, 2, 3, 1).reshape(-1, 6) - mean).abs().max() < 1e-2

    built = make_vae(temperature=0.3)
    torch.manual_seed(5)
    expected = built(img, return_loss=True)
    torch.manual_seed(5)
    torch.testing.assert_close(vae(img, return_loss=True, temp=0.3), expected, **TOL)
    torch.manual_seed(5)
    assert not torch.allclose(vae(img, return_loss=True), expected)  # default 0.9 differs


# -- defaults and validation -----------------------------------------------------------------

UPSTREAM_DEFAULTS = dict(
    image_size=256, num_tokens=512, codebook_dim=512, num_layers=3, num_resnet_blocks=0, hidden_dim=64,
    channels=3, smooth_l1_loss=False, temperature=0.9, straight_through=False, reinmax=False,
    kl_div_loss_weight=0.0,
)


def test_constructor_defaults_are_upstreams():
    params = inspect.signature(DiscreteVAE.__init__).parameters
    assert {k: params[k].default for k in UPSTREAM_DEFAULTS} == UPSTREAM_DEFAULTS
    vae = DiscreteVAE()
    assert {k: vae.config[k] for k in UPSTREAM_DEFAULTS} == UPSTREAM_DEFAULTS
    assert vae.state_dict()["encoder.0.0.weight"].shape == (64, 3, 4, 4)
    assert not vae.smooth_l1_loss


INT_ARGS = [("image_size", 1), ("num_tokens", 1), ("codebook_dim", 1), ("num_layers", 1),
            ("num_resnet_blocks", 0), ("hidden_dim", 1), ("channels", 1)]


@pytest.mark.parametrize(("name", "low"), INT_ARGS)
def test_integer_arguments_are_validated_by_name(name, low):
    for bad in (low - 1, float(SIZES.get(name, 1)), True):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer >= {low}, got {bad!r}$"):
            DiscreteVAE(**{**SIZES, name: bad})


def test_smallest_valid_sizes_work():
    """image 2 px, one layer -> a 1 x 1 grid; one token, 1-dim codebook, 1 hidden channel, grey."""
    torch.manual_seed(0)
    vae = DiscreteVAE(image_size=2, num_layers=1, num_tokens=1, codebook_dim=1, hidden_dim=1, channels=1)
    img = torch.rand(2, 1, 2, 2)  # [2, 1, 2, 2]
    vae(img, return_loss=True).backward()
    codes = vae.get_codebook_indices(img)  # [2, 1]
    assert torch.equal(codes, torch.zeros(2, 1, dtype=torch.long))
    assert vae.decode(codes).shape == (2, 1, 2, 2)
    # a one-element code tensor is range-checked too
    with pytest.raises(ValueError, match=r"^codes must be in \[0, 1\) \(num_tokens=1\), "
                                         r"got values from 1 to 1$"):
        vae.decode(torch.ones(1, 1, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0, 0.0, -0.5])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=rf"^temperature must be > 0, got {temperature}$"):
        DiscreteVAE(**SIZES, temperature=temperature)


def test_normalization_is_validated():
    with pytest.raises(ValueError, match=r"^normalization must be None or a pair \(means, stds\) of "
                                         r"per-channel numbers, got \(0\.5, 0\.5\)$"):
        DiscreteVAE(**SIZES, normalization=(0.5, 0.5))
    # too few means is an error even when there are enough stds (and the other way round)
    with pytest.raises(ValueError, match="at least 3 means and stds .* got 1 means and 3 stds"):
        DiscreteVAE(**SIZES, normalization=((0.5,), (0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match="at least 3 means and stds .* got 3 means and 1 stds"):
        DiscreteVAE(**SIZES, normalization=((0.5, 0.5, 0.5), (0.5,)))
    with pytest.raises(ValueError, match=r"^normalization stds must be non-zero, got \(0\.5, 0\.0, 0\.5\)$"):
        DiscreteVAE(**SIZES, normalization=((0.5,) * 3, (0.5, 0, 0.5)))


# -- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", [((0.25, 0.375, 0.625), (0.25, 0.5, 0.75)), None])
def test_denorm_maps_back_and_clamps_to_unit_range(normalization):
    vae = make_vae(normalization=normalization)
    mean, std = normalization if normalization else ((0.0,) * 3, (1.0,) * 3)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    out = torch.linspace(-6, 6, 2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)  # well outside
    torch.testing.assert_close(vae.denorm(out), (out * s + m).clamp(0, 1), **TOL)
    img = rand_images()
    torch.testing.assert_close(vae.norm(img), (img - m) / s, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_and_denorm_keep_the_images_dtype(dtype):
    """The statistics follow the images (``.to(images)``): a float32 model's norm/denorm of
    half-precision images stay in that precision."""
    torch.manual_seed(0)
    vae = DiscreteVAE(**SIZES)  # float32 buffers
    img = torch.rand(2, 3, 16, 16).to(dtype)
    assert vae.norm(img).dtype == dtype
    assert vae.denorm(img).dtype == dtype


# -- input errors ----------------------------------------------------------------------------


def test_input_type_errors_name_the_expected_and_given():
    vae = make_vae()
    with pytest.raises(TypeError, match=r"^images must be a tensor \[B, 3, 16, 16\], got list$"):
        vae([[0.0]])
    with pytest.raises(ValueError, match=r"got dtype torch\.uint8 \(convert uint8 images with "
                                         r"images\.float\(\) / 255\)$"):
        vae(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"^codes must be a LongTensor \[B, 16\] \(fmap_size 4 squared\), "
                                        r"got list$"):
        vae.decode([[0] * 16])
    with pytest.raises(ValueError, match=r"^codes must be an integer tensor, got dtype torch\.bool$"):
        vae.decode(torch.zeros(1, 16, dtype=torch.bool))


def test_decode_accepts_an_empty_batch():
    vae = make_vae()
    out = vae.decode(torch.zeros(0, 16, dtype=torch.long))  # [0, 16] -> [0, 3, 16, 16]
    assert out.shape == (0, 3, 16, 16)
