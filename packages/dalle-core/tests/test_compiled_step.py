"""Compiled generation (``compile=True``): `PositionStep` computes `DecodeStep`'s function with
the position as a tensor, and its AOTInductor build samples the eager path's codes."""

from __future__ import annotations

import pytest
import torch
from conftest import STEP_OPTIONS, step_case, tiny_dalle

from dalle_core import compiled_step as compiled
from dalle_core.compiled_step import PositionStep, cache_tensors
from dalle_core.decode_step import DecodeStep


@pytest.mark.parametrize("options", STEP_OPTIONS)
def test_position_step_equals_decode_step_at_every_position(options):
    dalle, x, keep, start = step_case(options)
    transformer, seq_len = dalle.transformer, dalle.seq_len
    with torch.no_grad():
        cache = transformer.new_cache(2, seq_len, x)
        transformer(x[:, :start], key_padding_mask=keep, cache=cache)
        tensors = [cache_tensors(cache), cache_tensors(transformer.new_cache(2, seq_len, x))]
        for written, copy in zip(tensors[0][0], tensors[1][0]):  # keys and values
            copy.fill_(float("nan"))  # positions not yet written: masked, never multiplied
            copy[:, :, :, :start] = written[:, :, :, :start]
        for written, copy in zip(tensors[0][1], tensors[1][1]):  # token shift's histories
            copy.copy_(written)
        step = DecodeStep(transformer, cache, start, keep)
        position_step = PositionStep(dalle, seq_len).eval()
        for position in range(start, seq_len):
            expected = dalle._image_logits(dalle._next_hidden(step, x[:, position], position))
            got = position_step(x[:, position], torch.tensor([position]), keep, *tensors[1])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_compiled_generation_samples_the_eager_codes_and_follows_weight_changes(text):
    dalle = tiny_dalle(attn_types=("full", "conv_like"), sandwich_norm=True).eval()
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(mask=text != 0, cond_scale=3.0, img=image, num_init_img_tokens=5, filter_thres=0.5)

    def codes(compile: bool) -> torch.Tensor:
        return dalle.generate_image_codes(
            text, generator=torch.Generator().manual_seed(4), compile=compile, **kwargs
        )

    before = codes(False)
    assert torch.equal(codes(True), before)
    first = compiled._COMPILED[dalle][1]
    assert torch.equal(codes(True), before)
    assert compiled._COMPILED[dalle][1] is first and len(first) == 1  # compiled once
    with torch.no_grad():
        dalle.transformer.ff_branches[1].scale.mul_(30.0)  # as an optimizer step would
    after = codes(False)
    assert not torch.equal(after, before)  # the change shows in the codes
    assert torch.equal(codes(True), after)
    assert compiled._COMPILED[dalle][1] is not first  # recompiled for the new weights


def test_compile_needs_the_cache_and_no_autocast(text):
    dalle = tiny_dalle()
    with pytest.raises(ValueError, match="use_cache=True"):
        dalle.generate_image_codes(text, compile=True, use_cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        dalle.generate_image_codes(text, compile=True)
