"""``dalle_train.convert.mapping`` on small hand-made inputs: upstream hparams -> this project's
DALLE keywords, upstream state-dict keys -> this project's, and the refusals, each naming the file,
the field and what to do. (test_convert_upstream.py converts real upstream models end to end.)"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dalle_train.convert.mapping import branch_keys, dalle_config, map_dalle_weights, rotary_feature_order
from dalle_train.errors import TrainError

SOURCE = "run/dalle.pt"
KNOWN = (
    "attn_dropout, attn_types, depth, dim, dim_head, ff_dropout, heads, loss_img_weight, num_text_tokens, "
    "optimize_for_inference, reversible, rotary_emb, sandwich_norm, share_input_output_emb, "
    "shared_attn_ids, shared_ff_ids, shift_tokens, sparse_attn, stable, text_seq_len"
)


def config_error(hparams: dict) -> str:
    with pytest.raises(TrainError) as caught:
        dalle_config(hparams, SOURCE)
    return str(caught.value)


def test_hparams_get_upstreams_defaults_for_what_they_leave_out() -> None:
    assert dalle_config({"dim": 16, "depth": 2}, SOURCE) == {
        "dim": 16,
        "depth": 2,
        "num_text_tokens": 10000,
        "text_seq_len": 256,
        "heads": 8,
        "dim_head": 64,
        "reversible": False,
        "attn_dropout": 0.0,
        "ff_dropout": 0.0,
        "attn_types": ["full"],
        "loss_img_weight": 7,
        "stable": False,
        "sandwich_norm": False,
        "shift_tokens": True,
        "rotary_emb": True,
        "upstream_rotary": True,
        "shared_attn_ids": None,
        "shared_ff_ids": None,
        "share_input_output_emb": False,
        "optimize_for_inference": False,
    }


def test_given_hparams_are_kept_and_sparse_attn_is_dropped() -> None:
    config = dalle_config(
        {"dim": 8, "depth": 3, "heads": 2, "rotary_emb": 0, "sparse_attn": True,
         "shared_attn_ids": ("a", "b"), "shared_ff_ids": (0, 0, 1)},
        SOURCE,
    )
    assert "sparse_attn" not in config  # accepted and without effect upstream
    assert config["heads"] == 2 and config["rotary_emb"] == 0 and config["upstream_rotary"] is False
    assert config["shared_attn_ids"] == ["a", "b"] and config["shared_ff_ids"] == [0, 0, 1]
    assert dalle_config({"dim": 8, "depth": 1, "rotary_emb": 1}, SOURCE)["upstream_rotary"] is True


@pytest.mark.parametrize(
    "attn_types, expected",
    [
        (None, ["full"]),
        ((), ["full"]),
        ("axial_col", ["axial_col"]),  # upstream casts a single name to a tuple
        ("conv_like", ["conv_like_trailing"]),
        (("full", "axial_row", "axial_col", "conv_like"),
         ["full", "axial_row", "axial_col", "conv_like_trailing"]),
        (["axial_row", "full"], ["axial_row", "full"]),
    ],
)
def test_attn_types_map_to_this_projects_patterns(attn_types, expected: list[str]) -> None:
    assert dalle_config({"dim": 8, "depth": 1, "attn_types": attn_types}, SOURCE)["attn_types"] == expected


def test_unknown_hparams_are_named_with_upstreams_own() -> None:
    assert config_error({"dim": 8, "depth": 1, "window": 3, "heads_dim": 4}) == (
        f"{SOURCE}: unknown DALLE hparams heads_dim, window; upstream DALLE's are {KNOWN}"
    )


def test_missing_required_hparams_are_named() -> None:
    assert config_error({"depth": 2}) == f"{SOURCE}: hparams lack dim, which upstream's DALLE requires"
    assert config_error({}) == f"{SOURCE}: hparams lack dim, depth, which upstream's DALLE requires"


def test_attn_types_that_cannot_be_converted_are_refused_by_name() -> None:
    assert config_error({"dim": 8, "depth": 2, "attn_types": ("full", "sparse")}) == (
        f"{SOURCE}: attn_types 'sparse' cannot be converted: upstream's sparse layers are DeepSpeed "
        "block-sparse attention (variable sparsity) with random blocks drawn when the model was built; this "
        "project's sparse pattern has no random blocks; convertible attn_types: full, axial_row, axial_col, "
        "conv_like"
    )
    assert config_error({"dim": 8, "depth": 2, "attn_types": "conv_like_trailing"}) == (
        f"{SOURCE}: attn_types 'conv_like_trailing' is not an upstream attention type; convertible: full, "
        "axial_row, axial_col, conv_like"
    )


def test_branch_keys_of_both_layouts_and_any_wrapper_chain() -> None:
    keys = [
        "transformer.layers.layers.0.0.scale",
        "transformer.layers.layers.0.0.fn.norm.weight",
        "transformer.layers.layers.0.0.fn.norm_out.bias",
        "transformer.layers.layers.0.0.fn.fn.to_qkv.weight",
        "transformer.layers.layers.0.0.fn.fn.fn.fn.to_out.0.weight",
        "transformer.layers.layers.0.0.fn.fn.to_out.0.bias",
        "transformer.layers.layers.12.1.scale",
        "transformer.layers.layers.12.1.fn.norm.bias",
        "transformer.layers.layers.12.1.fn.norm_out.weight",
        "transformer.layers.layers.12.1.fn.fn.net.0.weight",
        "transformer.layers.layers.12.1.fn.fn.fn.net.3.bias",
        "transformer.layers.blocks.3.f.net.scale",
        "transformer.layers.blocks.3.f.net.fn.fn.to_qkv.weight",
        "transformer.layers.blocks.3.g.net.fn.norm.weight",
        "transformer.layers.blocks.3.g.net.fn.fn.net.0.bias",
        "transformer.layers.blocks.3.g.net.fn.fn.net.3.weight",
        # not branch weights: left out
        "transformer.pos_emb",
        "text_emb.weight",
        "transformer.layers.layers.0.2.scale",
        "transformer.layers.layers.0.0.scale.extra",
        "transformer.layers.layers.0.0.to_qkv.weight",
        "transformer.layers.layers.0.1.fn.fn.net.1.weight",
        "transformer.layers.blocks.3.h.net.scale",
        "x.transformer.layers.layers.0.0.scale",
    ]
    a0, f12, a3, f3 = (
        "transformer.attn_branches.0.",
        "transformer.ff_branches.12.",
        "transformer.attn_branches.3.",
        "transformer.ff_branches.3.",
    )
    assert branch_keys(keys) == {
        keys[0]: a0 + "scale",
        keys[1]: a0 + "fn.norm.weight",
        keys[2]: a0 + "fn.norm_out.bias",
        keys[3]: a0 + "fn.fn.fn.to_qkv.weight",
        keys[4]: a0 + "fn.fn.fn.to_out.0.weight",
        keys[5]: a0 + "fn.fn.fn.to_out.0.bias",
        keys[6]: f12 + "scale",
        keys[7]: f12 + "fn.norm.bias",
        keys[8]: f12 + "fn.norm_out.weight",
        keys[9]: f12 + "fn.fn.fn.proj_in.weight",
        keys[10]: f12 + "fn.fn.fn.proj_out.bias",
        keys[11]: a3 + "scale",
        keys[12]: a3 + "fn.fn.fn.to_qkv.weight",
        keys[13]: f3 + "fn.norm.weight",
        keys[14]: f3 + "fn.fn.fn.proj_in.bias",
        keys[15]: f3 + "fn.fn.fn.proj_out.weight",
    }


def test_rotary_feature_order_takes_upstreams_interleaved_pairs_apart() -> None:
    assert rotary_feature_order(4, 4).tolist() == [0, 2, 1, 3]
    assert rotary_feature_order(10, 6).tolist() == [0, 2, 4, 1, 3, 5, 6, 7, 8, 9]
    assert rotary_feature_order(3, 0).tolist() == [0, 1, 2]


# A one-layer model: d features, Vt text ids (padding ids included), Vi image codes, a text of L
# positions, an f x f grid, one head of D features, a feed-forward of m hidden features.
D, VT, VI, L, F, HEADS, DH, M = 4, 3, 2, 2, 2, 2, 4, 6
A0, F0 = "transformer.attn_branches.0.", "transformer.ff_branches.0."
U0, U1 = "transformer.layers.layers.0.0.", "transformer.layers.layers.0.1."


def target(share_io: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """This project's state dict (its VAE left out): the keys, shapes and dtypes that matter."""
    shapes = {
        "text_pos_emb.weight": (L + 1, D),
        "image_row_emb.weight": (F, D),
        "image_col_emb.weight": (F, D),
        "final_norm.weight": (D,),
        "final_norm.bias": (D,),
        "text_emb.weight": (VT, D),
        "image_emb.weight": (VI, D),
        A0 + "scale": (D,),
        A0 + "fn.norm.weight": (D,),
        A0 + "fn.norm.bias": (D,),
        A0 + "fn.fn.fn.to_qkv.weight": (3 * HEADS * DH, D),
        A0 + "fn.fn.fn.to_out.0.weight": (D, HEADS * DH),
        A0 + "fn.fn.fn.to_out.0.bias": (D,),
        F0 + "scale": (D,),
        F0 + "fn.norm.weight": (D,),
        F0 + "fn.norm.bias": (D,),
        F0 + "fn.fn.fn.proj_in.weight": (2 * M, D),
        F0 + "fn.fn.fn.proj_in.bias": (2 * M,),
        F0 + "fn.fn.fn.proj_out.weight": (D, M),
        F0 + "fn.fn.fn.proj_out.bias": (D,),
    }
    if share_io:
        shapes.update(text_head_bias=(VT,), image_head_bias=(VI,))
    else:
        shapes.update({"text_head.weight": (VT, D), "text_head.bias": (VT,), "image_head.weight": (VI, D),
                       "image_head.bias": (VI,)})
    return {key: torch.zeros(shape, dtype=dtype) for key, shape in shapes.items()}


