"""The sampler's promises (dalle_core.sampling): top-k keeps the ``max(1, (1 - thres) * vocab)``
largest logits, nucleus keeps the smallest set reaching ``top_p`` (at least one), temperature 0
is greedy, the Gumbel-max draw follows ``softmax(logits / T)`` over the kept logits, and the same
generator state gives the same tokens however the noise is drawn ahead.

Everything runs on the CPU with fixed generators, so the statistical checks are deterministic;
their tolerances are stated next to them (several standard errors of the drawn frequencies).
"""

from __future__ import annotations

import math

import pytest
import torch

from dalle_core.sampling import Sampler, gumbel_noise, keep_count, top_p_filter


def make_sampler(vocab, rows, seed, steps=1, **kwargs) -> Sampler:
    """A sampler drawing from a fresh generator seeded ``seed`` (or ``generator=`` given)."""
    options = {"filter_thres": 0.0, "top_p": None, "temperature": 1.0, **kwargs}
    options.setdefault("generator", torch.Generator().manual_seed(seed))
    return Sampler(vocab, rows, steps, **options)


def frequencies(tokens, vocab) -> torch.Tensor:
    """``tokens [n]`` -> the share of each id ``[vocab]``."""
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


# ------------------------------------------------------------------------------------ top-k


def test_top_k_draws_only_among_the_largest_share():
    assert [keep_count(t, v) for t, v in [(0.0, 7), (0.5, 4), (0.9, 512), (0.99, 10)]] == [7, 2, 51, 1]
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, 1.0, -0.5, 0.9]).expand(4000, 8)  # [4000, 8]
    tokens = make_sampler(8, 4000, 0, filter_thres=0.5)(logits)  # keeps 4: ids 1, 3, 5, 7
    assert set(tokens.unique().tolist()) == {1, 3, 5, 7}


# ---------------------------------------------------------------------------------- nucleus


@pytest.mark.parametrize("top_p, kept", [(0.1, 1), (0.25, 1), (0.5, 2), (0.6, 3), (0.75, 3), (1.0, 4)])
def test_nucleus_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    # 4 equal logits: probabilities 1/4 and cumulative masses 1/4, 1/2, 3/4, 1 are exact in float32,
    # so a set that reaches top_p exactly must not grow by one more logit
    logits = torch.zeros(2, 4)  # [2, 4], sorted largest first (ties)
    filtered = top_p_filter(logits, top_p)
    assert torch.isfinite(filtered).sum(dim=-1).tolist() == [kept, kept]
    assert torch.isfinite(filtered[:, :kept]).all()  # the largest are the ones kept
    assert (filtered[torch.isfinite(filtered)] == 0).all()  # kept logits are unchanged


def test_nucleus_in_the_sampler_keeps_exactly_the_mass_and_accepts_top_p_one():
    logits = torch.zeros(20000, 8)  # [20000, 8]; top-k 0.5 keeps 4 codes of probability 1/4 each
    tokens = make_sampler(8, 20000, 0, filter_thres=0.5, top_p=0.5)(logits)
    shares = frequencies(tokens, 8)
    assert (shares > 0).sum() == 2  # 1/4 + 1/4 reaches 0.5: the third code is not kept
    torch.testing.assert_close(shares[shares > 0], torch.full((2,), 0.5), atol=0.02, rtol=0)  # SE 0.0035
    # top_p = 1 is allowed and keeps every code top-k kept
    tokens = make_sampler(8, 20000, 0, filter_thres=0.5, top_p=1.0)(logits)
    assert (frequencies(tokens, 8) > 0.2).sum() == 4
    for top_p in (0.0, -0.5, 1.0001, 1.5, 2.0):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            make_sampler(8, 2, 0, top_p=top_p)


# ------------------------------------------------------------------------ Gumbel-max, temperature


def test_gumbel_noise_is_standard_gumbel():
    g = gumbel_noise((200000,), torch.Generator().manual_seed(0), "cpu")  # [200000]
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    for x in (-1.0, 0.0, 0.5, 2.0):  # CDF exp(-exp(-x)); SE of the empirical CDF <= 0.0012
        cdf = (g <= x).float().mean().item()
        assert abs(cdf - math.exp(-math.exp(-x))) < 0.006
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03  # variance pi^2/6 = 1.645


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_gumbel_max_draws_follow_softmax_of_the_kept_logits_over_temperature(temperature):
    logits = torch.tensor([0.4, -0.3, 1.2, -2.0, 0.1]).expand(20000, 5)  # [20000, 5]
    # top-k 0.4 keeps 3: ids 2, 0, 4; the rest have probability 0
    tokens = make_sampler(5, 20000, 3, filter_thres=0.4, temperature=temperature)(logits)
    kept = torch.tensor([True, False, True, False, True])
    expected = (logits[0] / temperature).masked_fill(~kept, float("-inf")).softmax(dim=0)
    torch.testing.assert_close(frequencies(tokens, 5), expected, atol=0.015, rtol=0)  # SE <= 0.0036


