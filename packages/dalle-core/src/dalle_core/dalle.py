"""DALLE: one decoder-only transformer over ``[bos, text tokens, image codes]``.

Text padding (id 0) becomes a unique id per position, so the model learns where captions end;
text positions predict text, image positions predict image codes. Each of the two heads only
computes its own vocabulary (no logits that would be masked away). Generation runs with a
preallocated key/value cache and one step function (`dalle_core.decoder_step`), run eagerly or
compiled ahead of time (``compile=True``); classifier-free guidance runs conditional and
unconditional rows as one batch, each row with its own cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_core.decoder_step import decoder_step
from dalle_core.interfaces import TOKENIZER_CONFIG, ImageVAE, Tokenizer
from dalle_core.layers import DivideMax
from dalle_core.pretrained import PretrainedMixin
from dalle_core.sampling import Sampler
from dalle_core.transformer import LayerCache, Transformer

VAE_FOLDER = "vae"
TOKENIZER_FOLDER = "tokenizer"
STABLE_EMBEDDING_ALPHA = 0.1  # CogView: shrink embedding gradients when `stable`


def check_vae(vae: Any) -> None:
    """Raise a TypeError naming what ``vae`` lacks to fit the image VAE interface."""
    needed = ("image_size", "channels", "num_tokens", "fmap_size", "get_codebook_indices", "decode")
    missing = [name for name in needed if not hasattr(vae, name)]
    if missing:
        raise TypeError(
            f"vae of type {type(vae).__name__} does not fit the image VAE interface: "
            f"it lacks {', '.join(missing)} (see dalle_core.interfaces.ImageVAE)"
        )


def check_ids(ids: Tensor, upper: int, what: str) -> None:
    """Ids must lie in ``[0, upper)``. Checked on the host for CPU tensors; asynchronously on
    accelerators so that training never waits for it."""
    if ids.device.type == "cpu":
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
            raise ValueError(
                f"{what} must be in [0, {upper}), got values in [{int(ids.min())}, {int(ids.max())}]"
            )
    else:
        torch._assert_async(((ids >= 0) & (ids < upper)).all(), f"{what} must be in [0, {upper})")


class DALLE(PretrainedMixin, nn.Module):
    """Text-to-image transformer with the upstream project's constructor keywords.

    Extra keywords: ``attn_kernel`` (a registered attention kernel name, or ``"auto"``),
    ``activation_checkpointing`` (recompute layers in the backward pass), ``tokenizer``
    (saved with the model; `generate_texts` decodes with it), ``upstream_rotary`` (with
    ``rotary_emb``: rotate the attention values by position too and take the text frequencies
    over ``dim_head // 3``, as upstream's rotary did; for converted upstream checkpoints).
    ``optimize_for_inference`` is accepted for compatibility: every pattern already runs on the
    cache-friendly masked path.
    """

    plugin_name = "dalle"

    def __init__(
        self,
        *,
        dim: int,
        vae: ImageVAE,
        num_text_tokens: int = 10000,
        text_seq_len: int = 256,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        reversible: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_types: str | tuple[str, ...] | list[str] | None = None,
        loss_img_weight: float = 7,
        stable: bool = False,
        sandwich_norm: bool = False,
        shift_tokens: bool = True,
        rotary_emb: bool = True,
        shared_attn_ids: tuple | list | None = None,
        shared_ff_ids: tuple | list | None = None,
        share_input_output_emb: bool = False,
        optimize_for_inference: bool = False,
        attn_kernel: str = "auto",
        activation_checkpointing: bool = False,
        upstream_rotary: bool = False,
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__()
        check_vae(vae)
        if isinstance(attn_types, str):
            attn_types = (attn_types,)
        attn_types = tuple(attn_types or ("full",))
        self.config = {
            "dim": dim, "num_text_tokens": num_text_tokens, "text_seq_len": text_seq_len,
            "depth": depth, "heads": heads, "dim_head": dim_head, "reversible": reversible,
            "attn_dropout": attn_dropout, "ff_dropout": ff_dropout, "attn_types": list(attn_types),
            "loss_img_weight": loss_img_weight, "stable": stable, "sandwich_norm": sandwich_norm,
            "shift_tokens": shift_tokens, "rotary_emb": rotary_emb,
            "shared_attn_ids": list(shared_attn_ids) if shared_attn_ids is not None else None,
            "shared_ff_ids": list(shared_ff_ids) if shared_ff_ids is not None else None,
            "share_input_output_emb": share_input_output_emb,
            "optimize_for_inference": optimize_for_inference, "attn_kernel": attn_kernel,
            "activation_checkpointing": activation_checkpointing, "upstream_rotary": upstream_rotary,
        }
        self.vae = vae.requires_grad_(False).eval() if isinstance(vae, nn.Module) else vae
        self.tokenizer = tokenizer
        self.image_size, self.channels = vae.image_size, vae.channels
        self.fmap_size = vae.fmap_size
        self.num_image_tokens = vae.num_tokens
        self.image_seq_len = self.fmap_size**2
        self.num_text_tokens = num_text_tokens
        self.text_seq_len = text_seq_len
        self.total_text_tokens = num_text_tokens + text_seq_len  # + a padding id per position
        self.text_len = text_seq_len + 1  # with <bos>
        self.seq_len = self.text_len + self.image_seq_len - 1
        self.loss_img_weight = loss_img_weight
        self.stable = stable

        self.text_emb = nn.Embedding(self.total_text_tokens, dim)
        self.image_emb = nn.Embedding(self.num_image_tokens, dim)
        if rotary_emb:
            self.text_pos_emb = self.image_row_emb = self.image_col_emb = None
        else:
            self.text_pos_emb = nn.Embedding(self.text_len, dim)
            self.image_row_emb = nn.Embedding(self.fmap_size, dim)
            self.image_col_emb = nn.Embedding(self.fmap_size, dim)
        self.register_buffer(
            "text_pad_ids", torch.arange(text_seq_len) + num_text_tokens, persistent=False
        )
        grid = torch.arange(self.image_seq_len)
        self.register_buffer("image_rows", grid // self.fmap_size, persistent=False)
        self.register_buffer("image_cols", grid % self.fmap_size, persistent=False)

        self.transformer = Transformer(
            dim=dim, depth=depth, text_len=self.text_len, fmap_size=self.fmap_size, heads=heads,
            dim_head=dim_head, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            attn_types=attn_types, attn_kernel=attn_kernel, sandwich_norm=sandwich_norm,
            shift_tokens=shift_tokens, rotary_emb=rotary_emb, reversible=reversible,
            activation_checkpointing=activation_checkpointing,
            shared_attn_ids=shared_attn_ids, shared_ff_ids=shared_ff_ids, upstream_rotary=upstream_rotary,
        )
        self.norm_by_max = DivideMax(dim=-1) if stable else nn.Identity()
        self.final_norm = nn.LayerNorm(dim)
        if share_input_output_emb:
            self.text_head = self.image_head = None
            self.text_head_bias = nn.Parameter(torch.zeros(self.total_text_tokens))
            self.image_head_bias = nn.Parameter(torch.zeros(self.num_image_tokens))
        else:
            self.text_head = nn.Linear(dim, self.total_text_tokens)
            self.image_head = nn.Linear(dim, self.num_image_tokens)

    # ----------------------------------------------------------------- inputs and embeddings

    def train(self, mode: bool = True) -> DALLE:
        """Switch training mode; the VAE stays frozen in eval mode."""
        super().train(mode)
        if isinstance(self.vae, nn.Module):
            self.vae.eval()
        return self

    def _check_text(self, text: Tensor) -> Tensor:
        if text.dim() != 2 or text.shape[1] != self.text_seq_len or text.dtype != torch.long:
            raise ValueError(
                f"text must be a LongTensor [batch, text_seq_len={self.text_seq_len}] of token ids, "
                f"got {text.dtype} {list(text.shape)}"
            )
        check_ids(text, self.num_text_tokens, "text token ids")
        return text

    def _key_padding_mask(self, mask: Tensor | None, batch: int, length: int) -> Tensor | None:
        """Text mask ``[B, text_seq_len]`` -> keys to keep ``[B, length]`` (bos and image kept)."""
        if mask is None:
            return None
        if mask.shape != (batch, self.text_seq_len):
            raise ValueError(
                f"mask must have shape [batch={batch}, text_seq_len={self.text_seq_len}], "
                f"got {list(mask.shape)}"
            )
        mask = mask.bool()
        if mask.device.type == "cpu" and bool(mask.all()):
            return None  # nothing hidden: keep the fused causal path
        keep = torch.ones(batch, length, dtype=torch.bool, device=mask.device)
        keep[:, 1 : self.text_len] = mask
        return keep

    def image_codes(self, image: Tensor) -> Tensor:
        """Pixels ``[B, C, H, W]`` in [0, 1] (encoded by the VAE in fp32) or codes ``[B, m]``
        -> codes ``LongTensor[B, m]``."""
        if image.dtype == torch.long:
            if image.dim() != 2 or image.shape[1] > self.image_seq_len:
                raise ValueError(
                    f"image codes must be a LongTensor [batch, <= {self.image_seq_len}], "
                    f"got {list(image.shape)}"
                )
            check_ids(image, self.num_image_tokens, "image codes")
            return image
        expected = [self.channels, self.image_size, self.image_size]
        if image.dim() != 4 or list(image.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [batch, {', '.join(map(str, expected))}] "
                f"(channels, height, width in pixels), got {list(image.shape)}"
            )
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            return self.vae.get_codebook_indices(image.to(self._vae_dtype()))

    def _vae_dtype(self) -> torch.dtype:
        """The VAE runs in its own precision (fp32 unless cast), never under autocast."""
        if isinstance(self.vae, nn.Module):
            for parameter in self.vae.parameters():
                return parameter.dtype
        return torch.float32

    def _embed_text(self, text: Tensor) -> Tensor:
        """Ids ``[B, n]`` (n <= L, 0 = padding) -> ``[B, n + 1, dim]`` with <bos> in front."""
        n = text.shape[1]
        text = torch.where(text == 0, self.text_pad_ids[:n], text)
        text = F.pad(text, (1, 0), value=0)  # <bos> = 0, never a text id after the line above
        tokens = self.text_emb(text)
        if self.text_pos_emb is not None:
            tokens = tokens + self.text_pos_emb.weight[: n + 1]
        return tokens

    def _embed_image(self, codes: Tensor) -> Tensor:
        """Codes ``[B, m]`` of the first ``m`` grid positions -> ``[B, m, dim]``."""
        tokens = self.image_emb(codes)
        if self.image_row_emb is not None:
            tokens = tokens + self._image_pos_emb(codes.shape[1])
        return tokens

    def _image_pos_emb(self, length: int) -> Tensor:
        """Axial position embeddings (row + column) of the first ``length`` grid positions:
        ``[length, dim]``. Generation adds them to one code at a time in the same order."""
        rows, cols = self.image_rows[:length], self.image_cols[:length]
        return self.image_row_emb(rows) + self.image_col_emb(cols)

    # ----------------------------------------------------------------- heads

    def _hidden(
        self, tokens: Tensor, key_padding_mask: Tensor | None, cache: list[LayerCache] | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Final hidden states ``[B, n, dim]`` of ``tokens [B, n, dim]`` from position 0;
        ``[B, 1, dim]``, the last position's, with ``last_only`` (see `Transformer.forward`)."""
        out = self.transformer(tokens, key_padding_mask=key_padding_mask, cache=cache, last_only=last_only)
        return self._output_norm(out)

    def _output_norm(self, out: Tensor) -> Tensor:
        """The transformer's output ``[..., dim]`` -> the final hidden states the heads read."""
        return self.final_norm(self.norm_by_max(out))

    def head_weights(self, head: str) -> tuple[Tensor, Tensor]:
        """The ``"text"`` or ``"image"`` head's weight ``[vocabulary, dim]`` and bias
        ``[vocabulary]`` (the input embedding's weight with ``share_input_output_emb``)."""
        if head == "text":
            if self.text_head is None:
                return self.text_emb.weight, self.text_head_bias
            return self.text_head.weight, self.text_head.bias
        if head != "image":
            raise ValueError(f"head must be 'text' or 'image', got {head!r}")
        if self.image_head is None:
            return self.image_emb.weight, self.image_head_bias
        return self.image_head.weight, self.image_head.bias

    def _text_logits(self, hidden: Tensor) -> Tensor:
        """``[..., dim]`` -> ``[..., num_text_tokens + text_seq_len]``."""
        return F.linear(hidden, *self.head_weights("text"))

    def _image_logits(self, hidden: Tensor) -> Tensor:
        """``[..., dim]`` -> ``[..., num_image_tokens]``."""
        return F.linear(hidden, *self.head_weights("image"))

    # ----------------------------------------------------------------- training

    def forward(
        self,
        text: Tensor,
        image: Tensor | None = None,
        mask: Tensor | None = None,
        return_loss: bool = False,
        null_cond_prob: float = 0.0,
    ) -> Tensor:
        """Loss (``return_loss``) or logits ``[B, n, total_text_tokens + num_image_tokens]``.

        ``text [B, text_seq_len]`` ids (0 = padding); ``image`` pixels ``[B, C, H, W]`` in
        [0, 1] or codes ``[B, m]``; ``mask [B, text_seq_len]`` (False = padding, not attended);
        ``null_cond_prob``: chance of dropping a row's text (classifier-free guidance).
        The logits without loss hold ``-finfo.max`` where a position cannot predict a token.
        """
        text = self._check_text(text)
        batch = text.shape[0]
        if null_cond_prob > 0:
            keep = torch.rand(batch, device=text.device) >= null_cond_prob
            text = text * keep[:, None]  # a new tensor: the caller's text is untouched
        tokens = self._embed_text(text)  # [B, L + 1, dim]
        codes = None
        if image is not None:
            codes = self.image_codes(image)  # [B, m]
            inputs = codes[:, : self.image_seq_len - 1]  # the last code is predicted, never input
            tokens = torch.cat((tokens, self._embed_image(inputs)), dim=1)
        elif return_loss:
            raise ValueError("return_loss=True needs an image (pixels or codes)")
        if self.stable:
            alpha = STABLE_EMBEDDING_ALPHA
            tokens = tokens * alpha + tokens.detach() * (1 - alpha)
        key_padding_mask = self._key_padding_mask(mask, batch, tokens.shape[1])
        hidden = self._hidden(tokens, key_padding_mask)  # [B, n, dim]
        text_hidden, image_hidden = hidden[:, : self.text_seq_len], hidden[:, self.text_seq_len :]
        if not return_loss:
            return self._masked_logits(text_hidden, image_hidden)
        if codes.shape[1] != self.image_seq_len:
            raise ValueError(
                f"return_loss=True needs all {self.image_seq_len} image codes, got {codes.shape[1]}"
            )
        text_labels = torch.where(text == 0, self.text_pad_ids, text)  # [B, L]
        text_logits = self._text_logits(text_hidden)  # [B, L, Vt]
        image_logits = self._image_logits(image_hidden)  # [B, M, Vi]
        loss_text = F.cross_entropy(text_logits.flatten(0, 1), text_labels.flatten())
        loss_img = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        return (loss_text + self.loss_img_weight * loss_img) / (self.loss_img_weight + 1)

    def _masked_logits(self, text_hidden: Tensor, image_hidden: Tensor) -> Tensor:
        text_logits, image_logits = self._text_logits(text_hidden), self._image_logits(image_hidden)
        fill = -torch.finfo(text_logits.dtype).max
        text_part = F.pad(text_logits, (0, self.num_image_tokens), value=fill)
        image_part = F.pad(image_logits, (self.total_text_tokens, 0), value=fill)
        return torch.cat((text_part, image_part), dim=1)

    # ----------------------------------------------------------------- generation

    def generate_images(
        self,
        text: Tensor,
        *,
        mask: Tensor | None = None,
        clip: nn.Module | None = None,
        filter_thres: float = 0.5,
        top_p: float | None = None,
        temperature: float = 1.0,
        img: Tensor | None = None,
        num_init_img_tokens: int | None = None,
        img_mask: Tensor | None = None,
        cond_scale: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        compile: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Sample images ``[B, C, H, W]`` in [0, 1] for ``text [B, text_seq_len]``.

        ``filter_thres``: keep the top ``(1 - filter_thres)`` share of the image codebook at
        each step; ``top_p``: nucleus sampling on top; ``img`` + ``num_init_img_tokens``: prime
        with the first codes of an image (default 14/32 of them, as in the paper); ``img`` +
        ``img_mask``: inpainting, where ``img_mask`` (pixels ``[H, W]``, ``[1 or B, H, W]`` or
        ``[1 or B, 1, H, W]``, true or non-zero where the image is to be generated) marks the
        codes to sample: every code whose cell the mask touches is sampled, in raster order,
        conditioned on every code placed before it; the others are the image's own;
        ``cond_scale``: classifier-free guidance; ``clip``: also return its scores ``[B]``.
        The same ``generator`` state gives the same images, cached or not; a sequence of
        generators, one per row, draws each row's codes from its own generator alone (a row's
        image then does not depend on the rows batched with it). ``compile``: run the
        cached step compiled ahead of time for this model and batch shape (on the CPU the first
        call compiles for tens of seconds, once per model and shape on this machine, kept on disk;
        a CUDA graph on a GPU; see `dalle_core.decoder_step`).
        ``progress(done, total)`` is called after each code position sampled (``total`` of
        them); an exception it raises stops generation (e.g. a cancelled request).
        """
        with torch.no_grad():  # a block, not the decorator: mutation testing skips decorated code
            codes = self.generate_image_codes(
                text, mask=mask, filter_thres=filter_thres, top_p=top_p, temperature=temperature,
                img=img, num_init_img_tokens=num_init_img_tokens, img_mask=img_mask, cond_scale=cond_scale,
                use_cache=use_cache, generator=generator, compile=compile, progress=progress,
            )
            with torch.autocast(codes.device.type, enabled=False):
                images = self.vae.decode(codes)
            if clip is None:
                return images
            return images, clip(text, images, text_mask=mask)

    def generate_image_codes(
        self,
        text: Tensor,
        *,
        mask: Tensor | None = None,
        filter_thres: float = 0.5,
        top_p: float | None = None,
        temperature: float = 1.0,
        img: Tensor | None = None,
        num_init_img_tokens: int | None = None,
        img_mask: Tensor | None = None,
        cond_scale: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        compile: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """As `generate_images`, returning the codes ``LongTensor[B, image_seq_len]``."""
        with torch.no_grad():  # a block, not the decorator: mutation testing skips decorated code
            if compile and not use_cache:
                raise ValueError("compile=True compiles the cached step: it needs use_cache=True")
            text = self._check_text(text)
            batch = text.shape[0]
            codes = text.new_zeros(batch, self.image_seq_len)
            sampled = self._sampled_codes(batch, img, num_init_img_tokens, img_mask)  # [batch, m]
            if img is not None:
                codes[:] = self.image_codes(img)  # kept where not sampled
            drawn = sampled.any(0).tolist()  # per position: whether any row samples it
            if not any(drawn):
                return codes
            n_prime = drawn.index(True)  # the codes before it are the image's in every row
            guided = cond_scale != 1
            if guided:  # conditional rows, then unconditional rows (all-padding text): one batch
                text = torch.cat((text, torch.zeros_like(text)))
                if mask is not None:
                    mask = torch.cat((mask, torch.ones_like(mask)))
            rows = text.shape[0]

            total = sum(drawn)
            sampler = Sampler(
                self.num_image_tokens, batch, total, filter_thres=filter_thres,
                top_p=top_p, temperature=temperature, generator=generator, device=text.device,
            )
            mixed = (~sampled).any(0).tolist()  # per position: whether some row keeps its code

            def guided_logits(logits: Tensor) -> Tensor:  # [rows, Vi] -> [batch, Vi]
                if logits.dtype != torch.float32:
                    logits = logits.float()
                if guided:  # uncond + (cond - uncond) * cond_scale
                    cond, uncond = logits.chunk(2)
                    logits = torch.lerp(uncond, cond, cond_scale)
                return logits

            def row_codes(end: int) -> Tensor:  # [rows, end]: the first codes, both halves when guided
                return codes[:, :end].repeat(2, 1) if guided else codes[:, :end]

            was_training = self.training
            self.eval()
            # the eager step in inference mode: no version counters or view tracking (a tenth of
            # an eager call); `codes` was made outside it, so the caller gets an ordinary tensor
            with torch.inference_mode(not compile):
                try:
                    text_tokens = self._embed_text(text)  # [rows, L + 1, dim]
                    key_padding_mask = self._key_padding_mask(mask, rows, self.seq_len)
                    cache = self.transformer.new_cache(rows, self.seq_len, text_tokens) if use_cache else None
                    tokens = torch.cat((text_tokens, self._embed_image(row_codes(n_prime))), dim=1)
                    hidden = self._hidden(tokens, key_padding_mask, cache, last_only=True)[:, 0]
                    logits = self._image_logits(hidden)  # [rows, Vi]
                    if use_cache:
                        next_logits = decoder_step(self, cache, key_padding_mask, hidden, "image", compile)
                        position_emb = None  # per grid position: [dim], added to the new code's embedding
                        if self.image_row_emb is not None:
                            position_emb = self._image_pos_emb(self.image_seq_len).unbind(0)
                    code_columns = codes.unbind(1)  # [batch] each
                    done = 0  # positions sampled so far
                    for position in range(n_prime, self.image_seq_len):
                        sample = code_columns[position]  # [batch]: the image's codes, unless drawn
                        if drawn[position]:
                            sample = sampler(guided_logits(logits))  # [batch]
                            if mixed[position]:
                                sample = torch.where(sampled[:, position], sample, code_columns[position])
                            code_columns[position].copy_(sample)
                            done += 1
                            if progress is not None:
                                progress(done, total)
                        if position == self.image_seq_len - 1:
                            break
                        if use_cache:
                            new = self.image_emb(sample.repeat(2) if guided else sample)  # [rows, dim]
                            if position_emb is not None:
                                new = new + position_emb[position]
                            logits = next_logits(new, self.text_len + position)
                        else:
                            codes_so_far = self._embed_image(row_codes(position + 1))
                            tokens = torch.cat((text_tokens, codes_so_far), dim=1)
                            hidden = self._hidden(tokens, key_padding_mask, last_only=True)[:, 0]
                            logits = self._image_logits(hidden)
                finally:
                    self.train(was_training)
            return codes

    def _sampled_codes(
        self, batch: int, img: Tensor | None, num_init_img_tokens: int | None, img_mask: Tensor | None
    ) -> Tensor:
        """Which codes generation samples, ``BoolTensor[batch, image_seq_len]``: all without
        ``img``; after the first ``num_init_img_tokens`` when priming; where ``img_mask`` touches
        a code's cell when inpainting (the others are the image's own)."""
        m, side = self.image_seq_len, self.image_size
        device = self.text_emb.weight.device
        if img is None:
            if img_mask is not None or num_init_img_tokens is not None:
                given = "img_mask" if img_mask is not None else "num_init_img_tokens"
                raise ValueError(f"{given} needs img, the image whose codes are kept")
            return torch.ones(batch, m, dtype=torch.bool, device=device)
        if img_mask is None:
            n_prime = num_init_img_tokens
            if n_prime is None:
                n_prime = int(0.4375 * m)  # 14 of 32 rows, as in the paper
            if not 0 <= n_prime < m:
                raise ValueError(f"num_init_img_tokens must be in [0, {m}), got {n_prime}")
            return (torch.arange(m, device=device) >= n_prime).expand(batch, m)
        if num_init_img_tokens is not None:
            raise ValueError("give img_mask or num_init_img_tokens, not both: the mask says which codes "
                             "are kept")
        mask = img_mask.to(device)
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (side, side) or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"img_mask must be [{side}, {side}], [1 or {batch}, {side}, {side}] or "
                f"[1 or {batch}, 1, {side}, {side}] (pixels of the {side} px image), "
                f"got {list(img_mask.shape)}"
            )
        touched = F.adaptive_max_pool2d((mask != 0).float()[:, None], self.fmap_size)  # [1|B, 1, f, f]
        return (touched.flatten(1) > 0).expand(batch, m)

    def generate_texts(
        self,
        text: Tensor | str | list[str] | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        filter_thres: float = 0.5,
        top_p: float | None = None,
        temperature: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, list[str]]:
        """Continue captions to ``text_seq_len`` tokens -> ``(text_tokens [B, L], texts)``.

        ``text``: ids ``[B, n]`` or ``[n]``, a string or list of strings (encoded with the
        tokenizer), or None to start from nothing. Generated padding ids come back as 0, so
        ``text_tokens`` can be passed to `generate_images`. Strings are encoded and ``texts``
        decoded with ``tokenizer``, else the model's own, else (a model built in Python without
        one) the default tokenizer, as upstream decoded with its default: CLIP's BPE (``bpe``,
        from dalle-tokenizers) when it is installed, else dalle-core's ``bytes``
        (`dalle_core.plugins.default_tokenizer_name`).
        """
        with torch.no_grad():  # a block, not the decorator: mutation testing skips decorated code
            tokenizer = tokenizer or self.tokenizer or self._default_tokenizer()
            prompts = self._text_prompts(text, tokenizer)
            rows = [self._continue_text(ids, filter_thres, top_p, temperature, use_cache, generator)
                    for ids in prompts]
            text_tokens = torch.cat(rows)  # [B, L]
            return text_tokens, [tokenizer.decode(row) for row in text_tokens]

    @staticmethod
    def _default_tokenizer() -> Tokenizer:
        from dalle_core.plugins import create_tokenizer, default_tokenizer_name

        return create_tokenizer(default_tokenizer_name())

    def _text_prompts(self, text, tokenizer: Tokenizer) -> list[Tensor]:
        """Prompts as id tensors ``[rows, n]``; strings of different lengths run apart."""
        device = self.text_emb.weight.device
        if text is None or (isinstance(text, str) and not text):
            return [torch.zeros(1, 0, dtype=torch.long, device=device)]
        if isinstance(text, (str, list)):
            texts = [text] if isinstance(text, str) else text
            encoded = [torch.tensor([tokenizer.encode(t)[: self.text_seq_len]]).long() for t in texts]
            for ids in encoded:
                check_ids(ids, self.num_text_tokens, f"text token ids of {type(tokenizer).__name__}")
            return [ids.to(device) for ids in encoded]
        ids = text if text.dim() == 2 else text[None]
        if ids.shape[1] > self.text_seq_len:
            raise ValueError(f"text has {ids.shape[1]} tokens, more than text_seq_len={self.text_seq_len}")
        check_ids(ids, self.num_text_tokens, "text token ids")
        return [ids.to(device)]

    def _continue_text(self, ids, filter_thres, top_p, temperature, use_cache, generator) -> Tensor:
        was_training = self.training
        self.eval()
        try:
            rows, length = ids.shape
            tokens = self._embed_text(ids)  # [rows, 1 + n, dim]
            cache = self.transformer.new_cache(rows, self.text_len, tokens) if use_cache else None
            hidden = self._hidden(tokens, None, cache, last_only=True)[:, 0]
            logits = self._text_logits(hidden)  # [rows, total_text_tokens]
            step = decoder_step(self, cache, None, hidden, "text") if use_cache else None
            sampler = Sampler(
                self.total_text_tokens, rows, self.text_seq_len - length, filter_thres=filter_thres,
                top_p=top_p, temperature=temperature, generator=generator, device=ids.device,
            )
            for position in range(length, self.text_seq_len):
                sample = sampler(logits.float())  # [rows]
                ids = torch.cat((ids, sample[:, None]), dim=1)
                if position == self.text_seq_len - 1:
                    break
                new = self.text_emb(sample)  # [rows, dim]
                if self.text_pos_emb is not None:
                    new = new + self.text_pos_emb.weight[position + 1]
                if step is not None:
                    logits = step(new, position + 1)
                else:
                    tokens = torch.cat((tokens, new[:, None]), dim=1)
                    logits = self._text_logits(self._hidden(tokens, None, last_only=True)[:, 0])
        finally:
            self.train(was_training)
        is_text = (ids > 0) & (ids < self.num_text_tokens)  # padding ids and <bos> -> 0
        return ids * is_text

    # ----------------------------------------------------------------- checkpoints

    def save_parts(self, directory: Path) -> tuple[str, ...]:
        """Embed the VAE (``vae/``: its own files, and which plugin made it, see
        `dalle_core.plugins.save_vae`) and the tokenizer (``tokenizer/``) in the checkpoint. A
        VAE that could not be rebuilt from its folder is refused before anything is written."""
        from dalle_core.plugins import save_vae

        save_vae(self.vae, directory / VAE_FOLDER)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / TOKENIZER_FOLDER)
        return ("vae.",)

    @classmethod
    def load_parts(cls, directory: Path, config: dict[str, Any]) -> dict[str, Any]:
        from dalle_core.plugins import load_tokenizer, load_vae

        parts: dict[str, Any] = {"vae": load_vae(directory / VAE_FOLDER)}
        if (directory / TOKENIZER_FOLDER / TOKENIZER_CONFIG).is_file():
            parts["tokenizer"] = load_tokenizer(directory / TOKENIZER_FOLDER)
        return parts

    @classmethod
    def skipped_prefixes(cls, config: dict[str, Any]) -> tuple[str, ...]:
        return ("vae.",)