def upstream(share_io: bool = False, axial: str = "weights_{}") -> dict[str, Tensor]:
    """Upstream DALLE's state dict for the same model (its VAE left out), every value distinct."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator)

    weights = {
        "text_pos_emb.weight": draw(L + 1, D),
        "image_pos_emb." + axial.format(0): draw(1, F, 1, D),
        "image_pos_emb." + axial.format(1): draw(1, 1, F, D),
        "to_logits.0.weight": draw(D),
        "to_logits.0.bias": draw(D),
        "to_logits.1.weight": draw(VT + VI, D),
        "to_logits.1.bias": draw(VT + VI),
        U0 + "scale": draw(1, 1, D),
        U0 + "fn.norm.weight": draw(D),
        U0 + "fn.norm.bias": draw(D),
        U0 + "fn.fn.to_qkv.weight": draw(3 * HEADS * DH, D),
        U0 + "fn.fn.to_out.0.weight": draw(D, HEADS * DH),
        U0 + "fn.fn.to_out.0.bias": draw(D),
        U1 + "scale": draw(1, 1, D),
        U1 + "fn.norm.weight": draw(D),
        U1 + "fn.norm.bias": draw(D),
        U1 + "fn.fn.net.0.weight": draw(2 * M, D),
        U1 + "fn.fn.net.0.bias": draw(2 * M),
        U1 + "fn.fn.net.3.weight": draw(D, M),
        U1 + "fn.fn.net.3.bias": draw(D),
    }
    if share_io:  # upstream's SharedEmbedding: the output layer's tensors under the embeddings' names
        for emb in ("text_emb", "image_emb"):
            weights[f"{emb}.linear.weight"] = weights["to_logits.1.weight"]
            weights[f"{emb}.linear.bias"] = weights["to_logits.1.bias"]
    else:
        weights.update({"text_emb.weight": draw(VT, D), "image_emb.weight": draw(VI, D)})
    return weights


def mapped(weights: dict[str, Tensor], into: dict[str, Tensor], share_io: bool = False, **kwargs) -> dict:
    return map_dalle_weights(weights, into, VT, share_io, SOURCE, dim_head=DH, **kwargs)


def expected_common(weights: dict[str, Tensor], axial: str = "weights_{}") -> dict[str, Tensor]:
    return {
        "text_pos_emb.weight": weights["text_pos_emb.weight"],
        "image_row_emb.weight": weights["image_pos_emb." + axial.format(0)][0, :, 0],
        "image_col_emb.weight": weights["image_pos_emb." + axial.format(1)][0, 0],
        "final_norm.weight": weights["to_logits.0.weight"],
        "final_norm.bias": weights["to_logits.0.bias"],
        A0 + "scale": weights[U0 + "scale"][0, 0],
        A0 + "fn.norm.weight": weights[U0 + "fn.norm.weight"],
        A0 + "fn.norm.bias": weights[U0 + "fn.norm.bias"],
        A0 + "fn.fn.fn.to_qkv.weight": weights[U0 + "fn.fn.to_qkv.weight"],
        A0 + "fn.fn.fn.to_out.0.weight": weights[U0 + "fn.fn.to_out.0.weight"],
        A0 + "fn.fn.fn.to_out.0.bias": weights[U0 + "fn.fn.to_out.0.bias"],
        F0 + "scale": weights[U1 + "scale"][0, 0],
        F0 + "fn.norm.weight": weights[U1 + "fn.norm.weight"],
        F0 + "fn.norm.bias": weights[U1 + "fn.norm.bias"],
        F0 + "fn.fn.fn.proj_in.weight": weights[U1 + "fn.fn.net.0.weight"],
        F0 + "fn.fn.fn.proj_in.bias": weights[U1 + "fn.fn.net.0.bias"],
        F0 + "fn.fn.fn.proj_out.weight": weights[U1 + "fn.fn.net.3.weight"],
        F0 + "fn.fn.fn.proj_out.bias": weights[U1 + "fn.fn.net.3.bias"],
    }


def assert_same(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor.float()), key


@pytest.mark.parametrize("axial", ["weights_{}", "weights.{}"])  # axial-positional-embedding 0.2 / 0.3
def test_every_upstream_weight_lands_in_its_place(axial: str) -> None:
    weights = upstream(axial=axial)
    head_w, head_b = weights["to_logits.1.weight"], weights["to_logits.1.bias"]
    assert_same(mapped(weights, target()), {
        **expected_common(weights, axial),
        "text_emb.weight": weights["text_emb.weight"],
        "image_emb.weight": weights["image_emb.weight"],
        "text_head.weight": head_w[:VT],
        "image_head.weight": head_w[VT:],
        "text_head.bias": head_b[:VT],
        "image_head.bias": head_b[VT:],
    })


def test_shared_input_output_embeddings_take_the_output_layers_rows() -> None:
    weights = upstream(share_io=True)
    head_w, head_b = weights["to_logits.1.weight"], weights["to_logits.1.bias"]
    assert_same(mapped(weights, target(share_io=True), share_io=True), {
        **expected_common(weights),
        "text_emb.weight": head_w[:VT],
        "image_emb.weight": head_w[VT:],
        "text_head_bias": head_b[:VT],
        "image_head_bias": head_b[VT:],
    })


@pytest.mark.parametrize("key", ["text_emb.linear.weight", "image_emb.linear.bias"])
def test_a_shared_embedding_that_is_not_the_output_layer_is_refused(key: str) -> None:
    weights = upstream(share_io=True)
    weights[key] = weights[key] + 1
    part = key.rsplit(".", 1)[1]
    with pytest.raises(TrainError) as caught:
        mapped(weights, target(share_io=True), share_io=True)
    assert str(caught.value) == (
        f"{SOURCE}: {key} differs from to_logits.1.{part}, whose tensor it shares in upstream's model "
        "with share_input_output_emb"
    )


def test_weights_are_given_the_models_dtype() -> None:  # e.g. a DeepSpeed fp16 checkpoint
    weights = {key: value.half() for key, value in upstream().items()}
    out = mapped(weights, target(dtype=torch.float64))
    assert {tensor.dtype for tensor in out.values()} == {torch.float64}
    assert torch.equal(out["text_emb.weight"], weights["text_emb.weight"].double())


def refusal(weights: dict[str, Tensor], into: dict[str, Tensor], share_io: bool = False, **kwargs) -> str:
    with pytest.raises(TrainError) as caught:
        mapped(weights, into, share_io, **kwargs)
    return str(caught.value)


def test_a_weight_without_a_place_in_the_model_is_named() -> None:
    weights = upstream()
    weights["transformer.layers.layers.1.0.scale"] = torch.ones(1, 1, D)  # a second layer
    assert refusal(weights, target()) == (
        f"{SOURCE}: transformer.layers.layers.1.0.scale has no place in the model its hparams describe "
        "(this project's transformer.attn_branches.1.scale does not exist there)"
    )
    assert refusal(upstream(share_io=True), target(), share_io=True) == (  # a model without shared rows
        f"{SOURCE}: to_logits.1.weight, to_logits.1.bias has no place in the model its hparams describe "
        "(this project's text_head_bias does not exist there)"
    )
    assert refusal(upstream(), target(share_io=True)) == (  # and the other way round
        f"{SOURCE}: to_logits.1.weight, to_logits.1.bias has no place in the model its hparams describe "
        "(this project's text_head.weight does not exist there)"
    )


def test_two_weights_for_one_place_must_be_the_same_tensor() -> None:
    weights = upstream()
    same = U0 + "fn.fn.fn.to_qkv.weight"  # a longer wrapper chain of the same layer's attention
    weights[same] = weights[U0 + "fn.fn.to_qkv.weight"].clone()
    assert torch.equal(mapped(weights, target())[A0 + "fn.fn.fn.to_qkv.weight"], weights[same])
    weights[same] = weights[same] + 1
    assert refusal(weights, target()) == (
        f"{SOURCE}: {same} should hold the same tensor as another shared layer's (this project's "
        f"{A0}fn.fn.fn.to_qkv.weight) but does not: shared_attn_ids / shared_ff_ids do not fit the weights"
    )


#: (how many keys, how a message lists them): eight at most, then " ..."
EIGHT = ", ".join(f"extra.{i}" for i in range(8))
EIGHT_AT_MOST = [(1, "extra.0"), (8, EIGHT), (9, EIGHT + " ...")]


@pytest.mark.parametrize("count, listed", EIGHT_AT_MOST)
def test_unused_weights_are_named_eight_at_most(count: int, listed: str) -> None:
    weights = {**upstream(), **{f"extra.{i}": torch.zeros(1) for i in range(count)}}
    assert refusal(weights, target()) == (
        f"{SOURCE}: weights {listed} have no place in the model its hparams describe"
    )


def test_a_head_without_its_bias_is_not_converted() -> None:
    weights = upstream()
    del weights["to_logits.1.bias"]
    assert refusal(weights, target()) == (
        f"{SOURCE}: weights to_logits.1.weight have no place in the model its hparams describe"
    )


@pytest.mark.parametrize("count, listed", EIGHT_AT_MOST)
def test_model_weights_the_file_lacks_are_named_eight_at_most(count: int, listed: str) -> None:
    into = {**target(), **{f"extra.{i}": torch.zeros(1) for i in range(count)}}
    assert refusal(upstream(), into) == (
        f"{SOURCE}: the weights lack what this project's {listed} would be converted from (see the mapping "
        "in the dalle-train README)"
    )


def test_a_weight_of_another_shape_is_named_with_both_shapes() -> None:
    weights = upstream()
    weights["text_emb.weight"] = torch.zeros(VT + 1, D)
    assert refusal(weights, target()) == (
        f"{SOURCE}: the weight for text_emb.weight has shape [4, 4] but the model its hparams describe needs "
        "[3, 4]"
    )


# rotary_emb: one head of DH = 4 features, all rotated (rot = 4): upstream's pairs (0, 1), (2, 3)
# are this project's (0, 2), (1, 3), so each head's features are taken in the order 0, 2, 1, 3.
ROT_ORDER = [0, 2, 1, 3]


def angles_of(seq_len: int = 5) -> Tensor:
    """Rotary angles [seq_len, rot] as this project computes them (half-split), all different; one
    so small that fp16 holds it only to about 3e-8 (a subnormal), well within the absolute 1e-6."""
    angles = torch.arange(1, seq_len * DH + 1, dtype=torch.float32).reshape(seq_len, DH) * 0.37
    angles[0, 1] = 1.04e-6
    return angles


def saved_angles(angles: Tensor, extra: int = 1) -> Tensor:
    """Upstream's ``transformer.pos_emb`` [1, seq_len + extra, rot]: the same angles, pairs interleaved."""
    saved = torch.full((1, angles.shape[0] + extra, angles.shape[1]), 99.0)
    saved[0, : angles.shape[0], ROT_ORDER] = angles
    return saved


