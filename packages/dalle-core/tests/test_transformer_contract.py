"""The transformer's promises, each checked against a plain reference or a recording stand-in.

- Rotary embeddings as upstream: a third of each head's features (rounded down to an even
  count) rotates by text position (image codes all at 8192) with language frequencies
  ``10000^(-2i/d)``, a third by image row and one by image column (on ``linspace(-1, 1)``, text
  at -10) with pixel frequencies ``linspace(1, 5) * pi``; q and k are rotated pairwise by those
  angles, the other features pass; ``dim_head`` below 6 is an error.
- Token shift: text tokens take the first half of their features from the previous token, image
  codes the first quarter from the code above and the second from the code to the left, zeros
  where there is none; over a whole sequence, in slices at any offset through the cache, and
  through the flat indices of cached generation steps; in the input's dtype; its tables cover
  the model's input positions, and ``dim`` must be divisible by 4.
- A sequence run in chunks through the cache equals it run at once (queries know their offset);
  the cache has a key/value slot per position and token shift's history one spare zero row.
- Kernels: a named kernel is asked about every kind of call (pattern, device, dtype, whether
  gradients are needed, whether the queries start after position 0) once, and SDPA serves the
  calls it refuses; ``auto`` takes the supporting kernel with the highest priority for the
  pattern and device; a named kernel lacking a layer's pattern is an error naming both.
- Dropout reaches the attention output and the feed-forward, in training only.
- ``shift_tokens=False`` has no token shift; LayerScale's initial factor per layer is upstream's
  (0.1 to layer 18, 1e-5 to 24, 1e-6 beyond); sandwich norm normalizes every branch's output.
- Activation checkpointing runs for training with gradients only, with the same gradients.
- The rotary tables are derived, not saved in the state dict.
- A prefill with ``last_only`` and a cache runs the last layer for the last position only.
"""

from __future__ import annotations

import math

import pytest
import torch

from dalle_core import hookimpl
from dalle_core import transformer as transformer_module
from dalle_core.attention.kernels import SDPAKernel
from dalle_core.plugins import get_plugin_manager, reset_plugins, usable_attention_kernels
from dalle_core.transformer import (
    BranchCache,
    ForwardContext,
    TokenShift,
    Transformer,
    apply_rotary,
    rotary_angles,
    rotary_tables,
)

TEXT_LEN, FMAP = 5, 3
SEQ_LEN = TEXT_LEN + FMAP**2 - 1  # the model's input: text, then every code but the last


def make(**overrides) -> Transformer:
    torch.manual_seed(0)
    kwargs = dict(
        dim=32, depth=2, text_len=TEXT_LEN, fmap_size=FMAP, heads=2, dim_head=16, attn_dropout=0.0,
        ff_dropout=0.0, attn_types=("full", "axial_row"), attn_kernel="auto", sandwich_norm=False,
        shift_tokens=True, rotary_emb=True, reversible=False, activation_checkpointing=False,
    )
    kwargs.update(overrides)
    return Transformer(**kwargs).double()


