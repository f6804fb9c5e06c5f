"""Generation: the key/value cache, guidance, priming, CLIP ranking and text continuation."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_TYPES, STEP_OPTIONS, TEXT_SEQ_LEN, step_case, tiny_dalle

import dalle_core.decoder_step as decoder_step_module
from dalle_core import CLIP, sampling
from dalle_core.decoder_step import PACK_ROWS, DecoderStep, Projections, bind, decoder_step
from dalle_core.plugins import default_tokenizer_name
from dalle_core.sampling import Sampler, gumbel_noise, keep_count, top_p_filter
from dalle_core.tokenizers import ByteTokenizer


def generate(dalle, text, seed, **kwargs):
    return dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("attn_type", ALL_TYPES)
@pytest.mark.parametrize(
    "options",
    [{}, {"rotary_emb": False, "shift_tokens": False}, {"reversible": True},
     {"sandwich_norm": True, "stable": True, "share_input_output_emb": True}],
)
def test_cached_equals_uncached_for_every_attention_type(text, attn_type, options):
    dalle = tiny_dalle(attn_types=(attn_type, "full"), **options).double()
    cached = generate(dalle, text, 7, use_cache=True)
    uncached = generate(dalle, text, 7, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)


def stepped_logits(dalle, x, keep, start, head, pack=False):
    """The step's logits for ``x [rows, n, dim]`` from position ``start`` on, one token at a
    time after a prefill of the first ``start`` positions: ``[rows, n - start, vocabulary]``."""
    transformer = dalle.transformer
    with torch.no_grad():
        cache = transformer.new_cache(x.shape[0], x.shape[1], x)
        transformer(x[:, :start], key_padding_mask=keep, cache=cache)
        if pack is None:  # as generation picks
            step = decoder_step(dalle, cache, keep, x[:, 0], head)
        else:
            step = bind(DecoderStep(dalle, x.shape[1], head, pack=pack), cache, keep)
        return torch.stack([step(x[:, position], position) for position in range(start, x.shape[1])], dim=1)


def forward_logits(dalle, x, keep, head):
    """What the step must equal: the heads over the whole forward's hidden states."""
    with torch.no_grad():
        hidden = dalle._output_norm(dalle.transformer(x, key_padding_mask=keep))
        return dalle._image_logits(hidden) if head == "image" else dalle._text_logits(hidden)