def test_rotary_heads_are_put_in_this_projects_feature_order() -> None:
    weights = upstream()
    angles = angles_of()
    out = mapped({**weights, "transformer.pos_emb": saved_angles(angles)}, target(), rotary_angles=angles)
    qkv, to_out = weights[U0 + "fn.fn.to_qkv.weight"], weights[U0 + "fn.fn.to_out.0.weight"]
    rows = [block * DH + i for block in range(3 * HEADS) for i in ROT_ORDER]  # q, k, v of each head
    assert torch.equal(out[A0 + "fn.fn.fn.to_qkv.weight"], qkv[rows])
    assert torch.equal(out[A0 + "fn.fn.fn.to_out.0.weight"], to_out[:, rows[: HEADS * DH]])
    assert torch.equal(out[F0 + "fn.fn.fn.proj_in.weight"], weights[U1 + "fn.fn.net.0.weight"])  # untouched
    assert "transformer.pos_emb" not in out
    # without upstream's saved angles (not in every file) the heads are reordered all the same
    again = mapped(weights, target(), rotary_angles=angles)
    assert torch.equal(again[A0 + "fn.fn.fn.to_qkv.weight"], qkv[rows])


def test_saved_rotary_angles_are_compared_to_half_precision() -> None:
    angles = angles_of()
    for dtype in (torch.bfloat16, torch.float16):  # as DeepSpeed's fp16 / bf16 checkpoints store them
        mapped({**upstream(), "transformer.pos_emb": saved_angles(angles).to(dtype)}, target(),
               rotary_angles=angles)
    # only the positions the model has are compared (upstream saves one more)
    mapped({**upstream(), "transformer.pos_emb": saved_angles(angles, extra=0)}, target(),
           rotary_angles=angles)
    other = angles.clone()
    other[3, 1] *= 1 + 2**-7
    weights = {**upstream(), "transformer.pos_emb": saved_angles(other)}
    assert refusal(weights, target(), rotary_angles=angles) == (
        f"{SOURCE}: transformer.pos_emb, the rotary angles upstream saved, differs from those of upstream "
        "dalle-pytorch 1.6.6 with rotary-embedding-torch that this project computes (made with another "
        "version of them?): its rotary_emb=True cannot be converted"
    )


@pytest.mark.parametrize("shape", [(6, 4), (1, 4, 4), (1, 6, 3), (1, 6, 5), (2, 6, 4, 1)])
def test_saved_rotary_angles_of_another_shape_are_refused(shape: tuple[int, ...]) -> None:
    angles = angles_of()  # 5 positions, 4 features
    saved = torch.zeros(shape)
    assert refusal({**upstream(), "transformer.pos_emb": saved}, target(), rotary_angles=angles) == (
        f"{SOURCE}: transformer.pos_emb has shape {list(shape)}, but the rotary angles of the model its "
        "hparams describe have 4 features for 5 positions"
    )


def test_saved_rotary_angles_of_a_model_without_rotary_are_refused() -> None:
    weights = {**upstream(), "transformer.pos_emb": saved_angles(angles_of())}
    assert refusal(weights, target()) == (
        f"{SOURCE}: weights transformer.pos_emb have no place in the model its hparams describe"
    )
