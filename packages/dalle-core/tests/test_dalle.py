"""DALLE training path: shapes, losses, options, checkpoints and input validation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ALL_TYPES, NUM_TEXT_TOKENS, TEXT_SEQ_LEN, tiny_dalle, tiny_vae
from safetensors.torch import load_file, save_file

from dalle_core import DALLE, DiscreteVAE
from dalle_core.plugins import UnknownPluginError
from dalle_core.tokenizers import ByteTokenizer


def test_upstream_readme_example_runs_small():
    vae = DiscreteVAE(image_size=32, num_layers=3, num_tokens=64, codebook_dim=32, hidden_dim=16,
                      num_resnet_blocks=1, temperature=0.9)
    dalle = DALLE(dim=32, vae=vae, num_text_tokens=100, text_seq_len=16, depth=2, heads=4,
                  dim_head=8, attn_dropout=0.1, ff_dropout=0.1)
    text = torch.randint(0, 100, (4, 16))
    images = torch.randn(4, 3, 32, 32)
    mask = torch.ones_like(text).bool()
    loss = dalle(text, images, mask=mask, return_loss=True)
    loss.backward()
    assert dalle.generate_images(text, mask=mask).shape == (4, 3, 32, 32)
    img_prime = torch.randn(4, 3, 32, 32)
    primed = dalle.generate_images(text, mask=mask, img=img_prime, num_init_img_tokens=5)
    assert primed.shape == (4, 3, 32, 32)
    text_tokens, texts = dalle.generate_texts(text)  # no tokenizer: decoded with the default one
    assert text_tokens.shape == (4, 16) and texts == [ByteTokenizer().decode(row) for row in text_tokens]


def test_reads_sequence_length_and_codes_from_the_vae():
    dalle = tiny_dalle()
    assert dalle.image_seq_len == 16 and dalle.num_image_tokens == 32
    assert dalle.seq_len == TEXT_SEQ_LEN + 1 + 16 - 1


def test_logits_mask_text_and_image_positions(text):
    dalle = tiny_dalle()
    codes = torch.randint(0, 32, (2, 16))
    logits = dalle(text, codes)
    assert logits.shape == (2, TEXT_SEQ_LEN + 16, NUM_TEXT_TOKENS + TEXT_SEQ_LEN + 32)
    fill = -torch.finfo(logits.dtype).max
    text_vocab = NUM_TEXT_TOKENS + TEXT_SEQ_LEN
    assert (logits[:, :TEXT_SEQ_LEN, text_vocab:] == fill).all()
    assert (logits[:, TEXT_SEQ_LEN:, :text_vocab] == fill).all()
    assert torch.isfinite(logits[:, TEXT_SEQ_LEN:, text_vocab:]).all()


def test_loss_matches_masked_full_vocabulary_cross_entropy(text):
    """The split heads compute the same loss as upstream's masked full-vocabulary logits."""
    dalle = tiny_dalle(loss_img_weight=3)
    codes = torch.randint(0, 32, (2, 16))
    loss = dalle(text, codes, return_loss=True)
    logits = dalle(text, codes)
    labels = torch.cat((torch.where(text == 0, torch.arange(6) + NUM_TEXT_TOKENS, text),
                        codes + NUM_TEXT_TOKENS + TEXT_SEQ_LEN), dim=1)
    ce = torch.nn.functional.cross_entropy
    loss_text = ce(logits[:, :TEXT_SEQ_LEN].flatten(0, 1), labels[:, :TEXT_SEQ_LEN].flatten())
    loss_img = ce(logits[:, TEXT_SEQ_LEN:].flatten(0, 1), labels[:, TEXT_SEQ_LEN:].flatten())
    torch.testing.assert_close(loss, (loss_text + 3 * loss_img) / 4)


def test_pixels_and_codes_give_the_same_loss(text):
    dalle = tiny_dalle()
    images = torch.rand(2, 3, 16, 16)
    codes = dalle.vae.get_codebook_indices(images)
    torch.testing.assert_close(dalle(text, images, return_loss=True), dalle(text, codes, return_loss=True))


