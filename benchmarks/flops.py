"""Analytic matmul FLOP counts of a DALLE training step or generation (multiply-add = 2 FLOPs).

Counted: every ``nn.Linear`` of the transformer (qkv, output projection, feed-forward), the
attention scores and values (``4 * dim_head`` FLOPs per head and per query-key pair), and the
output heads. Not counted: embeddings, norms, softmax, elementwise work, the optimizer. A
training step is ``3 x`` the forward (the backward computes gradients for inputs and weights).
The frozen VAE encoder (pixel inputs) runs forward only; its convolutions are counted by shape.
"""

from __future__ import annotations

import torch
from torch import nn

from dalle_core import DALLE


def attention_pairs(model: DALLE, mode: str) -> list[int]:
    """Query-key pairs per layer over the whole training sequence.

    ``allowed``: the pairs the pattern lets attend (the useful work); ``ours``: what our model
    computes (fused causal attention skips the blocks above the diagonal for ``full``; other
    patterns run on a dense mask over all ``N x N``); ``dense``: all ``N x N`` (explicit scores).
    """
    n = model.seq_len
    pairs = []
    for pattern in model.transformer.patterns:
        if mode == "dense" or (mode == "ours" and pattern.kind != "full"):
            pairs.append(n * n)
        elif pattern.kind == "full":
            pairs.append(n * (n + 1) // 2)
        else:
            pairs.append(int(pattern.dense_mask(n, n).sum()))
    return pairs


def linear_flops_per_token(model: DALLE) -> int:
    """FLOPs per token of every linear layer of the transformer (a shared layer once per use)."""
    tf = model.transformer
    return sum(
        2 * module.in_features * module.out_features
        for branch in (*tf.attn_branches, *tf.ff_branches)
        for module in branch.modules()
        if isinstance(module, nn.Linear)
    )


def forward_flops(model: DALLE, batch: int, attention: str, logits: str) -> dict[str, float]:
    """FLOPs of one training forward of the transformer and heads, by part.

    ``logits``: ``split`` (text positions over the text vocabulary, image positions over the
    codebook, as our model) or ``full`` (every position over the whole vocabulary, as upstream).
    """
    n, dim = model.seq_len, model.final_norm.normalized_shape[0]
    linears = linear_flops_per_token(model)
    heads, dim_head = model.transformer.heads, model.transformer.dim_head
    attn = sum(attention_pairs(model, attention)) * 4 * dim_head * heads
    text_vocab, image_vocab = model.total_text_tokens, model.num_image_tokens
    if logits == "split":
        head = 2 * dim * (model.text_seq_len * text_vocab + model.image_seq_len * image_vocab)
    else:
        head = 2 * dim * n * (text_vocab + image_vocab)
    return {
        "linear": float(batch * n * linears),
        "attention": float(batch * attn),
        "logits": float(batch * head),
    }


def vae_encoder_flops(vae: nn.Module, images: torch.Tensor) -> float:
    """Convolution FLOPs of one ``get_codebook_indices`` call, measured by shape with hooks."""
    total = 0.0

    def hook(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        per_output = 2 * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += float(output.numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in vae.encoder.modules() if isinstance(m, nn.Conv2d)]
    try:
        vae.get_codebook_indices(images)
    finally:
        for handle in handles:
            handle.remove()
    return total


def training_step_flops(model: DALLE, batch: int, attention: str, logits: str,
                        images: torch.Tensor | None = None) -> float:
    """Matmul FLOPs of one training step: 3 x the transformer forward, plus the VAE encoder
    forward when ``images`` (pixels) are encoded inside the step."""
    total = 3 * sum(forward_flops(model, batch, attention, logits).values())
    if images is not None:
        total += vae_encoder_flops(model.vae, images)
    return total


def generation_flops(model: DALLE, batch: int) -> float:
    """Matmul FLOPs of a cached generation of ``batch`` images (prefill of the text, then one
    position per code, each over every earlier key; the image head on each sampled position)."""
    dim = model.final_norm.normalized_shape[0]
    linears = linear_flops_per_token(model)
    heads, dim_head = model.transformer.heads, model.transformer.dim_head
    depth = len(model.transformer.patterns)
    positions = model.seq_len
    keys = sum(range(1, positions + 1))  # position p sees p keys (+1 itself) on the full pattern
    total = batch * (positions * linears + depth * keys * 4 * dim_head * heads)
    total += batch * model.image_seq_len * 2 * dim * model.num_image_tokens
    return float(total)
