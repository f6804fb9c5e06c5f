"""Reversible residual layers (RevNet / Reformer): activation memory independent of depth.

Two streams start as copies of the input; each layer computes ``y1 = x1 + f(x2)``,
``y2 = x2 + g(y1)``, and the output is ``(y1 + y2) / 2``. The backward pass rebuilds each
layer's inputs from its outputs instead of storing them, at the cost of running every layer
again. Dropout draws are replayed exactly by saving the random state before each branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _RandomState:
    """Random state of the CPU (and the tensor's GPU) before a branch ran, to replay it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(autograd_ctx, x1: Tensor, x2: Tensor, layers: ReversibleSequence, ctx):
        autograd_ctx.layers, autograd_ctx.ctx, autograd_ctx.states = layers, ctx, []
        for f, g in zip(layers.f_blocks, layers.g_blocks):
            f_state = _RandomState(x1.device)
            x1 = x1 + f(x2, ctx=ctx, cache=None)
            g_state = _RandomState(x1.device)
            x2 = x2 + g(x1, ctx=ctx, cache=None)
            autograd_ctx.states.append((f_state, g_state))
        autograd_ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(autograd_ctx, dy1: Tensor, dy2: Tensor):
        y1, y2 = autograd_ctx.saved_tensors
        layers, ctx = autograd_ctx.layers, autograd_ctx.ctx
        blocks = zip(layers.f_blocks, layers.g_blocks, autograd_ctx.states)
        for f, g, (f_state, g_state) in reversed(list(blocks)):
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_()
                with g_state.replay():
                    g_out = g(y1, ctx=ctx, cache=None)
                torch.autograd.backward(g_out, dy2)
            with torch.no_grad():
                x2 = y2 - g_out
                dy1 = dy1 + y1.grad
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_()
                with f_state.replay():
                    f_out = f(x2, ctx=ctx, cache=None)
                torch.autograd.backward(f_out, dy1)
            with torch.no_grad():
                y1, y2 = y1 - f_out, x2
                dy2 = dy2 + x2.grad
        return dy1, dy2, None, None


class ReversibleSequence:
    """Runs paired branches ``f_blocks[i]`` (attention) and ``g_blocks[i]`` (feed-forward)
    reversibly. Holds references only: the modules are registered by their owner."""

    def __init__(self, f_blocks: Sequence[nn.Module], g_blocks: Sequence[nn.Module]):
        self.f_blocks, self.g_blocks = f_blocks, g_blocks

    def __call__(self, x: Tensor, ctx, cache=None) -> Tensor:
        """``x [B, n, dim]`` -> ``[B, n, dim]``; with ``cache`` (generation) no graph is kept."""
        if cache is None and torch.is_grad_enabled():
            y1, y2 = _ReversibleFunction.apply(x, x, self, ctx)
        else:
            y1 = y2 = x
            for index, (f, g) in enumerate(zip(self.f_blocks, self.g_blocks)):
                y1 = y1 + f(y2, ctx=ctx, cache=cache[index].attn if cache else None)
                y2 = y2 + g(y1, ctx=ctx, cache=cache[index].ff if cache else None)
        return (y1 + y2) / 2
