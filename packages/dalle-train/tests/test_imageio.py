"""Pillow images <-> tensors: exact round trips, clamping, and the errors for other modes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dalle_train.imageio import to_bytes, to_pil, to_tensor


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (4, "RGBA")])
def test_a_picture_of_whole_levels_round_trips_exactly(channels, mode):
    levels = torch.randint(0, 256, (channels, 5, 7), generator=torch.Generator().manual_seed(0))
    picture = to_pil(levels.float() / 255)
    assert picture.mode == mode and picture.size == (7, 5)
    assert torch.equal(to_bytes(picture), levels.to(torch.uint8))
    torch.testing.assert_close(to_tensor(picture), levels.float() / 255, rtol=0, atol=0)


def test_values_outside_zero_to_one_are_clamped_when_written():
    image = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7, 3.0]).view(1, 1, 6).expand(3, 1, 6)
    assert to_bytes(to_pil(image))[0, 0].tolist() == [0, 0, 128, 255, 255, 255]


def test_other_modes_and_channel_counts_are_refused_with_what_would_do():
    with pytest.raises(ValueError, match="image mode 'L': convert to RGB or RGBA first"):
        to_tensor(Image.new("L", (4, 4)))
    with pytest.raises(ValueError, match="images with 2 channels cannot be written: expected 3 or 4"):
        to_pil(torch.zeros(2, 4, 4))
