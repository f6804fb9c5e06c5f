"""Inpainting: ``generate_images(text, img=, img_mask=)`` keeps the codes of the unmasked cells,
samples the others in raster order (each conditioned on every code before it), and agrees with
plain generation and with priming where they mean the same thing."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT_SEQ_LEN, tiny_dalle

FMAP = 4  # tiny_vae: 16 px -> 4 x 4 codes, 4 px per code
CELL = 4


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, 50, (batch, TEXT_SEQ_LEN), generator=generator)
    img = torch.rand(batch, 3, 16, 16, generator=generator)
    return text, img


def mask_of_cells(cells: list[tuple[int, int]], batch: int | None = None) -> torch.Tensor:
    """A pixel mask ``[16, 16]`` (or ``[batch, 1, 16, 16]``) touching one pixel of each cell."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    for row, col in cells:
        mask[row * CELL + 2, col * CELL + 1] = True
    return mask if batch is None else mask.expand(batch, 1, 16, 16)


def codes(dalle, text, seed=0, **kwargs):
    return dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def dalle():
    return tiny_dalle().eval()


def test_unmasked_codes_are_kept_and_only_touched_cells_are_sampled(dalle):
    text, img = inputs()
    own = dalle.image_codes(img)  # [2, 16]
    cells = [(1, 2), (3, 0), (3, 3)]
    made = codes(dalle, text, img=img, img_mask=mask_of_cells(cells), temperature=5.0)
    sampled = torch.zeros(16, dtype=torch.bool)
    sampled[[r * FMAP + c for r, c in cells]] = True
    assert torch.equal(made[:, ~sampled], own[:, ~sampled])
    assert not torch.equal(made[:, sampled], own[:, sampled])  # at temperature 5 they are drawn anew
    again = codes(dalle, text, img=img, img_mask=mask_of_cells(cells), temperature=5.0)
    assert torch.equal(made, again)  # the same seed, the same codes
    other = codes(dalle, text, seed=1, img=img, img_mask=mask_of_cells(cells), temperature=5.0)
    assert not torch.equal(made, other)


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_and_uncached_inpainting_agree(dalle, cond_scale):
    text, img = inputs()
    mask = mask_of_cells([(0, 1), (2, 2), (2, 3)])
    cached = codes(dalle, text, img=img, img_mask=mask, cond_scale=cond_scale)
    uncached = codes(dalle, text, img=img, img_mask=mask, cond_scale=cond_scale, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_full_mask_is_plain_generation_and_a_mask_of_the_last_rows_is_priming(dalle):
    text, img = inputs()
    everything = torch.ones(16, 16)
    assert torch.equal(codes(dalle, text, img=img, img_mask=everything), codes(dalle, text))
    last_rows = mask_of_cells([(r, c) for r in (2, 3) for c in range(FMAP)])
    assert torch.equal(codes(dalle, text, img=img, img_mask=last_rows),
                       codes(dalle, text, img=img, num_init_img_tokens=2 * FMAP))


def test_an_empty_mask_gives_the_image_back(dalle):
    text, img = inputs()
    assert torch.equal(codes(dalle, text, img=img, img_mask=torch.zeros(1, 16, 16)), dalle.image_codes(img))


def test_each_row_keeps_its_own_codes_under_its_own_mask(dalle):
    text, img = inputs()
    masks = torch.stack([mask_of_cells([(0, 0)]), mask_of_cells([(3, 3), (1, 1)])])[:, None]  # [2, 1, 16, 16]
    made = codes(dalle, text, img=img, img_mask=masks, temperature=5.0)
    own = dalle.image_codes(img)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, 0] = keep[1, 15] = keep[1, 5] = False
    assert torch.equal(made[keep], own[keep])


def test_sampled_codes_depend_on_the_codes_before_them_only(dalle):
    text, img = inputs(batch=1)
    mask = mask_of_cells([(2, 1)])  # position 9
    changed = img.clone()
    changed[..., 12:, :] = 1 - changed[..., 12:, :]  # the last row of cells: after position 9
    a = codes(dalle, text, img=img, img_mask=mask, temperature=0.0)
    b = codes(dalle, text, img=changed, img_mask=mask, temperature=0.0)
    assert a[0, 9] == b[0, 9]  # codes after it do not condition it
    earlier = img.clone()
    earlier[..., :8, :] = torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(5))
    probs = [dalle(text, codes(dalle, text, img=x, img_mask=mask, temperature=0.0))[0, -16 + 9]
             for x in (img, earlier)]
    assert not torch.allclose(probs[0], probs[1])  # the logits of position 9 see the codes before it


def test_the_decoded_image_keeps_the_unmasked_region(dalle):
    text, img = inputs()
    mask = torch.zeros(16, 16)
    mask[12:, 12:] = 1  # the bottom-right cell
    images = dalle.generate_images(text, img=img, img_mask=mask, generator=torch.Generator().manual_seed(0),
                                   temperature=5.0)
    reconstruction = dalle.vae.decode(dalle.image_codes(img))
    torch.testing.assert_close(images[..., :8, :8], reconstruction[..., :8, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(images[..., 12:, 12:], reconstruction[..., 12:, 12:])


def test_bad_masks_are_named(dalle):
    text, img = inputs()
    with pytest.raises(ValueError, match=r"img_mask needs img, the image whose codes are kept"):
        codes(dalle, text, img_mask=torch.ones(16, 16))
    with pytest.raises(ValueError, match=r"give img_mask or num_init_img_tokens, not both"):
        codes(dalle, text, img=img, img_mask=torch.ones(16, 16), num_init_img_tokens=3)
    with pytest.raises(ValueError, match=r"img_mask must be \[16, 16\], \[1 or 2, 16, 16\] or \[1 or 2, 1, "
                                         r"16, 16\] \(pixels of the 16 px image\), got \[8, 8\]"):
        codes(dalle, text, img=img, img_mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"got \[3, 16, 16\]"):
        codes(dalle, text, img=img, img_mask=torch.ones(3, 16, 16))
