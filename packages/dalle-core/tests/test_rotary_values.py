"""``upstream_rotary``: rotary as the upstream project computed it (values rotated too, text
frequencies over ``dim_head // 3``), for converted upstream checkpoints; off by default."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_dalle
from torch.autograd import gradcheck

from dalle_core import DALLE
from dalle_core.transformer import apply_rotary, rotary_angles, rotary_tables, split_qkv

TEXT_LEN, FMAP = 4, 3


def rotated_tables(dim_head: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    cos, sin, rot = rotary_tables(dim_head, TEXT_LEN, FMAP, upstream=True)
    return cos.double(), sin.double(), rot


def test_split_rotating_values_has_autograds_gradients():
    cos, sin, rot = rotated_tables(dim_head=14)  # 12 of 14 features rotated, 2 passed
    n = cos.shape[0]
    qkv = torch.randn(3, 2, 2, n, 14, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: split_qkv(x, (cos, sin, rot), rotate_values=True), (qkv,))
    upstream_grads = torch.randn(3, 2, 2, n, 14, dtype=torch.float64)
    got = split_qkv(qkv, (cos, sin, rot), rotate_values=True)
    (got_grad,) = torch.autograd.grad(got, qkv, upstream_grads.unbind(0))
    plain = apply_rotary(qkv, cos, sin, rot).unbind(0)  # autograd through plain tensor ops
    (plain_grad,) = torch.autograd.grad(plain, qkv, upstream_grads.unbind(0))
    for part, reference in zip(got, plain):
        torch.testing.assert_close(part, reference, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, plain_grad, rtol=0, atol=1e-12)


def test_split_keeps_values_by_default():
    cos, sin, rot = rotated_tables(dim_head=14)
    qkv = torch.randn(3, 1, 2, cos.shape[0], 14, dtype=torch.float64)
    assert torch.equal(split_qkv(qkv, (cos, sin, rot))[2], qkv[2])
    assert not torch.equal(split_qkv(qkv, (cos, sin, rot), rotate_values=True)[2], qkv[2])


@pytest.mark.parametrize("dim_head", [6, 10, 12, 14, 16, 64])
def test_upstream_text_frequencies_divide_by_a_third_of_the_head(dim_head: int):
    third, part = dim_head // 3, (dim_head // 3) // 2 * 2
    angles = rotary_angles(dim_head, TEXT_LEN, FMAP, upstream=True)  # [seq_len, 3 * part]
    ours = rotary_angles(dim_head, TEXT_LEN, FMAP)
    half = 3 * part // 2  # (text, row, column) angles, then the same again
    assert torch.equal(angles[:, :half], angles[:, half:])
    freqs = torch.tensor([10000 ** (-2 * i / third) for i in range(third // 2)])  # upstream's
    expected_text = torch.arange(TEXT_LEN)[:, None] * freqs  # text positions' text angles
    torch.testing.assert_close(angles[:TEXT_LEN, : part // 2].double(), expected_text.double())
    torch.testing.assert_close(angles[:, part // 2 : half], ours[:, part // 2 : half])  # pixels: as before
    assert torch.equal(angles, ours) == (third % 2 == 0 or third < 5)  # odd, 2+ frequencies: changed
    assert math.isclose(angles[TEXT_LEN, 0].item(), 8192.0)  # image codes: text position 8192


def test_rotating_values_changes_the_logits_and_is_off_by_default(text):
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    plain, upstream = tiny_dalle().eval(), tiny_dalle(upstream_rotary=True).eval()
    assert plain.config["upstream_rotary"] is False and upstream.config["upstream_rotary"] is True
    upstream.load_state_dict(plain.state_dict())  # the same weights
    with torch.no_grad():
        assert not torch.allclose(upstream(text, codes), plain(text, codes), atol=1e-3)
    even = tiny_dalle(dim_head=12).eval()  # dim_head // 3 = 4: the same frequencies, values differ
    even_upstream = tiny_dalle(dim_head=12, upstream_rotary=True).eval()
    even_upstream.load_state_dict(even.state_dict())
    assert torch.equal(even_upstream.transformer.rotary_cos, even.transformer.rotary_cos)
    with torch.no_grad():
        assert not torch.allclose(even_upstream(text, codes), even(text, codes), atol=1e-3)


def test_upstream_rotary_needs_rotary_emb():
    with pytest.raises(ValueError, match="upstream_rotary=True .* needs rotary_emb=True"):
        tiny_dalle(rotary_emb=False, upstream_rotary=True)


def test_save_and_load_keep_upstream_rotary_and_old_configs_keep_their_meaning(text, tmp_path):
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    dalle = tiny_dalle(upstream_rotary=True).eval()
    dalle.save_pretrained(tmp_path / "ckpt")
    loaded = DALLE.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config["upstream_rotary"] is True and loaded.transformer.upstream_rotary
    with torch.no_grad():
        assert torch.equal(loaded(text, codes), dalle(text, codes))
    config_file = tmp_path / "ckpt" / "config.json"
    meta = json.loads(config_file.read_text())
    del meta["config"]["upstream_rotary"]  # saved before the keyword existed
    config_file.write_text(json.dumps(meta))
    assert DALLE.from_pretrained(tmp_path / "ckpt").transformer.upstream_rotary is False


@pytest.mark.parametrize("attn_type", ["full", "axial_row", "conv_like"])
@pytest.mark.parametrize("options", [{}, {"reversible": True, "shift_tokens": False}])
def test_cached_generation_equals_uncached(text, attn_type, options):
    dalle = tiny_dalle(attn_types=(attn_type, "full"), upstream_rotary=True, **options).double()

    def generate(use_cache: bool) -> torch.Tensor:
        return dalle.generate_image_codes(
            text, generator=torch.Generator().manual_seed(7), use_cache=use_cache
        )

    cached = generate(True)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, generate(False))


@pytest.mark.slow
def test_compiled_generation_samples_the_eager_codes(text):
    dalle = tiny_dalle(attn_types=("full", "axial_col"), upstream_rotary=True).eval()

    def codes(compile: bool) -> torch.Tensor:
        return dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(4), compile=compile)

    assert torch.equal(codes(True), codes(False))
