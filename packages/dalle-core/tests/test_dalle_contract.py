"""`DALLE`'s construction and training forward, against upstream's defaults and plain references.

- The constructor's defaults are upstream's (DALLE-pytorch 1.6.6): 10000 text tokens, 256 text
  positions, 8 heads of 64, image loss weight 7, rotary embeddings and token shift on, the rest
  off; every keyword reaches the transformer (sandwich norm, activation checkpointing, a single
  attention type given as a string) and shared layer ids survive the config.
- The loss is ``(CE(text) + w CE(image)) / (w + 1)`` over the logits the model returns without
  ``return_loss``, padding predicted as each position's own padding id; ``<bos>`` is text id 0.
- ``stable``: the logits are divided by their maximum, and the embeddings' gradients shrink by
  `STABLE_EMBEDDING_ALPHA` without changing the values; off, neither happens.
- ``null_cond_prob``: 0 draws no random numbers; 1 drops every caption, as all-padding text.
- A padding mask works for a model narrower than its sequence; derived tables (padding ids, the
  image grid) are not saved; a VAE that is not an ``nn.Module`` fits; errors name what is wrong.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, tiny_dalle, tiny_vae

from dalle_core import DALLE
from dalle_core.dalle import STABLE_EMBEDDING_ALPHA

UPSTREAM_DEFAULTS = {  # DALLE-pytorch 1.6.6's DALLE.__init__
    "num_text_tokens": 10000, "text_seq_len": 256, "heads": 8, "dim_head": 64, "reversible": False,
    "attn_dropout": 0.0, "ff_dropout": 0.0, "attn_types": None, "loss_img_weight": 7, "stable": False,
    "sandwich_norm": False, "shift_tokens": True, "rotary_emb": True, "shared_attn_ids": None,
    "shared_ff_ids": None, "share_input_output_emb": False, "optimize_for_inference": False,
}


def test_constructor_defaults_are_upstreams() -> None:
    """Built with the required keywords only (what the model records, not the signature: a
    wrapper may show another one)."""
    dalle = DALLE(dim=16, vae=tiny_vae(), depth=1)
    config = dalle.config
    for name, default in UPSTREAM_DEFAULTS.items():
        expected = ["full"] if name == "attn_types" else default  # upstream's None means full attention
        assert config[name] == expected, name
    assert config["attn_kernel"] == "auto"
    assert dalle.transformer.activation_checkpointing is False
    assert dalle.transformer.attn_branches[0].fn.fn.fn.heads == 8 and dalle.text_seq_len == 256
    assert dalle.num_text_tokens == 10000 and dalle.loss_img_weight == 7
    parameters = inspect.signature(DALLE.__init__).parameters
    assert parameters["dim"].default is parameters["depth"].default is inspect.Parameter.empty


def test_keywords_reach_the_transformer() -> None:
    dalle = tiny_dalle(sandwich_norm=True, activation_checkpointing=True, attn_types="axial_row",
                       depth=3, shared_attn_ids=(0, 0, 1), shared_ff_ids=(0, 1, 1))
    transformer = dalle.transformer
    assert all(isinstance(branch.fn.norm_out, torch.nn.LayerNorm) for branch in transformer.attn_branches)
    assert transformer.activation_checkpointing is True
    assert [pattern.kind for pattern in transformer.patterns] == ["axial_row"] * 3
    assert dalle.config["shared_attn_ids"] == [0, 0, 1] and dalle.config["shared_ff_ids"] == [0, 1, 1]
    plain = tiny_dalle()
    assert plain.config["shared_attn_ids"] is None
    assert plain.transformer.activation_checkpointing is False
    assert not any(isinstance(b.fn.norm_out, torch.nn.LayerNorm) for b in plain.transformer.attn_branches)


def test_derived_tables_are_not_saved() -> None:
    dalle = tiny_dalle()
    assert not {"text_pad_ids", "image_rows", "image_cols"} & set(dalle.state_dict())
    assert dalle.text_pad_ids.shape == (TEXT_SEQ_LEN,) and dalle.image_rows.shape == (16,)


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, NUM_TEXT_TOKENS, (3, TEXT_SEQ_LEN), generator=generator)
    text[1, 3:] = 0  # padded
    codes = torch.randint(0, 32, (3, 16), generator=generator)
    return text, codes


@pytest.mark.parametrize("weight", [7.0, 2.0])
def test_the_loss_is_the_weighted_cross_entropy_of_the_logits(weight: float) -> None:
    dalle = tiny_dalle(loss_img_weight=weight).double()
    text, codes = inputs()
    logits = dalle(text, codes)  # [B, n, Vt + Vi]
    text_logits = logits[:, :TEXT_SEQ_LEN, : dalle.total_text_tokens]
    image_logits = logits[:, TEXT_SEQ_LEN:, dalle.total_text_tokens :]
    labels = torch.where(text == 0, torch.arange(TEXT_SEQ_LEN) + NUM_TEXT_TOKENS, text)  # own padding ids
    expected = (F.cross_entropy(text_logits.flatten(0, 1), labels.flatten())
                + weight * F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())) / (weight + 1)
    torch.testing.assert_close(dalle(text, codes, return_loss=True), expected, rtol=0, atol=1e-12)


def test_bos_is_text_id_0() -> None:
    """The first position sees only ``<bos>``: its logits move with embedding row 0 alone."""
    dalle = tiny_dalle().double()
    text, codes = inputs()
    first = dalle(text, codes)[:, 0]
    shift = torch.randn(dalle.text_emb.weight.shape[1], dtype=torch.float64)  # norms remove constants
    with torch.no_grad():
        dalle.text_emb.weight[1:NUM_TEXT_TOKENS] += shift
    assert torch.equal(dalle(text, codes)[:, 0], first)
    with torch.no_grad():
        dalle.text_emb.weight[0] += shift
    assert not torch.allclose(dalle(text, codes)[:, 0], first)


def test_stable_divides_the_outputs_by_their_maximum_and_shrinks_embedding_gradients() -> None:
    """As upstream: the transformer's output is divided by its maximum per position before the
    final norm, and the embeddings are scaled as ``x * alpha + x.detach() * (1 - alpha)``."""
    stable, plain = tiny_dalle(stable=True).double(), tiny_dalle().double()
    plain.load_state_dict(stable.state_dict())
    text, codes = inputs()
    seen = {}
    for name, model in (("stable", stable), ("plain", plain)):
        model.final_norm.register_forward_hook(
            lambda module, args, out, name=name: seen.update({name: args[0]}))
    hidden_logits = plain(text, codes)
    stable(text, codes)
    maxima = seen["stable"].amax(-1)  # [B, n]
    torch.testing.assert_close(maxima, torch.ones_like(maxima), rtol=0, atol=1e-12)
    assert not torch.allclose(seen["plain"].amax(-1), maxima)
    # the embeddings' gradients shrink by alpha; the values the transformer sees do not change
    stable.norm_by_max = torch.nn.Identity()
    torch.testing.assert_close(stable(text, codes), hidden_logits, rtol=0, atol=1e-12)
    stable(text, codes, return_loss=True).backward()
    plain(text, codes, return_loss=True).backward()
    for name in ("text_emb.weight", "image_emb.weight"):
        mine, theirs = stable.get_parameter(name).grad, plain.get_parameter(name).grad
        torch.testing.assert_close(mine, STABLE_EMBEDDING_ALPHA * theirs, rtol=1e-9, atol=1e-15,
                                   msg=name)
    head = "transformer.attn_branches.0.fn.fn.fn.to_qkv.weight"
    torch.testing.assert_close(stable.get_parameter(head).grad, plain.get_parameter(head).grad,
                               rtol=1e-9, atol=0)


def test_null_cond_prob_zero_draws_nothing_and_one_drops_every_caption() -> None:
    dalle = tiny_dalle().double()
    text, codes = inputs()
    before = torch.get_rng_state()
    dalle(text, codes, return_loss=True, null_cond_prob=0.0)
    assert torch.equal(torch.get_rng_state(), before)
    original = text.clone()
    dropped = dalle(text, codes, return_loss=True, null_cond_prob=1.0)
    assert torch.equal(text, original)  # the caller's text is untouched
    no_text = dalle(torch.zeros_like(text), codes, return_loss=True)
    torch.testing.assert_close(dropped, no_text, rtol=0, atol=0)


def test_a_padding_mask_for_a_model_narrower_than_its_sequence() -> None:
    dalle = tiny_dalle(dim=16, dim_head=8).double()
    assert dalle.seq_len > 16
    text, codes = inputs()
    mask = text != 0
    masked = dalle(text, codes, mask=mask)
    assert masked.shape == (3, dalle.seq_len, dalle.total_text_tokens + dalle.num_image_tokens)
    assert not torch.allclose(masked[1], dalle(text, codes)[1])  # the padded row changes
    torch.testing.assert_close(masked[0], dalle(text, codes)[0], rtol=0, atol=1e-12)


class PlainVAE:
    """A VAE that is not an ``nn.Module``: ``tiny_vae``'s methods on a plain object."""

    def __init__(self) -> None:
        self.inner = tiny_vae()
        self.image_size, self.channels = self.inner.image_size, self.inner.channels
        self.num_tokens, self.fmap_size = self.inner.num_tokens, self.inner.fmap_size

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.get_codebook_indices(images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(codes)


def test_a_vae_that_is_not_a_module_fits_and_errors_name_what_is_wrong(tmp_path) -> None:
    dalle = tiny_dalle(vae=PlainVAE())
    text, codes = inputs()
    assert dalle(text, codes, return_loss=True).ndim == 0
    with pytest.raises(TypeError) as caught:
        dalle.save_pretrained(tmp_path / "model")
    assert str(caught.value) == "the VAE (PlainVAE) has no save_pretrained(directory)"
    assert not list((tmp_path / "model").iterdir())  # refused before any file is written
    with pytest.raises(TypeError) as caught:
        tiny_dalle(vae=object())
    assert str(caught.value) == (
        "vae of type object does not fit the image VAE interface: it lacks image_size, channels, "
        "num_tokens, fmap_size, get_codebook_indices, decode (see dalle_core.interfaces.ImageVAE)")
    with pytest.raises(ValueError) as caught:
        tiny_dalle()(text, return_loss=True)
    assert str(caught.value) == "return_loss=True needs an image (pixels or codes)"


def test_the_padding_mask_is_built_on_the_masks_device() -> None:
    """Meta stands in for an accelerator (where the all-true shortcut is not taken)."""
    mask = torch.ones(2, TEXT_SEQ_LEN, dtype=torch.bool, device="meta")
    dalle = tiny_dalle()
    keep = dalle._key_padding_mask(mask, 2, dalle.seq_len)
    assert keep.device.type == "meta" and keep.shape == (2, dalle.seq_len)


def test_ids_on_an_accelerator_are_checked_without_waiting() -> None:
    """Off the CPU (meta stands in), the range check is an asynchronous device assert."""
    from dalle_core.dalle import check_ids

    check_ids(torch.zeros(2, 3, dtype=torch.long, device="meta"), 5, "text token ids")
