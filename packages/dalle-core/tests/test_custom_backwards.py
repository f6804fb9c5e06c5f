"""The hand-written backwards (rotary q/k split, GEGLU, token shift) against numerical
gradients, in float64 on random inputs."""

from __future__ import annotations

import torch
from torch.autograd import gradcheck

from dalle_core.layers import geglu
from dalle_core.transformer import ForwardContext, TokenShift, rotary_tables, split_qkv


def test_split_rotated_qkv_gradients():
    cos, sin, rot = rotary_tables(dim_head=20, text_len=5, fmap_size=3)
    qkv = torch.randn(3, 2, 3, cos.shape[0], 20, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: split_qkv(x, (cos.double(), sin.double(), rot)), (qkv,))


def test_geglu_gradients():
    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert gradcheck(geglu, (h,))


def test_token_shift_gradients():
    shift = TokenShift(16, text_len=4, fmap_size=3).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: shift(x, ForwardContext(0, None, None), None), (x,))
