"""The generation contract of `DALLE`, checked against plain references written here.

- ``generate_texts`` continues prompts given as ids ``[B, n]`` or ``[n]``, a string, a list of
  strings of different lengths, or None, sampling exactly what an uncached reference loop samples
  (one full ``forward`` per token, the next position's text logits into a `Sampler` with the
  same options and generator), cached or not; it leaves the generator where the reference does;
  generated padding comes back as 0, texts are decoded with the given tokenizer.
- ``generate_image_codes`` (cached, uncached, and the compiled step's graph run eagerly) samples
  the codes of the reference loop over ``forward`` with a text padding mask; ``generate_images``
  decodes them to ``[B, C, H, W]`` in [0, 1] and passes text and mask to ``clip``.
- Caching: the transformer runs over the prompt once, then one cached step per further token;
  ``use_cache=False`` runs it once per token over the whole sequence and allocates no cache.
- Image positions are axial: row embedding + column embedding.
- Prompts move to the model's device; bad inputs raise errors naming the argument.

Models are the tiny ones of conftest, in float64 where sampled tokens are compared, so that the
cached and full-sequence logits agree to ~1e-15 and round to the same float32 logits the
sampler reads; comparisons of tokens are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, tiny_dalle

from dalle_core import decoder_step
from dalle_core.decoder_step import DecoderStep
from dalle_core.sampling import Sampler
from dalle_core.tokenizers import ByteTokenizer

SAMPLING = [{}, {"filter_thres": 0.2, "top_p": 0.3, "temperature": 0.7}]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def no_padding_tokens(dalle):
    """Make the generated padding ids impossible (their text logits -1e4, outside the top-k), so
    that the reference can feed sampled tokens back through ``forward``."""
    with torch.no_grad():
        dalle.text_head.bias[dalle.num_text_tokens :] = -1e4
    return dalle


def reference_texts(dalle, prompt, generator, filter_thres=0.5, top_p=None, temperature=1.0):
    """``prompt [rows, n]`` -> ``[rows, L]``: one full forward pass per new token; padding as 0."""
    length = dalle.text_seq_len
    rows, n = prompt.shape
    sampler = Sampler(dalle.total_text_tokens, rows, length - n, filter_thres=filter_thres, top_p=top_p,
                      temperature=temperature, generator=generator)
    ids = prompt
    with torch.no_grad():
        for position in range(n, length):
            padded = F.pad(ids, (0, length - position))  # [rows, L]: causal, the tail is never seen
            logits = dalle(padded)[:, position, : dalle.total_text_tokens]  # [rows, Vt] for the next
            ids = torch.cat((ids, sampler(logits.float())[:, None]), dim=1)
    return torch.where(ids < dalle.num_text_tokens, ids, 0)


def reference_codes(dalle, text, mask, generator, filter_thres=0.5, top_p=None, temperature=1.0,
                    cond_scale=1.0, primed=None, seen=None):
    """``text [B, L]`` -> codes ``[B, m]``: one full forward pass (with ``mask``) per code.

    Guided (``cond_scale != 1``): the logits are ``uncond + (cond - uncond) * cond_scale``, the
    unconditional ones from all-padding text with an all-true mask. ``primed [B, n]``: the first
    codes, given. The sampler's inputs are appended to ``seen`` (float32 ``[B, Vi]`` each).
    """
    batch, m = text.shape[0], dalle.image_seq_len
    codes = text.new_zeros(batch, 0) if primed is None else primed
    sampler = Sampler(dalle.num_image_tokens, batch, m - codes.shape[1], filter_thres=filter_thres,
                      top_p=top_p, temperature=temperature, generator=generator)

    def image_logits(text_, mask_, position):  # [B, Vi] of the next code
        return dalle(text_, codes, mask=mask_)[:, TEXT_SEQ_LEN + position, dalle.total_text_tokens :]

    with torch.no_grad():
        for position in range(codes.shape[1], m):
            logits = image_logits(text, mask, position).float()  # [B, Vi]
            if cond_scale != 1:
                no_mask = None if mask is None else torch.ones_like(mask)
                uncond = image_logits(torch.zeros_like(text), no_mask, position).float()
                logits = uncond + (logits - uncond) * cond_scale
            if seen is not None:
                seen.append(logits)
            codes = torch.cat((codes, sampler(logits)[:, None]), dim=1)
    return codes


@pytest.fixture
def sampler_inputs(monkeypatch):
    """The logits every `Sampler` call of the model reads, in order."""
    seen = []
    call = Sampler.__call__

    def record(self, logits):
        seen.append(logits.clone())
        return call(self, logits)

    monkeypatch.setattr(Sampler, "__call__", record)
    return seen


# ----------------------------------------------------------------------------- generate_texts


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("options", [{}, {"rotary_emb": False}])
def test_generate_texts_samples_the_reference_continuation(options, use_cache, sampling):
    dalle = no_padding_tokens(tiny_dalle(**options).double())
    prompt = torch.tensor([[5, 9], [7, 1], [12, 0], [3, 3]])  # [4, 2], a padded one among them
    generator, reference_generator = seeded(3), seeded(3)
    tokens, texts = dalle.generate_texts(prompt, use_cache=use_cache, generator=generator, **sampling)
    expected = reference_texts(dalle, prompt, reference_generator, **sampling)  # [4, L]
    assert texts == [ByteTokenizer().decode(row) for row in expected]  # no tokenizer: the default one
    assert torch.equal(tokens, expected)
    assert torch.equal(generator.get_state(), reference_generator.get_state())  # same noise drawn


def test_sampling_options_change_the_texts():
    """The options of the test above matter for this model and seed: they reach the sampler."""
    dalle = no_padding_tokens(tiny_dalle().double())
    prompt = torch.tensor([[5, 9], [7, 1], [12, 0], [3, 3]])
    default = dalle.generate_texts(prompt, generator=seeded(3))[0]
    for option in ({"top_p": 0.3}, {"temperature": 2.0}, {"filter_thres": 0.2}):
        assert not torch.equal(dalle.generate_texts(prompt, generator=seeded(3), **option)[0], default)


@pytest.mark.parametrize("prompt", [None, ""])
def test_generate_texts_from_nothing(prompt):
    dalle = no_padding_tokens(tiny_dalle().double())
    tokens, texts = dalle.generate_texts(prompt, generator=seeded(4))  # [1, L]
    expected = reference_texts(dalle, torch.zeros(1, 0, dtype=torch.long), seeded(4))
    assert torch.equal(tokens, expected) and texts == [ByteTokenizer().decode(expected[0])]


def test_generate_texts_continues_strings_of_different_lengths_with_the_given_tokenizer():
    tokenizer = ByteTokenizer()
    dalle = no_padding_tokens(tiny_dalle(num_text_tokens=tokenizer.vocab_size).double())
    strings = ["ab", "", "hello world"]  # the last one is cut to L = 6 bytes
    generator, reference_generator = seeded(5), seeded(5)
    tokens, texts = dalle.generate_texts(strings, tokenizer, generator=generator)  # [3, L]
    expected = torch.cat([  # the prompts run one after another on the one generator
        reference_texts(dalle, torch.tensor([tokenizer.encode(s)[:TEXT_SEQ_LEN]], dtype=torch.long),
                        reference_generator)
        for s in strings
    ])
    assert torch.equal(tokens, expected)
    assert torch.equal(generator.get_state(), reference_generator.get_state())
    assert texts == [tokenizer.decode(row) for row in expected]
    assert texts[0].startswith("ab") and texts[2] == "hello "

    single, _ = dalle.generate_texts("ab", tokenizer, generator=seeded(5))
    assert torch.equal(single, tokens[:1])


def test_generated_padding_comes_back_as_zero_and_the_shared_head_keeps_its_bias():
    """A tied output head (``share_input_output_emb``) adds its own bias; here the bias makes the
    first padding id certain, and padding ids come back as 0. A 1-D prompt is one row."""
    dalle = tiny_dalle(share_input_output_emb=True)
    with torch.no_grad():
        dalle.text_head_bias[NUM_TEXT_TOKENS] = 1e4  # the padding id of text position 0
    tokens, _ = dalle.generate_texts(torch.tensor([4, 8, 1]), temperature=0.0)  # prompt [3]
    assert tokens.tolist() == [[4, 8, 1, 0, 0, 0]]


def test_prompts_move_to_the_models_device():
    """The meta device stands in for an accelerator (shapes and devices, no values): prompts
    given on the CPU, and the sampler's noise, end up on the model's device. Uncached: the
    cached step asks autocast about the device, which meta does not answer."""
    class Unread(ByteTokenizer):  # decoding needs values, which meta tensors do not have
        def decode(self, ids):
            return ""

    dalle = tiny_dalle().to("meta")
    for prompt in (None, torch.tensor([[5, 9]]), torch.tensor([5, 9])):
        tokens, _ = dalle.generate_texts(prompt, Unread(), use_cache=False)
        assert tokens.device.type == "meta" and tokens.shape == (1, TEXT_SEQ_LEN)
    tokenizer = ByteTokenizer()
    dalle = tiny_dalle(num_text_tokens=tokenizer.vocab_size).to("meta")
    for prompt in ("ab", ["ab", "cde"]):  # strings, encoded here (decoding needs values: not on meta)
        prompts = dalle._text_prompts(prompt, tokenizer)
        expected = [("meta", 2), ("meta", 3)][: len(prompts)]
        assert [(ids.device.type, ids.shape[1]) for ids in prompts] == expected


def test_the_vae_encodes_outside_autocast_and_without_gradients(monkeypatch):
    """Under a bf16 autocast of the training step, the VAE still encodes in its own fp32."""
    dalle = tiny_dalle()
    seen = []
    encode = dalle.vae.get_codebook_indices

    def recording(images):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(), images.dtype))
        return encode(images)

    monkeypatch.setattr(dalle.vae, "get_codebook_indices", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = dalle.image_codes(torch.rand(2, 3, 16, 16, dtype=torch.float64))
    assert seen == [(False, False, torch.float32)] and codes.shape == (2, 16)


def test_bad_text_prompts_are_refused_naming_the_argument():
    dalle = tiny_dalle()
    with pytest.raises(ValueError, match="^text has 7 tokens, more than text_seq_len=6$"):
        dalle.generate_texts(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^text token ids must be in \[0, 50\), got values in \[3, 50\]"):
        dalle.generate_texts(torch.tensor([[3, 50]]))
    with pytest.raises(ValueError, match=r"^text token ids of ByteTokenizer must be in \[0, 50\)"):
        dalle.generate_texts(["a cat"])  # the default tokenizer's ids do not fit this model


# ----------------------------------------------------------------------------- caching


@pytest.fixture
def passes(monkeypatch):
    """``(watch, take)``: ``watch(dalle)`` counts its full transformer passes, cached one-token
    steps and caches allocated; ``take()`` returns the counts so far and resets them."""
    counts = {"full": 0, "step": 0, "cache": 0}
    call = DecoderStep.forward

    def counted_step(self, *args):
        counts["step"] += 1
        return call(self, *args)

    monkeypatch.setattr(DecoderStep, "forward", counted_step)

    def watch(dalle):
        def count_pass(module, args):
            counts["full"] += 1

        dalle.transformer.register_forward_pre_hook(count_pass)
        new_cache = dalle.transformer.new_cache

        def counted_new_cache(*args):
            counts["cache"] += 1
            return new_cache(*args)

        monkeypatch.setattr(dalle.transformer, "new_cache", counted_new_cache)
        return dalle

    def take():
        taken = dict(counts)
        counts.update(full=0, step=0, cache=0)
        return taken

    return watch, take


def test_generation_runs_the_prompt_once_then_one_cached_step_per_token(text, passes):
    watch, take = passes
    dalle = watch(tiny_dalle())
    prompt = torch.tensor([[5, 9]])  # 4 tokens to sample: the prompt pass gives the first
    dalle.generate_texts(prompt)
    assert take() == {"full": 1, "step": TEXT_SEQ_LEN - 3, "cache": 1}
    dalle.generate_texts(prompt, use_cache=False)
    assert take() == {"full": TEXT_SEQ_LEN - 2, "step": 0, "cache": 0}
    dalle.generate_images(text)  # 16 codes
    assert take() == {"full": 1, "step": 15, "cache": 1}
    dalle.generate_images(text, use_cache=False)
    assert take() == {"full": 16, "step": 0, "cache": 0}


# ----------------------------------------------------------------------------- generate_images


@pytest.fixture
def eager_compile(monkeypatch):
    """``compile=True`` with the graph it would compile (`DecoderStep` without packed weights)
    run eagerly: what `generate_image_codes` hands the compiled step is checked in seconds, not
    minutes."""
    built = []

    def build(model, cache, x, max_len, head):
        built.append(model)
        return DecoderStep(model, max_len, head)

    monkeypatch.setattr(decoder_step, "_load_or_compile", build)
    return built


@pytest.mark.parametrize("sampling", SAMPLING)
def test_generated_codes_and_images_are_the_references(text, sampling, eager_compile):
    dalle = tiny_dalle().double()
    mask = text != 0  # [2, L], the second row's text partly padded
    expected = reference_codes(dalle, text, mask, seeded(6), **sampling)  # [2, 16]
    for kwargs in ({"use_cache": True}, {"use_cache": False}, {"compile": True}):
        codes = dalle.generate_image_codes(text, mask=mask, generator=seeded(6), **sampling, **kwargs)
        assert torch.equal(codes, expected), kwargs
    assert eager_compile == [dalle]

    images = dalle.generate_images(text, mask=mask, generator=seeded(6), **sampling)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float64
    assert 0 <= images.min() and images.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(images, dalle.vae.decode(expected), rtol=0, atol=0)


GUIDED = [  # guidance at a scale other than 1 (also 2), with and without a padding mask
    {"cond_scale": 2.0, "mask": True}, {"cond_scale": 3.0, "mask": False}, {"cond_scale": 0.5, "mask": True},
]


@pytest.mark.parametrize("guidance", GUIDED)
def test_guided_codes_and_their_logits_are_the_references(guidance, eager_compile, sampler_inputs):
    """Three rows (so the conditional and unconditional halves are told apart): every code, and
    every logit the sampler reads (float32, ``uncond + (cond - uncond) * cond_scale``), are those
    of the reference, cached, uncached and compiled."""
    dalle = tiny_dalle().double()
    text = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 4, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0]])  # [3, L]
    mask = text != 0 if guidance["mask"] else None
    cond_scale = guidance["cond_scale"]
    expected_logits = []
    expected = reference_codes(dalle, text, mask, seeded(7), cond_scale=cond_scale, seen=expected_logits)
    for kwargs in ({"use_cache": True}, {"use_cache": False}, {"compile": True}):
        sampler_inputs.clear()
        codes = dalle.generate_image_codes(text, mask=mask, cond_scale=cond_scale, generator=seeded(7),
                                           **kwargs)
        assert torch.equal(codes, expected), kwargs
        assert len(sampler_inputs) == len(expected_logits) == dalle.image_seq_len
        for got, want in zip(sampler_inputs, expected_logits):
            assert got.dtype == torch.float32 and got.shape == (3, dalle.num_image_tokens)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_prompt_pass_reads_the_padding_mask(text, sampler_inputs):
    """The logits of the first code (from the prompt pass) and of every later one are the masked
    reference's, which differ from the unmasked ones."""
    dalle = tiny_dalle().double()
    mask = text != 0
    masked, unmasked = [], []
    reference_codes(dalle, text, mask, seeded(2), temperature=0.0, seen=masked)
    reference_codes(dalle, text, None, seeded(2), temperature=0.0, seen=unmasked)
    assert not torch.allclose(masked[0], unmasked[0])
    sampler_inputs.clear()
    dalle.generate_image_codes(text, mask=mask, temperature=0.0)
    for got, want in zip(sampler_inputs, masked, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("primed_tokens", [0, 5])
def test_primed_codes_are_kept_and_the_rest_is_the_reference(primed_tokens, sampler_inputs):
    """``img`` with ``num_init_img_tokens=n`` (0 included): the image's first n codes, then the
    reference's continuation, which leaves the generator where the reference leaves it."""
    dalle = tiny_dalle().double()
    text = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 4, 0, 0, 0, 0]])
    image = torch.rand(2, 3, 16, 16, generator=seeded(8), dtype=torch.float64)
    primed = dalle.image_codes(image)[:, :primed_tokens]
    generator, reference_generator = seeded(9), seeded(9)
    expected = reference_codes(dalle, text, None, reference_generator, primed=primed)
    sampler_inputs.clear()
    codes = dalle.generate_image_codes(text, img=image, num_init_img_tokens=primed_tokens,
                                       generator=generator)
    assert torch.equal(codes, expected) and torch.equal(codes[:, :primed_tokens], primed)
    assert len(sampler_inputs) == dalle.image_seq_len - primed_tokens
    assert torch.equal(generator.get_state(), reference_generator.get_state())