def test_temperature_zero_is_greedy_and_draws_no_noise():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))  # [6, 50]
    generator = torch.Generator().manual_seed(4)
    greedy = make_sampler(50, 6, 0, steps=3, top_p=0.9, temperature=0.0, generator=generator)
    for _ in range(3):
        assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    # the generator is left as it was: a sampler after the greedy one draws as if it came first
    after = make_sampler(50, 6, 0, generator=generator)(logits)
    assert torch.equal(after, make_sampler(50, 6, 4)(logits))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        make_sampler(50, 6, 0, temperature=-0.1)


# ---------------------------------------------------------------------- reproducibility, chunks


def test_same_generator_state_gives_the_same_tokens():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))  # [4, 30]
    first = [make_sampler(30, 4, 9, steps=5, top_p=0.8)(logits) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    torch.manual_seed(9)  # generator=None draws from the global generator
    unseeded = make_sampler(30, 4, 0, top_p=0.8, generator=None)(logits)
    assert torch.equal(unseeded, first[0])


@pytest.mark.parametrize("chunk_steps", [1, 2, 4])
def test_noise_drawn_ahead_in_chunks_gives_the_tokens_of_drawing_per_step(monkeypatch, chunk_steps):
    rows, vocab, steps, k = 3, 40, 7, 20  # top-k 0.5 keeps 20: noise [3, 20] a step
    logits = [torch.randn(rows, vocab, generator=torch.Generator().manual_seed(s)) for s in range(steps)]
    monkeypatch.setattr("dalle_core.sampling.NOISE_CHUNK_VALUES", rows * k)  # one step a draw
    per_step = make_sampler(vocab, rows, 5, steps=steps, filter_thres=0.5, temperature=0.7)
    expected = [per_step(x) for x in logits]
    monkeypatch.setattr("dalle_core.sampling.NOISE_CHUNK_VALUES", rows * k * chunk_steps)
    chunked = make_sampler(vocab, rows, 5, steps=steps, filter_thres=0.5, temperature=0.7)
    assert [chunked(x).tolist() for x in logits] == [e.tolist() for e in expected]
    monkeypatch.undo()  # the default budget draws all 7 steps at once
    ahead = make_sampler(vocab, rows, 5, steps=steps, filter_thres=0.5, temperature=0.7)
    assert [ahead(x).tolist() for x in logits] == [e.tolist() for e in expected]


@pytest.mark.parametrize("budget_steps", [None, 1])
def test_samplers_in_turn_on_one_generator_draw_as_one_sampler(monkeypatch, budget_steps):
    """A sampler draws the noise of its ``steps`` and no more, even when a single step fills the
    noise budget, so samplers run one after another on one generator (as ``generate_texts``
    does, one per prompt) continue its stream."""
    rows, vocab, steps = 2, 16, 3  # noise [2, 16] a step
    if budget_steps is not None:
        monkeypatch.setattr("dalle_core.sampling.NOISE_CHUNK_VALUES", rows * vocab * budget_steps)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))  # [2, 16]
    one = make_sampler(vocab, rows, 11, steps=2 * steps)
    expected = [one(logits).tolist() for _ in range(2 * steps)]
    generator = torch.Generator().manual_seed(11)
    got = []
    for run_steps in (1, steps - 1, steps):  # 6 steps in all
        sampler = make_sampler(vocab, rows, 0, steps=run_steps, generator=generator)
        got += [sampler(logits).tolist() for _ in range(run_steps)]
    assert got == expected


# ---------------------------------------------------------------------------- dtype, device


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_noise_is_float32_whatever_the_default_dtype(float64_default):
    assert gumbel_noise((3, 4), torch.Generator().manual_seed(0), "cpu").dtype == torch.float32
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    tokens = make_sampler(30, 4, 9, steps=5, top_p=0.8)(logits)  # [4]
    torch.set_default_dtype(torch.float32)
    assert torch.equal(tokens, make_sampler(30, 4, 9, steps=5, top_p=0.8)(logits))


def test_noise_and_tokens_are_on_the_sampler_device():
    # the meta device stands in for an accelerator: shapes and devices without data
    noise = gumbel_noise((3, 4), None, "meta")
    assert noise.device.type == "meta" and noise.shape == (3, 4) and noise.dtype == torch.float32
    sampler = make_sampler(30, 4, 0, steps=2, filter_thres=0.5, top_p=0.9, temperature=0.8,
                           generator=None, device="meta")
    tokens = sampler(torch.empty(4, 30, device="meta"))
    assert tokens.device.type == "meta" and tokens.shape == (4,) and tokens.dtype == torch.long