@pytest.mark.parametrize("options", [
    {},
    {"attn_types": ALL_TYPES},
    {"rotary_emb": False, "shift_tokens": False},
    {"stable": True, "sandwich_norm": True},
    {"share_input_output_emb": True},
    {"shared_attn_ids": (0, 0), "shared_ff_ids": (0, 1), "depth": 2},
    {"reversible": True},
    {"activation_checkpointing": True},
])
def test_loss_decreases_on_a_tiny_overfit(text, options):
    dalle = tiny_dalle(**options)
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(dalle.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = dalle(text, codes, return_loss=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_vae_is_frozen_and_stays_in_eval(text):
    dalle = tiny_dalle()
    dalle.train()
    assert not dalle.vae.training
    assert not any(p.requires_grad for p in dalle.vae.parameters())
    dalle(text, torch.rand(2, 3, 16, 16), return_loss=True).backward()
    assert all(p.grad is None for p in dalle.vae.parameters())


def test_mask_hides_padded_text_from_every_query(text):
    """With a mask, changing a padded token changes no output at an unpadded position."""
    dalle = tiny_dalle().eval()
    codes = torch.randint(0, 32, (2, 16))
    mask = text != 0
    other = text.clone()
    other[1, 4] = 17  # a padded position (mask False) with another token
    with torch.no_grad():
        a = dalle(text, codes, mask=mask)
        b = dalle(other, codes, mask=mask)
    # positions 0-3 are <bos> and the 3 real tokens; 4-6 are padding; 7.. are image codes
    torch.testing.assert_close(a[1, :4], b[1, :4])
    torch.testing.assert_close(a[1, 7:], b[1, 7:])
    assert not torch.allclose(a[1, 5], b[1, 5])


def test_null_cond_prob_drops_text_without_touching_the_input(text):
    dalle = tiny_dalle()
    before = text.clone()
    dalle(text, torch.randint(0, 32, (2, 16)), return_loss=True, null_cond_prob=1.0).backward()
    assert torch.equal(text, before)


def _layers_params_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _use_stored_activations(dalle):
    """Swap the reversible backward for plain autograd over the same two-stream function."""
    reference = dalle.transformer.reversible

    def plain(x, ctx, cache=None):
        y1 = y2 = x
        for f, g in zip(reference.f_blocks, reference.g_blocks):
            y1 = y1 + f(y2, ctx=ctx, cache=None)
            y2 = y2 + g(y1, ctx=ctx, cache=None)
        return (y1 + y2) / 2

    dalle.transformer.reversible = plain


def test_reversible_backward_matches_plain_autograd(text):
    """The reversible backward (inputs rebuilt from outputs) gives autograd's gradients."""
    torch.manual_seed(0)
    dalle = tiny_dalle(reversible=True, attn_types=ALL_TYPES, depth=3).double()
    codes = torch.randint(0, 32, (2, 16))
    dalle(text, codes, return_loss=True).backward()
    reversible_grads = _layers_params_grads(dalle)
    dalle.zero_grad()
    _use_stored_activations(dalle)
    dalle(text, codes, return_loss=True).backward()
    plain_grads = _layers_params_grads(dalle)
    assert reversible_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(reversible_grads[name], plain_grads[name], msg=name)


def test_reversible_replays_dropout_exactly(text):
    torch.manual_seed(0)
    dalle = tiny_dalle(reversible=True, ff_dropout=0.5, attn_dropout=0.5).double()
    codes = torch.randint(0, 32, (2, 16))
    torch.manual_seed(1)
    dalle(text, codes, return_loss=True).backward()
    grads = _layers_params_grads(dalle)
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the stored-activation version with the same random draws gives the same gradients
    dalle.zero_grad()
    _use_stored_activations(dalle)
    torch.manual_seed(1)
    dalle(text, codes, return_loss=True).backward()
    for name, grad in _layers_params_grads(dalle).items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_activation_checkpointing_gives_the_same_gradients(text):
    codes = torch.randint(0, 32, (2, 16))
    grads = []
    for checkpointing in (False, True):
        dalle = tiny_dalle(activation_checkpointing=checkpointing, attn_types=ALL_TYPES)
        dalle(text, codes, return_loss=True).backward()
        grads.append(_layers_params_grads(dalle))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_shared_attention_must_have_matching_types():
    with pytest.raises(ValueError, match="attn_types do not match shared_attn_ids"):
        tiny_dalle(attn_types=("full", "axial_row"), shared_attn_ids=(0, 0))


def test_shared_ids_share_modules():
    dalle = tiny_dalle(depth=4, shared_attn_ids=(0, 1), shared_ff_ids=(0, 0, 1, 1))
    attn = [b.fn.fn.fn for b in dalle.transformer.attn_branches]
    ff = [b.fn.fn.fn for b in dalle.transformer.ff_branches]
    assert attn[0] is attn[2] and attn[1] is attn[3] and attn[0] is not attn[1]
    assert ff[0] is ff[1] and ff[2] is ff[3] and ff[0] is not ff[2]


def test_unknown_attention_type_is_a_clear_error():
    with pytest.raises(ValueError, match="valid patterns are full, axial_row"):
        tiny_dalle(attn_types=("full", "diagonal"))


def test_kernel_from_a_missing_plugin_says_what_to_install():
    with pytest.raises(UnknownPluginError, match="dalle-attn-sparse"):
        tiny_dalle(attn_kernel="triton")


def test_named_kernel_is_used_and_flex_falls_back_to_sdpa_on_cpu_training(text):
    codes = torch.randint(0, 32, (2, 16))
    sdpa = tiny_dalle(attn_kernel="sdpa", attn_types=ALL_TYPES)
    flex = tiny_dalle(attn_kernel="flex", attn_types=ALL_TYPES)
    torch.testing.assert_close(sdpa(text, codes, return_loss=True), flex(text, codes, return_loss=True))


@pytest.mark.parametrize("bad, message", [
    (lambda d: d(torch.randint(1, 50, (2, 5)), torch.randint(0, 32, (2, 16))), "text_seq_len=6"),
    (lambda d: d(torch.randint(1, 50, (2, 6)).float(), torch.randint(0, 32, (2, 16))), "LongTensor"),
    (lambda d: d(torch.full((2, 6), 50), torch.randint(0, 32, (2, 16))),
     r"text token ids must be in \[0, 50\)"),
    (lambda d: d(torch.randint(1, 50, (2, 6)), torch.rand(2, 3, 32, 32)), r"\[batch, 3, 16, 16\]"),
    (lambda d: d(torch.randint(1, 50, (2, 6)), torch.rand(2, 4, 16, 16)), r"\[batch, 3, 16, 16\]"),
    (lambda d: d(torch.randint(1, 50, (2, 6)), torch.full((2, 16), 32)), r"image codes must be in \[0, 32\)"),
    (lambda d: d(torch.randint(1, 50, (2, 6)), torch.randint(0, 32, (2, 17))), r"\[batch, <= 16\]"),
    (lambda d: d(torch.randint(1, 50, (2, 6)), torch.randint(0, 32, (2, 9)), return_loss=True),
     "needs all 16 image codes"),
    (lambda d: d(torch.randint(1, 50, (2, 6)), torch.randint(0, 32, (2, 16)), mask=torch.ones(2, 5)),
     r"mask must have shape \[batch=2, text_seq_len=6\]"),
])
def test_bad_input_says_what_was_expected(bad, message):
    with pytest.raises(ValueError, match=message):
        bad(tiny_dalle())


def test_vae_that_does_not_fit_is_rejected():
    with pytest.raises(TypeError, match="lacks image_size, channels, num_tokens, fmap_size"):
        DALLE(dim=32, vae=torch.nn.Linear(2, 2), depth=1)


def test_save_and_load_round_trip_with_embedded_vae_and_tokenizer(tmp_path, text):
    dalle = tiny_dalle(attn_types=("full", "conv_like"), tokenizer=ByteTokenizer()).eval()
    dalle.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "vae" / "model.safetensors").is_file()
    assert not any(k.startswith("vae.") for k in load_file(tmp_path / "ckpt" / "model.safetensors"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["config"]["attn_types"] == ["full", "conv_like"]
    loaded = DALLE.from_pretrained(tmp_path / "ckpt")
    codes = torch.randint(0, 32, (2, 16))
    torch.testing.assert_close(loaded(text, codes), dalle(text, codes))
    assert isinstance(loaded.vae, DiscreteVAE) and isinstance(loaded.tokenizer, ByteTokenizer)
    same = torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        loaded.generate_images(text, generator=same),
        dalle.generate_images(text, generator=torch.Generator().manual_seed(5)),
    )


def test_loading_with_missing_or_unexpected_keys_lists_them(tmp_path):
    tiny_dalle().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["surprise.weight"] = torch.zeros(1)
    del weights["final_norm.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing keys \['final_norm.weight'\].*surprise.weight"):
        DALLE.from_pretrained(tmp_path)


def test_loading_a_vae_checkpoint_as_dalle_names_the_class(tmp_path):
    tiny_vae().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a dalle_core.vae.DiscreteVAE"):
        DALLE.from_pretrained(tmp_path)


def test_layers_sharing_modules_save_and_reload_tied(tmp_path):
    dalle = tiny_dalle(depth=3, shared_attn_ids=(0, 1, 0), shared_ff_ids=(0, 0, 1)).eval()
    dalle.save_pretrained(tmp_path / "model")  # safetensors stores no shared memory: repeats are copies
    loaded = DALLE.from_pretrained(tmp_path / "model").eval()
    text = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(text, codes), dalle(text, codes))
    assert len(list(loaded.parameters())) == len(list(dalle.parameters()))  # tied again, not doubled
