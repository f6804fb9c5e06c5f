"""Small building blocks shared by the DALLE and CLIP transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity for ``p == 0`` (no operator at all on every call)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class _GEGLU(torch.autograd.Function):
    """``h = (x, gates) [..., 2 * m] -> x * gelu(gates) [..., m]``, with a backward that writes
    both halves of the gradient into one tensor (autograd's own concatenates them)."""

    @staticmethod
    def forward(autograd_ctx, h: Tensor) -> Tensor:
        x, gates = h.chunk(2, dim=-1)
        activated = F.gelu(gates)
        autograd_ctx.save_for_backward(x, gates, activated)
        return x * activated

    @staticmethod
    @once_differentiable
    def backward(autograd_ctx, grad: Tensor) -> Tensor:
        x, gates, activated = autograd_ctx.saved_tensors
        grad_h = grad.new_empty((*grad.shape[:-1], 2 * grad.shape[-1]))
        grad_x, grad_gates = grad_h.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_x)
        torch.ops.aten.gelu_backward.grad_input(grad * x, gates, grad_input=grad_gates)
        return grad_h


def geglu(h: Tensor) -> Tensor:
    """GEGLU activation: ``h = (x, gates) [..., 2 * m] -> x * gelu(gates) [..., m]``."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _GEGLU.apply(h)
    x, gates = h.chunk(2, dim=-1)
    return F.gelu(gates).mul_(x)  # no gradient: multiply into gelu's fresh output


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``x [B, N, dim] -> [B, N, dim]`` through ``dim * mult`` hidden units."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.dropout = dropout_layer(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(self.dropout(geglu(self.proj_in(x))))  # hidden [B, N, dim * mult]


class LayerScale(nn.Module):
    """Scales a residual branch by a learned per-channel factor, small at init (CaiT).

    The initial factor shrinks with depth as in the upstream project: 0.1 up to layer 18,
    1e-5 up to 24, 1e-6 beyond.
    """

    def __init__(self, dim: int, layer_index: int, fn: nn.Module):
        super().__init__()
        init_eps = 0.1 if layer_index <= 18 else 1e-5 if layer_index <= 24 else 1e-6
        self.scale = nn.Parameter(torch.full((dim,), init_eps))
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) * self.scale


class PreNorm(nn.Module):
    """LayerNorm before ``fn``, and after it too with ``sandwich`` (CogView's sandwich norm)."""

    def __init__(self, dim: int, fn: nn.Module, sandwich: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.sandwich = sandwich
        self.norm_out = nn.LayerNorm(dim) if sandwich else nn.Identity()
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.norm_out(self.fn(self.norm(x), **kwargs))


class DivideMax(nn.Module):
    """Divides by the (detached) maximum along ``dim``: keeps fp16 logits in range."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x / x.amax(dim=self.dim, keepdim=True).detach()