@pytest.mark.parametrize("options", STEP_OPTIONS)
def test_the_step_equals_the_forward_one_token_at_a_time(options):
    dalle, x, keep, start = step_case(options)
    expected = forward_logits(dalle, x, keep, "image")[:, start:]
    got = stepped_logits(dalle, x, keep, start, "image", pack=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_text_step_equals_the_forward_over_text_positions():
    dalle, x, keep, _ = step_case({})
    n = dalle.text_len
    expected = forward_logits(dalle, x[:, :n], keep[:, :n], "text")[:, 2:]
    got = stepped_logits(dalle, x[:, :n], keep[:, :n], 2, "text")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "options", [{}, {"upstream_rotary": True, "share_input_output_emb": True}, {"reversible": True}]
)
def test_the_packed_float32_step_follows_the_forward_and_ignores_its_batch(options):
    """float32: the step generation runs (weights packed by oneDNN) within 2e-5 of the forward,
    alone as in the batch (its products do not change with the rows: the elementwise kernels'
    vector loops do, in the last bit)."""
    dalle, x, keep, start = step_case(options)
    dalle, x = dalle.float(), x.float()
    assert Projections.packable(x)
    expected = forward_logits(dalle, x, keep, "image")[:, start:]
    batched = stepped_logits(dalle, x, keep, start, "image", pack=True)
    torch.testing.assert_close(batched, expected, rtol=0, atol=2e-5)
    for row in range(2):
        alone = stepped_logits(dalle, x[row : row + 1], keep[row : row + 1], start, "image", pack=True)
        torch.testing.assert_close(alone[0], batched[row], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options", [{}, {"shift_tokens": False}, {"sandwich_norm": True}, {"reversible": True}]
)
def test_prefill_of_the_last_position_equals_the_full_forward(options):
    dalle = tiny_dalle(**{"attn_types": ALL_TYPES, "depth": 3, **options}).double().eval()
    transformer, n = dalle.transformer, dalle.text_len + 5
    x = torch.randn(2, n, 32, dtype=torch.float64)
    with torch.no_grad():
        full_cache, last_cache = (transformer.new_cache(2, dalle.seq_len, x) for _ in range(2))
        expected = transformer(x, cache=full_cache)[:, -1:]
        got = transformer(x, cache=last_cache, last_only=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for full, last in zip(full_cache, last_cache):  # what later steps read: the first n positions
        for branch_full, branch_last in ((full.attn, last.attn), (full.ff, last.ff)):
            if branch_full.kv is not None:
                torch.testing.assert_close(
                    branch_last.kv[..., :n, :], branch_full.kv[..., :n, :], rtol=0, atol=1e-12
                )
            if branch_full.shifted_inputs is not None:
                torch.testing.assert_close(
                    branch_last.shifted_inputs[:, :n], branch_full.shifted_inputs[:, :n], rtol=0, atol=1e-12
                )


def test_the_step_under_autocast_follows_the_forward():
    dalle = tiny_dalle(attn_types=ALL_TYPES).eval()
    start = dalle.text_len + 3
    x = torch.randn(2, dalle.seq_len, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not Projections.packable(x)
        expected = forward_logits(dalle, x, None, "image")[:, start:]
        got = stepped_logits(dalle, x, None, start, "image", pack=None)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("packs", [True, False], ids=["packed", "F.linear"])
def test_a_bfloat16_model_steps_packed_where_onednn_packs_bfloat16_else_through_linear(packs, monkeypatch):
    """oneDNN packs bfloat16 weights only on CPUs with AVX-512 (or AVX-NE-CONVERT) and raises
    elsewhere: generation asks it once, and steps through ``F.linear`` where it cannot."""
    if packs and not decoder_step_module._onednn_packs(torch.bfloat16):
        pytest.skip("this CPU's oneDNN does not pack bfloat16 weights (it needs AVX-512)")
    monkeypatch.setattr(decoder_step_module, "_onednn_packs", lambda dtype: packs)
    dalle, x, keep, start = step_case({"attn_types": ("full", "axial_row")})
    dalle, x = dalle.to(torch.bfloat16), x.to(torch.bfloat16)
    assert Projections.packable(x) is packs
    expected = forward_logits(dalle, x, keep, "image")[:, start:]
    got = stepped_logits(dalle, x, keep, start, "image", pack=None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.1)


def test_onednn_is_asked_once_whether_it_packs_a_dtype(monkeypatch):
    assert decoder_step_module._onednn_packs(torch.float32)  # wherever oneDNN runs
    probe = decoder_step_module._onednn_packs.__wrapped__  # not cached

    def refusing(weight, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refusing)
    assert probe(torch.bfloat16) is False and probe(torch.float32) is False
    assert decoder_step_module._onednn_packs(torch.float32)  # the cached answer
    asked = []
    monkeypatch.setattr(decoder_step_module, "_onednn_packs", lambda dtype: asked.append(dtype) or False)
    assert not Projections.packable(torch.zeros(1, dtype=torch.bfloat16)) and asked == [torch.bfloat16]


def test_generation_packs_float32_weights_on_the_cpu_not_float64_nor_under_autocast(text, monkeypatch):
    packs = []
    init = Projections.__init__

    def recording(self, weights, pack):
        packs.append(pack)
        init(self, weights, pack)

    monkeypatch.setattr(Projections, "__init__", recording)
    dalle = tiny_dalle()
    generate(dalle, text, 1)
    dalle.generate_texts(text[:1, :2])
    generate(dalle.double(), text, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(dalle.float(), text, 1)
    assert packs == [True, True, False, False]


def test_heads_are_named_text_or_image():
    dalle = tiny_dalle()
    assert dalle.head_weights("image")[0] is dalle.image_head.weight
    assert dalle.head_weights("text")[1] is dalle.text_head.bias
    with pytest.raises(ValueError, match="^head must be 'text' or 'image', got 'codes'$"):
        dalle.head_weights("codes")


@pytest.mark.parametrize("bias", [True, False])
def test_packed_products_equal_linear_and_do_not_depend_on_the_rows(bias):
    linear = torch.nn.Linear(48, 24, bias=bias)
    h = torch.randn(PACK_ROWS, 48)
    with torch.no_grad():
        packed = Projections([linear.weight], pack=True)
        full = packed(h, linear.weight, linear.bias)
        torch.testing.assert_close(full, linear(h), rtol=1e-5, atol=1e-5)
        for rows in (1, 2, 3, 4, 7, 9):
            assert torch.equal(packed(h[1 : rows + 1], linear.weight, linear.bias), full[1 : rows + 1])
        plain = Projections([linear.weight], pack=False)
        assert torch.equal(plain(h, linear.weight, linear.bias), linear(h))


def test_weights_beyond_the_packing_bound_are_not_packed(monkeypatch):
    from dalle_core import decoder_step as step_module

    weights = [torch.randn(8, 16), torch.randn(8, 16)]  # 512 bytes each
    monkeypatch.setattr(step_module, "PACK_MAX_BYTES", 1024)
    assert len(Projections([*weights, weights[0]], pack=True).packed) == 2  # a shared weight counts once
    monkeypatch.setattr(step_module, "PACK_MAX_BYTES", 1023)
    assert not Projections(weights, pack=True).packed


def test_cached_equals_uncached_with_shared_layers(text):
    dalle = tiny_dalle(depth=3, shared_attn_ids=(0, 1, 0), shared_ff_ids=(0, 0, 0)).double()
    assert torch.equal(generate(dalle, text, 5), generate(dalle, text, 5, use_cache=False))


@pytest.mark.parametrize("kwargs", [
    {"cond_scale": 3.0},
    {"mask": torch.tensor([[True] * 6, [True] * 3 + [False] * 3])},
    {"img": torch.rand(2, 3, 16, 16), "num_init_img_tokens": 5},
    {"cond_scale": 2.0, "top_p": 0.9, "temperature": 0.7, "filter_thres": 0.2},
])
def test_cached_equals_uncached_with_guidance_masks_and_priming(text, kwargs):
    dalle = tiny_dalle(attn_types=ALL_TYPES).double()
    if "img" in kwargs:
        kwargs = {**kwargs, "img": kwargs["img"].double()}
    cached = generate(dalle, text, 11, **kwargs)
    assert torch.equal(cached, generate(dalle, text, 11, use_cache=False, **kwargs))


def test_guided_rows_equal_separate_conditional_and_unconditional_runs(text):
    """Guidance in one batch == logits of the two rows computed apart (no cache leak)."""
    dalle = tiny_dalle().double().eval()
    codes = generate(dalle, text, 3, cond_scale=2.5, temperature=0.0)
    # replay greedily: each code is argmax of uncond + 2.5 * (cond - uncond) from separate runs
    for position in range(16):
        prefix = codes[:, :position]
        cond = dalle(text, prefix)[:, -1, -32:]
        uncond = dalle(torch.zeros_like(text), prefix)[:, -1, -32:]
        expected = (uncond + (cond - uncond) * 2.5).argmax(dim=-1)
        assert torch.equal(codes[:, position], expected), position


def test_priming_keeps_the_first_codes(text):
    dalle = tiny_dalle()
    img = torch.rand(2, 3, 16, 16)
    codes = generate(dalle, text, 0, img=img, num_init_img_tokens=6)
    assert torch.equal(codes[:, :6], dalle.vae.get_codebook_indices(img)[:, :6])


def test_inputs_are_never_modified(text):
    dalle = tiny_dalle()
    mask = text != 0
    img = torch.rand(2, 3, 16, 16)
    before = (text.clone(), mask.clone(), img.clone())
    dalle.generate_images(text, mask=mask, img=img, cond_scale=3.0)
    assert torch.equal(text, before[0]) and torch.equal(mask, before[1]) and torch.equal(img, before[2])



@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_codes_and_images_are_ordinary_tensors(text, use_cache):
    """The eager step runs in inference mode; what the caller gets must not be an inference
    tensor (those refuse in-place updates and autograd outside inference mode)."""
    dalle = tiny_dalle()
    img = torch.rand(2, 3, 16, 16)
    codes = generate(dalle, text, 0, img=img, num_init_img_tokens=6, use_cache=use_cache)
    images = dalle.generate_images(text, use_cache=use_cache)
    assert not codes.is_inference() and not images.is_inference()
    codes += 1  # in place, outside inference mode
    loss = (images.requires_grad_() * 2).sum()
    loss.backward()
    assert torch.equal(images.grad, torch.full_like(images, 2.0))

def test_same_generator_seed_same_images_and_mode_is_restored(text):
    dalle = tiny_dalle(ff_dropout=0.3).train()
    first = dalle.generate_images(text, generator=torch.Generator().manual_seed(1))
    second = dalle.generate_images(text, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert dalle.training
    assert first.shape == (2, 3, 16, 16) and 0 <= first.min() and first.max() <= 1


def test_a_generator_per_row_makes_each_row_independent_of_its_batch(text, monkeypatch):
    """Row i drawn from generator i alone: the same codes alone, in another batch, at another
    position, guided or not, whatever the chunking of the noise (which depends on the rows)."""
    monkeypatch.setattr(sampling, "NOISE_CHUNK_VALUES", 100)  # a few steps per chunk, fewer for more rows
    dalle = tiny_dalle().double()

    def seeded(*seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    for options in ({}, {"cond_scale": 3.0, "filter_thres": 0.5}):
        alone = [
            dalle.generate_image_codes(text[i : i + 1], generator=seeded(10 + i), **options) for i in (0, 1)
        ]
        together = dalle.generate_image_codes(text, generator=seeded(10, 11), **options)  # [2, 16]
        assert torch.equal(together, torch.cat(alone))
        swapped = dalle.generate_image_codes(text.flip(0), generator=seeded(11, 10), **options)
        assert torch.equal(swapped, together.flip(0))
        wider = torch.cat((text, text))  # [4, L]: 4 rows draw their noise in other chunks
        four = dalle.generate_image_codes(wider, generator=seeded(10, 11, 12, 13), **options)
        assert torch.equal(four[:2], together) and not torch.equal(four[2:], together)
    with pytest.raises(ValueError, match="one generator per row: got 1 generators for 2 rows"):
        dalle.generate_image_codes(text, generator=seeded(1))


def test_progress_counts_the_sampled_positions_and_can_stop_generation(text):
    dalle = tiny_dalle()
    calls = []
    dalle.generate_images(text, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 16) for done in range(1, 17)]
    calls.clear()  # priming: only the positions after the image's first 6 codes are sampled
    dalle.generate_image_codes(text, img=torch.rand(2, 3, 16, 16), num_init_img_tokens=6,
                               progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 10) for done in range(1, 11)]

    class Cancelled(Exception):
        pass

    def stop_at_three(done, total):
        if done == 3:
            raise Cancelled

    dalle.train()
    with pytest.raises(Cancelled):
        dalle.generate_images(text, progress=stop_at_three)
    assert dalle.training  # the mode is restored when a progress callback stops generation


def test_clip_ranking_returns_images_and_scores(text):
    clip = CLIP(dim_text=16, dim_image=16, dim_latent=16, num_text_tokens=50, text_enc_depth=1,
                text_seq_len=TEXT_SEQ_LEN, text_heads=2, visual_enc_depth=1, visual_image_size=16,
                visual_patch_size=4, visual_heads=2)
    images, scores = tiny_dalle().generate_images(text, mask=text != 0, clip=clip)
    assert images.shape == (2, 3, 16, 16) and scores.shape == (2,)


def test_generate_texts_continues_strings_with_the_saved_tokenizer(tmp_path):
    dalle = tiny_dalle(num_text_tokens=257, tokenizer=ByteTokenizer())
    dalle.save_pretrained(tmp_path)
    loaded = type(dalle).from_pretrained(tmp_path)
    tokens, texts = loaded.generate_texts("ab", generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (1, TEXT_SEQ_LEN)
    assert tokens[0, :2].tolist() == ByteTokenizer().encode("ab")
    assert texts[0].startswith("ab") and isinstance(texts[0], str)
    assert ((tokens >= 0) & (tokens < 257)).all()


def test_generate_texts_cached_equals_uncached_and_feeds_generate_images():
    dalle = tiny_dalle().double()
    prompt = torch.tensor([[5, 9]])
    cached, _ = dalle.generate_texts(prompt, generator=torch.Generator().manual_seed(2))
    uncached, _ = dalle.generate_texts(prompt, use_cache=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(cached, uncached)
    assert dalle.generate_images(cached).shape == (1, 3, 16, 16)


def test_generate_texts_without_a_tokenizer_uses_the_default_one():
    dalle = tiny_dalle()
    assert default_tokenizer_name() == "bytes"  # dalle-tokenizers is not installed with dalle-core alone
    tokens, texts = dalle.generate_texts()
    assert tokens.shape == (1, TEXT_SEQ_LEN) and texts == [ByteTokenizer().decode(tokens[0])]
    big = tiny_dalle(num_text_tokens=300)
    tokens, texts = big.generate_texts("a cat", generator=torch.Generator().manual_seed(0))
    assert tokens[0, :5].tolist() == ByteTokenizer().encode("a cat") and texts[0].startswith("a cat")
    with pytest.raises(ValueError, match=r"^text token ids of ByteTokenizer must be in \[0, 50\), got values "
                                         r"in \[33, 117\]"):
        dalle.generate_texts("a cat")  # bytes ids beyond this model's 50 text tokens


def test_bad_generation_arguments(text):
    dalle = tiny_dalle()
    with pytest.raises(ValueError, match=r"num_init_img_tokens must be in \[0, 16\)"):
        dalle.generate_images(text, img=torch.rand(2, 3, 16, 16), num_init_img_tokens=16)
    with pytest.raises(ValueError, match="filter_thres"):
        dalle.generate_images(text, filter_thres=1.0)
    with pytest.raises(ValueError, match="text_seq_len=6"):
        dalle.generate_images(text[:, :4])


def test_top_k_keeps_the_largest_share():
    assert keep_count(0.5, 4) == 2 and keep_count(0.9, 512) == 51 and keep_count(0.99, 10) == 1
    greedy = sampler(1, 4, 0, filter_thres=0.5, temperature=0.0)
    assert greedy.k == 2 and greedy(torch.tensor([[1.0, 4.0, 3.0, 2.0]])).tolist() == [1]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.75)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1


def sampler(rows, vocab, seed, steps=1, **kwargs):
    options = {"filter_thres": 0.0, "top_p": None, "temperature": 1.0, **kwargs}
    return Sampler(vocab, rows, steps, generator=torch.Generator().manual_seed(seed), **options)


def test_sampling_draws_only_the_kept_codes_with_their_renormalised_probabilities():
    probs = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1])  # top-k 0.4 keeps 3 codes: 1, 3, 2
    logits = probs.log().expand(30000, 5)
    draws = sampler(30000, 5, 0, filter_thres=0.4)(logits)
    freq = torch.bincount(draws, minlength=5).float() / 30000
    kept = torch.tensor([0.0, 0.4, 0.15, 0.3, 0.0]) / 0.85
    torch.testing.assert_close(freq, kept, atol=0.015, rtol=0)
    # top-p 0.6 over the kept codes (0.47, 0.35, 0.18) keeps 1 and 3
    draws = sampler(30000, 5, 1, filter_thres=0.4, top_p=0.6)(logits)
    assert set(draws.unique().tolist()) == {1, 3}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_sampling_follows_the_tempered_distribution(temperature):
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    draws = sampler(20000, 3, 0, temperature=temperature)(logits)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    tempered = (probs.log() / temperature).softmax(dim=0)  # p^(1/T), renormalised
    torch.testing.assert_close(freq, tempered, atol=0.02, rtol=0)
    assert torch.equal(sampler(2, 3, 0, temperature=0.0)(logits[:2]), torch.tensor([0, 0]))


def test_sampler_draws_its_noise_in_chunks_that_continue_one_stream(monkeypatch):
    logits = torch.randn(3, 40)
    whole = sampler(3, 40, 5, steps=6, filter_thres=0.5)
    expected = [whole(logits) for _ in range(6)]
    monkeypatch.setattr("dalle_core.sampling.NOISE_CHUNK_VALUES", 3 * 20 * 2)  # two steps a chunk
    chunked = sampler(3, 40, 5, steps=6, filter_thres=0.5)
    assert chunked.chunk_steps == 2
    assert all(torch.equal(chunked(logits), e) for e in expected)
    g = gumbel_noise((200000,), torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(g.mean(), torch.tensor(0.5772), atol=0.01, rtol=0)  # Euler's gamma


def test_sampler_rejects_bad_arguments():
    for kwargs, message in [({"filter_thres": 1.0}, "filter_thres must be in"),
                            ({"top_p": 0.0}, "top_p must be in"), ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=message):
            sampler(2, 10, 0, **kwargs)