def inputs(dim: int = 32, n: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- rotary


def reference_angles(dim_head: int, text_len: int, fmap: int) -> torch.Tensor:
    """``[seq_len, 3 * part]``: per position, the (text, row, column) angles, written twice."""
    part = (dim_head // 3) // 2 * 2
    text_freqs = [10000 ** (-2 * i / part) for i in range(part // 2)]
    steps = part // 2
    pixel_freqs = [(1 + 4 * i / (steps - 1)) * math.pi if steps > 1 else math.pi for i in range(steps)]
    grid = [-1 + 2 * k / (fmap - 1) for k in range(fmap)]
    rows = []
    for p in range(text_len + fmap**2 - 1):
        if p < text_len:
            text, row, col = p, -10.0, -10.0
        else:
            text, (r, c) = 8192, divmod(p - text_len, fmap)
            row, col = grid[r], grid[c]
        angles = [text * f for f in text_freqs]
        angles += [row * f for f in pixel_freqs] + [col * f for f in pixel_freqs]
        rows.append(angles + angles)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim_head", [6, 18, 64])
def test_rotary_angles_are_upstreams(dim_head: int) -> None:
    angles = rotary_angles(dim_head, TEXT_LEN, FMAP)
    expected = reference_angles(dim_head, TEXT_LEN, FMAP)
    assert angles.shape == expected.shape == (SEQ_LEN, 3 * ((dim_head // 3) // 2 * 2))
    torch.testing.assert_close(angles.double(), expected, rtol=1e-6, atol=1e-6)


def test_rotary_needs_six_features_per_head() -> None:
    with pytest.raises(ValueError, match="^rotary_emb needs dim_head >= 6, got 5$"):
        rotary_angles(5, TEXT_LEN, FMAP)


def test_apply_rotary_rotates_feature_pairs_by_the_angles() -> None:
    dim_head = 20  # 18 rotated features (pairs i, i + 9), 2 passed through
    cos, sin, rot = rotary_tables(dim_head, TEXT_LEN, FMAP)
    angles = rotary_angles(dim_head, TEXT_LEN, FMAP).double()[:, : rot // 2]  # [n, 9]
    x = torch.randn(2, 3, SEQ_LEN, dim_head, dtype=torch.float64)
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    cos_a, sin_a = angles.cos(), angles.sin()
    expected = torch.cat((x1 * cos_a - x2 * sin_a, x2 * cos_a + x1 * sin_a, rest), dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos.double(), sin.double(), rot), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- token shift


def reference_shift(x: torch.Tensor, text_len: int, fmap: int) -> torch.Tensor:
    """``x [B, n, dim]`` from position 0, shifted one position at a time."""
    q = x.shape[-1] // 4
    out = x.clone()
    for p in range(x.shape[1]):
        if p < text_len:
            first = second = p - 1 if p > 0 else None
        else:
            row, col = divmod(p - text_len, fmap)
            first = p - fmap if row > 0 else None
            second = p - 1 if col > 0 else None
        out[:, p, :q] = x[:, first, :q] if first is not None else 0
        out[:, p, q : 2 * q] = x[:, second, q : 2 * q] if second is not None else 0
    return out


def test_token_shift_of_a_sequence_is_the_reference() -> None:
    shift = TokenShift(16, TEXT_LEN, FMAP)
    assert shift.index_a.shape == shift.index_b.shape == (SEQ_LEN,)
    assert shift.keep_a.shape == shift.keep_b.shape == (SEQ_LEN, 1)
    x = inputs(16)
    expected = reference_shift(x, TEXT_LEN, FMAP)
    assert torch.equal(shift(x, ForwardContext(0, None, None), None), expected)
    trained = x.clone().requires_grad_()
    assert torch.equal(shift(trained, ForwardContext(0, None, None), None), expected)


def test_token_shift_in_slices_through_the_cache_is_the_reference() -> None:
    shift = TokenShift(16, TEXT_LEN, FMAP)
    x = inputs(16)
    cache = BranchCache(shifted_inputs=x.new_zeros(2, SEQ_LEN + 1, 16))
    bounds = [0, 1, 4, 6, 10, 11, SEQ_LEN]
    parts = [shift(x[:, start:end], ForwardContext(start, None, None), cache)
             for start, end in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(parts, dim=1), reference_shift(x, TEXT_LEN, FMAP))


def test_gather_index_reads_the_shifted_features_from_a_flat_history() -> None:
    shift = TokenShift(16, TEXT_LEN, FMAP)
    x = inputs(16)
    history = torch.cat((x, x.new_zeros(2, 1, 16)), dim=1).flatten(1)  # [B, (n + 1) * dim]
    index = shift.gather_index(SEQ_LEN)  # [n, dim]
    gathered = history[:, index.flatten()].view(2, SEQ_LEN, 16)
    assert torch.equal(gathered, reference_shift(x, TEXT_LEN, FMAP))


def test_gather_index_is_built_on_the_tables_device() -> None:
    """On the meta device (standing in for a GPU), so that a table made on the CPU shows."""
    index = TokenShift(16, TEXT_LEN, FMAP).to("meta").gather_index(SEQ_LEN)
    assert index.device.type == "meta" and index.shape == (SEQ_LEN, 16)


def test_token_shift_keeps_the_dtype_and_needs_quarters() -> None:
    shift = TokenShift(16, TEXT_LEN, FMAP)
    x = inputs(16).bfloat16()
    out = shift(x, ForwardContext(0, None, None), None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference_shift(x, TEXT_LEN, FMAP))
    with pytest.raises(ValueError, match="^shift_tokens needs dim divisible by 4, got 30$"):
        TokenShift(30, TEXT_LEN, FMAP)


# ----------------------------------------------------------------------------- cached chunks


@pytest.mark.parametrize("masked", [False, True])
def test_a_sequence_in_chunks_through_the_cache_is_the_sequence_at_once(masked: bool) -> None:
    model = make(attn_types=("full", "axial_row", "axial_col", "conv_like"), depth=4).eval()
    x = inputs()
    mask = None
    if masked:
        mask = torch.ones(2, SEQ_LEN, dtype=torch.bool)
        mask[1, 2:4] = False
    with torch.no_grad():
        whole = model(x, key_padding_mask=mask)
        cache = model.new_cache(2, SEQ_LEN, x)
        bounds = [0, 1, 4, 9, 12, SEQ_LEN]
        parts = [model(x[:, start:end], offset=start, key_padding_mask=mask, cache=cache)
                 for start, end in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-12)
    assert cache[0].attn.kv.shape == (2, 2, 2, SEQ_LEN, 16)  # keys and values, rows, heads, positions, D
    assert cache[0].attn.shifted_inputs.shape == cache[0].ff.shifted_inputs.shape == (2, SEQ_LEN + 1, 32)
    assert cache[0].ff.kv is None
    assert not cache[0].attn.shifted_inputs[:, SEQ_LEN].any()


# ----------------------------------------------------------------------------- kernels


class Recording(SDPAKernel):
    """SDPA that records what it is asked and what it serves; refuses cached steps."""

    patterns = frozenset({"full", "axial_row", "axial_col"})

    def __init__(self, name: str, priorities: dict[str, int]) -> None:
        self.name, self.priorities = name, priorities
        self.asked: list[tuple] = []
        self.served: list[tuple[str, int]] = []

    def supports(self, pattern, device_type, dtype, needs_grad, decoding):
        self.asked.append((pattern, device_type, dtype, needs_grad, decoding))
        return super().supports(pattern, device_type, dtype, needs_grad, decoding) and not decoding

    def priority(self, pattern, device_type):
        return self.priorities.get(pattern, 0) if device_type == "cpu" else -1000

    def __call__(self, q, k, v, pattern, *, q_offset=0, key_padding_mask=None):
        self.served.append((pattern.kind, q.shape[-2]))
        return super().__call__(q, k, v, pattern, q_offset=q_offset, key_padding_mask=key_padding_mask)


@pytest.fixture
def recording():
    """Two attention kernels registered in-process: ``recording`` (first for axial_row under
    ``auto``) and ``low`` (last), shared instances."""
    kernels = {"recording": Recording("recording", {"axial_row": 1000}),
               "low": Recording("low", {"full": -1000, "axial_row": -1000, "axial_col": -1000})}

    class Plugin:
        @hookimpl
        def dalle_register_attention(self, register):
            for name, kernel in kernels.items():
                register(name, lambda kernel=kernel: kernel, description="records its calls")

    reset_plugins()
    get_plugin_manager().register(Plugin(), name="recording-kernels")
    yield kernels
    reset_plugins()


def test_a_named_kernel_is_asked_once_per_kind_of_call_and_sdpa_serves_what_it_refuses(recording) -> None:
    model = make(attn_kernel="recording").eval()
    kernel = recording["recording"]
    assert model.kernels.name == "recording" and model.kernels.fixed is kernel
    assert make().kernels.name == "auto"
    x = inputs()
    with torch.no_grad():
        cache = model.new_cache(2, SEQ_LEN, x)
        model(x[:, :1], cache=cache)  # a prefill from position 0 ...
        model(x[:, 1:4], offset=1, cache=cache)  # ... then queries after it, as a cached step's
        model(x[:, 4:], offset=4, cache=cache)
        model(x)
    kinds = [("full", "cpu", torch.float64, False, False), ("axial_row", "cpu", torch.float64, False, False),
             ("full", "cpu", torch.float64, False, True), ("axial_row", "cpu", torch.float64, False, True)]
    assert kernel.asked == kinds  # each kind once: the choice is kept
    assert kernel.served == [("full", 1), ("axial_row", 1), ("full", SEQ_LEN), ("axial_row", SEQ_LEN)]
    model.train()
    model(x).sum().backward()
    assert kernel.asked[4:] == [("full", "cpu", torch.float64, True, False),
                                ("axial_row", "cpu", torch.float64, True, False)]


def test_auto_takes_the_supporting_kernel_of_highest_priority(recording) -> None:
    model = make(attn_types=("full", "axial_row", "conv_like"), depth=3).eval()
    with torch.no_grad():
        model(inputs())
    assert recording["recording"].served == [("axial_row", SEQ_LEN)]  # its priority there: 1000
    assert recording["low"].served == []  # supports full and axial_row, but ranks last
    asked = {call[0] for call in recording["low"].asked}
    assert asked == {"full", "axial_row", "conv_like"}
    assert ("axial_row", "cpu", torch.float64, False, False) in recording["recording"].asked
    assert any(isinstance(k, Recording) for k in usable_attention_kernels())


def test_a_named_kernel_without_a_layers_pattern_is_an_error(recording) -> None:
    message = ("attn_kernel 'low' does not support attention type(s) ['conv_like', 'sparse']; it supports "
               "['axial_col', 'axial_row', 'full']; use attn_kernel='auto'")
    with pytest.raises(ValueError) as caught:
        make(attn_kernel="low", attn_types=("full", "conv_like", "sparse"), depth=3)
    assert str(caught.value) == message


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("option", ["attn_dropout", "ff_dropout"])
def test_dropout_reaches_its_branch_in_training_only(option: str) -> None:
    model = make(**{option: 0.5})
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 2 and all(m.p == 0.5 for m in dropouts)  # one per layer's branch
    x = inputs()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    assert torch.equal(model(x), make().eval()(x))  # the same weights without dropout


def test_shift_tokens_off_has_no_shift() -> None:
    shifted, plain = make(), make(shift_tokens=False)
    assert shifted.shift is not None and plain.shift is None
    plain.load_state_dict(shifted.state_dict())
    x = inputs()
    assert not torch.allclose(shifted(x), plain(x))


def test_layer_scale_starts_as_upstream_by_depth() -> None:
    model = make(depth=26, dim=8, heads=1, dim_head=8, attn_types=("full",), shift_tokens=False)
    expected = [0.1] * 18 + [1e-5] * 6 + [1e-6] * 2
    for branches in (model.attn_branches, model.ff_branches):
        assert [float(branch.scale[0].detach()) for branch in branches] == pytest.approx(expected, rel=1e-6)
        assert all(torch.equal(branch.scale, branch.scale[0].expand(8)) for branch in branches)


def test_sandwich_norm_normalizes_every_branch_output() -> None:
    model = make(sandwich_norm=True)
    outputs = []
    for branch in (*model.attn_branches, *model.ff_branches):
        branch.fn.register_forward_hook(lambda module, args, out: outputs.append(out))
    model(inputs())
    assert len(outputs) == 4
    for out in outputs:  # LayerNorm at init: zero mean, unit variance per token (less its eps)
        torch.testing.assert_close(out.mean(-1), torch.zeros_like(out[..., 0]), rtol=0, atol=1e-9)
        variance = out.var(-1, unbiased=False)
        torch.testing.assert_close(variance, torch.ones_like(variance), rtol=0, atol=1e-2)
    plain = make()
    plain(inputs())
    assert len(outputs) == 4  # no hooks there; and its branches are not normalized
    assert not any(isinstance(branch.fn.norm_out, torch.nn.LayerNorm) for branch in plain.attn_branches)


def test_activation_checkpointing_for_training_with_gradients_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = transformer_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "checkpoint", counting)
    checkpointed, plain = make(activation_checkpointing=True), make()
    x = inputs()
    checkpointed(x).square().sum().backward()
    assert len(calls) == 2 and all(call == {"use_reentrant": False} for call in calls)
    plain(x).square().sum().backward()
    for mine, theirs in zip(checkpointed.parameters(), plain.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)
    assert len(calls) == 2  # not for a model without it
    with torch.no_grad():
        checkpointed(x)
    checkpointed.eval()
    checkpointed(x)
    assert len(calls) == 2  # neither without gradients nor in eval mode


def test_rotary_tables_are_derived_not_saved() -> None:
    model = make()
    assert model.rotary_cos is not None and model.rotary_sin is not None
    assert not [key for key in model.state_dict() if "rotary" in key]


def test_prefill_of_the_last_position_runs_the_last_layer_for_it_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = make(depth=3, attn_types=("full",)).eval()
    calls = []
    real = Transformer._last_position_layer

    def counting(self, attn, ff, x, ctx, layer_cache):
        calls.append(attn is self.attn_branches[-1])
        return real(self, attn, ff, x, ctx, layer_cache)

    monkeypatch.setattr(Transformer, "_last_position_layer", counting)
    x = inputs()
    with torch.no_grad():
        last = model(x, cache=model.new_cache(2, SEQ_LEN, x), last_only=True)
        whole = model(x)
    assert calls == [True]
    torch.testing.assert_close(last, whole[:, -1:], rtol=0, atol=1e-12)