def test_compile_needs_the_cache_also_through_generate_images(text):
    with pytest.raises(ValueError, match="^compile=True compiles the cached step: it needs use_cache=True$"):
        tiny_dalle().generate_images(text, compile=True, use_cache=False)


def test_clip_scores_the_generated_images_with_the_text_and_its_mask(text):
    dalle = tiny_dalle().train()
    mask = text != 0
    seen = {}

    def clip(text_, images_, text_mask=None):  # [B, L], [B, C, H, W], [B, L] -> scores [B]
        seen.update(text=text_, images=images_, mask=text_mask)
        return images_.flatten(1).mean(1)

    images, scores = dalle.generate_images(text, mask=mask, clip=clip, generator=seeded(1))
    assert seen["text"] is text and seen["images"] is images and torch.equal(seen["mask"], mask)
    assert torch.equal(scores, images.flatten(1).mean(1))
    assert dalle.training  # the mode the call found


def test_image_positions_are_row_plus_column_embeddings(text):
    """Adding a vector to every row embedding and taking it from every column embedding leaves
    the model unchanged (atol 1e-10 in float64); moving only the rows does not."""
    dalle = tiny_dalle(rotary_emb=False).double()
    codes = torch.arange(15).remainder(7)[None].expand(2, -1)  # [2, 15]
    with torch.no_grad():
        before = dalle(text, codes)  # [2, L + 16, Vt + Vi]
        shift = torch.randn(32, dtype=torch.float64, generator=seeded(0))
        dalle.image_row_emb.weight += shift
        moved_rows = dalle(text, codes)
        dalle.image_col_emb.weight -= shift
        after = dalle(text, codes)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    assert (moved_rows - before).abs().max() > 1e-3


def test_a_shared_image_head_adds_its_bias(text):
    """``share_input_output_emb``: image logits are the code embeddings' products plus the bias."""
    dalle = tiny_dalle(share_input_output_emb=True).eval()
    with torch.no_grad():
        dalle.image_head_bias[5] = 1e4  # code 5 wins every image position through the bias alone
    codes = torch.randint(0, dalle.num_image_tokens, (text.shape[0], dalle.image_seq_len))
    with torch.no_grad():
        logits = dalle(text, codes)[:, dalle.text_len:, -dalle.num_image_tokens:]  # [B, image_seq_len, Vi]
    assert bool((logits.argmax(-1) == 5).all())


def test_image_codes_are_encoded_in_the_vaes_precision():
    """Pixels in another dtype, or under autocast, are encoded as fp32 pixels are."""
    dalle = tiny_dalle()
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    expected = dalle.vae.get_codebook_indices(image.float())  # [2, 16]
    assert torch.equal(dalle.image_codes(image), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(dalle.image_codes(image.float()), expected)
