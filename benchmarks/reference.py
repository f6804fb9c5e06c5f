"""A plain reference DALLE training step, done the way the upstream project (DALLE-pytorch 1.6.6)
does it, on a copy of the weights of one of our `DALLE` models.

What it does like upstream, and our model does not:

- one output head over the whole vocabulary (text + text padding ids + image codes), whose
  wrong half is overwritten by ``masked_fill_`` with a logits mask before a cross-entropy over
  all of it (upstream: ``to_logits``, ``logits_mask``);
- attention as ``einsum -> masked_fill_ -> softmax -> einsum`` over the full ``N x N`` score
  matrix, with the mask built again in every layer of every step (upstream: ``torch.ones(i, j)
  .triu_(j - i + 1)`` for causal attention; the other patterns' dense masks likewise);
- rotary tables turned into ``cos`` / ``sin`` in every layer, token shift with pads, chunks,
  reshapes and concatenations (upstream ``PreShiftToken``);
- the image VAE encoding done in the step, as upstream (no grad, frozen VAE).

It computes the same function as our model (our rotary layout, the same token shift, the same
per-position padding ids), so the two losses agree to float rounding: `check_same_loss` asserts
it before anything is timed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core import DALLE
from dalle_core.transformer import rotary_angles


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(angles: Tensor, t: Tensor) -> Tensor:
    """As ``rotary_embedding_torch.apply_rotary_emb``: cos / sin computed on every call."""
    rot_dim = angles.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    t = (t * angles.cos()) + (rotate_half(t) * angles.sin())
    return torch.cat((t, t_pass), dim=-1)


class ReferenceDALLE(nn.Module):
    """Upstream-style training forward over a copy of ``model``'s weights (own parameters, so
    it trains with its own optimizer). The VAE is shared (frozen in both)."""

    def __init__(self, model: DALLE):
        super().__init__()
        tf = model.transformer
        if tf.reversible is not None or model.stable:
            raise ValueError("the reference covers non-reversible, non-stable models")
        self.vae = model.vae
        self.text_seq_len, self.text_len = model.text_seq_len, model.text_len
        self.num_text_tokens = model.num_text_tokens  # without the padding ids
        self.total_text_tokens = model.total_text_tokens  # with them
        self.num_image_tokens, self.fmap_size = model.num_image_tokens, model.fmap_size
        self.loss_img_weight = model.loss_img_weight
        self.text_emb = copy.deepcopy(model.text_emb)
        self.image_emb = copy.deepcopy(model.image_emb)
        self.text_pos_emb = copy.deepcopy(model.text_pos_emb)
        self.image_row_emb = copy.deepcopy(model.image_row_emb)
        self.image_col_emb = copy.deepcopy(model.image_col_emb)
        self.attn_layers = copy.deepcopy(tf.attn_branches)  # LayerScale(PreNorm(Shifted(Attention)))
        self.ff_layers = copy.deepcopy(tf.ff_branches)  # LayerScale(PreNorm(Shifted(FeedForward)))
        self.shift_tokens = tf.shift is not None
        if tf.rotary_cos is not None:  # upstream keeps the angles and takes cos / sin per call
            angles = rotary_angles(tf.dim_head, model.text_len, model.fmap_size)
            self.register_buffer("pos_emb", angles, persistent=False)
        else:
            self.pos_emb = None
        # upstream: to_logits = LayerNorm + one Linear over the whole vocabulary
        self.norm = copy.deepcopy(model.final_norm)
        total_tokens = self.total_text_tokens + self.num_image_tokens
        self.to_logits = nn.Linear(model.final_norm.normalized_shape[0], total_tokens)
        with torch.no_grad():
            self.to_logits.weight.copy_(torch.cat((model.text_head.weight, model.image_head.weight)))
            self.to_logits.bias.copy_(torch.cat((model.text_head.bias, model.image_head.bias)))
        seq_len = model.seq_len + 1
        seq_range = torch.arange(seq_len)[None, :, None]
        logits_range = torch.arange(total_tokens)[None, None, :]
        logits_mask = ((seq_range >= self.text_seq_len) & (logits_range < self.total_text_tokens)) | (
            (seq_range < self.text_seq_len) & (logits_range >= self.total_text_tokens)
        )
        self.register_buffer("logits_mask", logits_mask, persistent=False)  # as upstream: once

    # ------------------------------------------------------------------ upstream building blocks

    def shift(self, x: Tensor) -> Tensor:
        """Upstream ``PreShiftToken``: text from the previous token (first half of the
        features), image from the code above (first quarter) and to the left (second)."""
        n, text_len, f = x.shape[1], self.text_len, self.fmap_size
        if n < text_len:
            return x
        x_text, x_img = x[:, :text_len], x[:, text_len:]
        padding = f * f - x_img.shape[1]
        x_text_shift, x_text_pass = x_text.chunk(2, dim=-1)
        x_text_shift = F.pad(x_text_shift, (0, 0, 1, -1))
        x_text = torch.cat((x_text_shift, x_text_pass), dim=-1)
        x_img = F.pad(x_img, (0, 0, 0, padding))
        x_img = x_img.reshape(x_img.shape[0], f, f, x_img.shape[-1])  # b (h w) d -> b h w d
        x_img_shift_top, x_img_shift_left, *x_img_pass = x_img.chunk(4, dim=-1)
        x_img_shift_left = F.pad(x_img_shift_left, (0, 0, 1, -1))
        x_img_shift_top = F.pad(x_img_shift_top, (0, 0, 0, 0, 1, -1))
        x_img = torch.cat((x_img_shift_top, x_img_shift_left, *x_img_pass), dim=-1)
        x_img = x_img.reshape(x_img.shape[0], f * f, x_img.shape[-1])[:, : f * f - padding]
        return torch.cat((x_text, x_img), dim=1)

    def attention(self, attn: nn.Module, x: Tensor) -> Tensor:
        """Upstream ``Attention.forward``: explicit scores, a mask built per call, softmax."""
        b, n, _ = x.shape
        h, d = attn.heads, attn.dim_head
        q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in attn.to_qkv(x).chunk(3, dim=-1))
        if self.pos_emb is not None:
            pos_emb = self.pos_emb[:n]
            q, k = apply_rotary_emb(pos_emb, q), apply_rotary_emb(pos_emb, k)
        q = q * d**-0.5
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        mask_value = -torch.finfo(dots.dtype).max
        i, j = dots.shape[-2:]
        if attn.pattern.kind == "full":
            mask = torch.ones(i, j, device=x.device).triu_(j - i + 1).bool()
        else:  # the pattern's dense mask, built from scratch in every call
            positions = torch.arange(n, device=x.device)
            mask = ~attn.pattern.allowed(positions[:, None], positions[None, :])
        dots.masked_fill_(mask, mask_value)
        weights = dots.softmax(dim=-1)
        out = torch.einsum("b h i j, b h j d -> b h i d", weights, v)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return attn.to_out(out)

    def branch(self, layer: nn.Module, x: Tensor) -> Tensor:
        """LayerScale(PreNorm(shift -> fn)) with upstream's shift and attention."""
        prenorm = layer.fn
        fn = prenorm.fn.fn  # Shifted(fn) -> fn
        y = prenorm.norm(x)
        if self.shift_tokens:
            y = self.shift(y)
        y = self.attention(fn, y) if hasattr(fn, "to_qkv") else fn(y)
        return prenorm.norm_out(y) * layer.scale

    # ------------------------------------------------------------------ the training forward

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """Loss for ``text [B, L]`` and pixels ``[B, C, H, W]`` or codes ``[B, M]``."""
        device = text.device
        text_range = torch.arange(self.text_seq_len, device=device) + self.num_text_tokens
        text = torch.where(text == 0, text_range, text)
        text = F.pad(text, (1, 0), value=0)
        tokens = self.text_emb(text)
        if self.text_pos_emb is not None:
            tokens = tokens + self.text_pos_emb(torch.arange(text.shape[1], device=device))
        if image.dim() == 4:  # upstream: vae.get_codebook_indices under no_grad, in the step
            image = self.vae.get_codebook_indices(image)
        image_emb = self.image_emb(image)
        if self.image_row_emb is not None:
            grid = torch.arange(image.shape[1], device=device)
            image_emb = image_emb + self.image_row_emb(grid // self.fmap_size)
            image_emb = image_emb + self.image_col_emb(grid % self.fmap_size)
        tokens = torch.cat((tokens, image_emb), dim=1)[:, :-1]
        x = tokens
        for attn_layer, ff_layer in zip(self.attn_layers, self.ff_layers):
            x = x + self.branch(attn_layer, x)
            x = x + self.branch(ff_layer, x)
        logits = self.to_logits(self.norm(x))  # [B, N, all tokens]
        n = logits.shape[1]
        logits.masked_fill_(self.logits_mask[:, :n], -torch.finfo(logits.dtype).max)
        labels = torch.cat((text[:, 1:], image + self.total_text_tokens), dim=1)
        logits = logits.transpose(1, 2)  # b n c -> b c n
        loss_text = F.cross_entropy(logits[:, :, : self.text_seq_len], labels[:, : self.text_seq_len])
        loss_img = F.cross_entropy(logits[:, :, self.text_seq_len :], labels[:, self.text_seq_len :])
        return (loss_text + self.loss_img_weight * loss_img) / (self.loss_img_weight + 1)


def check_same_loss(model: DALLE, reference: ReferenceDALLE, text: Tensor, image: Tensor,
                    tol: float = 1e-4) -> tuple[float, float, float]:
    """Both losses and the largest relative gradient difference (first qkv weight), or raise."""
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    ours = model(text, image, return_loss=True)
    ref = reference(text, image)
    ours.backward()
    ref.backward()
    ours_grad = model.transformer.attn_branches[0].fn.fn.fn.to_qkv.weight.grad
    ref_grad = reference.attn_layers[0].fn.fn.fn.to_qkv.weight.grad
    grad_diff = float((ours_grad - ref_grad).abs().max() / ours_grad.abs().max())
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    if abs(ours.item() - ref.item()) > tol or grad_diff > 1e-3:
        raise AssertionError(
            f"reference differs from our model: loss {ref.item():.6f} vs {ours.item():.6f}, "
            f"relative gradient difference {grad_diff:.2e}"
        )
    return ours.item(), ref.item(), grad_diff
