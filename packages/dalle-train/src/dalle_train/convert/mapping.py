"""Upstream DALLE hyperparameters and state-dict keys -> this project's `DALLE`.

Both models compute the same function for every option mapped here; the differences are names
and shapes:

- ``text_emb.weight`` [Vt, d], ``image_emb.weight`` [Vi, d], ``text_pos_emb.weight`` [L + 1, d]:
  the same keys;
- ``image_pos_emb.weights_0`` / ``weights_1`` (axial-positional-embedding 0.2; ``weights.0`` /
  ``weights.1`` in 0.3) [1, f, 1, d] / [1, 1, f, d] -> ``image_row_emb.weight`` /
  ``image_col_emb.weight`` [f, d];
- ``<layer i, branch>.scale`` [1, 1, d] -> ``transformer.<attn|ff>_branches.i.scale`` [d];
- ``<layer i, branch>.fn.norm.*`` / ``.fn.norm_out.*`` -> ``...branches.i.fn.norm.*`` / ``.fn.norm_out.*``;
- ``<layer i, attn>.fn(.fn)*.to_qkv.weight`` [3 h D, d] and ``.to_out.0.*`` ->
  ``attn_branches.i.fn.fn.fn.to_qkv.weight`` and ``.to_out.0.*`` (q, k, v in the same order;
  with ``rotary_emb`` each head's features reordered, below);
- ``<layer i, ff>.fn(.fn)*.net.0.*`` [2 m, d] / ``.net.3.*`` [d, m] ->
  ``ff_branches.i.fn.fn.fn.proj_in.*`` / ``.proj_out.*`` (GEGLU: value half, then gate half);
- ``to_logits.0.*`` (LayerNorm) -> ``final_norm.*``;
- ``to_logits.1.weight`` [Vt + Vi, d] and ``.bias``: rows ``[:Vt]`` -> ``text_head.*``, rows
  ``[Vt:]`` -> ``image_head.*``; with ``share_input_output_emb`` the rows -> ``text_emb.weight`` /
  ``image_emb.weight`` and the bias -> ``text_head_bias`` / ``image_head_bias``, and upstream's
  ``text_emb.linear.*`` / ``image_emb.linear.*`` (the same tensors) are checked and dropped.

``<layer i, branch>`` is ``transformer.layers.layers.i.0`` (attention) / ``.i.1`` (feed-forward),
or ``transformer.layers.blocks.i.f.net`` / ``.i.g.net`` with ``reversible``; the ``fn.`` chain
before ``to_qkv`` varies with the wrappers (token shift, cache), so it is matched loosely.
``Vt = num_text_tokens + text_seq_len`` (a padding id per position, in both), ``L =
text_seq_len``, ``f`` the VAE's codes per side. Layers that share an attention or feed-forward
id hold the same tensors upstream and in this project.

``rotary_emb=True`` sets ``upstream_rotary=True`` (upstream rotates the attention values by
position as well as the queries and keys, and divides its text frequencies' exponents by
``dim_head // 3``). Upstream rotates the feature pairs ``(2i, 2i + 1)`` of a head, this project
the pairs ``(i, i + rot / 2)`` (``rot`` rotated features; the ``dim_head - rot`` after them are
not rotated): the rows of ``to_qkv.weight`` (q, k and v of every head) and the columns of
``to_out.0.weight`` (the rotated values of every head) are reordered by `rotary_feature_order`.
Upstream's ``transformer.pos_emb`` [1, seq_len + 1, rot] (the angles it saved) is checked against
the angles this project computes, then dropped.

Attention types: ``full``, ``axial_row`` and ``axial_col`` keep their names; upstream's
``conv_like`` (its 5 x 5 window ends at the query: rows and columns ``-4 .. 0``) becomes
``conv_like_trailing`` (this project's ``conv_like`` window is centred on the query). Refused, by
name: ``sparse`` (DeepSpeed's variable sparsity, with random blocks drawn when the model was
built; this project's ``sparse`` has none).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from dalle_train.errors import TrainError

#: upstream DALLE's keyword defaults (dalle_pytorch 1.6.6), for keywords a checkpoint left out
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "num_text_tokens": 10000,
    "text_seq_len": 256,
    "heads": 8,
    "dim_head": 64,
    "reversible": False,
    "attn_dropout": 0.0,
    "ff_dropout": 0.0,
    "attn_types": None,
    "loss_img_weight": 7,
    "stable": False,
    "sandwich_norm": False,
    "shift_tokens": True,
    "rotary_emb": True,
    "shared_attn_ids": None,
    "shared_ff_ids": None,
    "share_input_output_emb": False,
    "optimize_for_inference": False,
}
REQUIRED = ("dim", "depth")
#: accepted and without effect upstream (its Transformer never read ``sparse_attn``)
IGNORED = ("sparse_attn",)
#: upstream attention type -> this project's pattern computing the same function
MAPPED_ATTN_TYPES = {
    "full": "full",
    "axial_row": "axial_row",
    "axial_col": "axial_col",
    "conv_like": "conv_like_trailing",
}
REFUSED_ATTN_TYPES = {
    "sparse": "upstream's sparse layers are DeepSpeed block-sparse attention (variable sparsity) with "
    "random blocks drawn when the model was built; this project's sparse pattern has no random blocks",
}

#: upstream branch part -> this project's, below ``transformer.<attn|ff>_branches.<i>.``
_PARTS = {
    "scale": "scale",
    "fn.norm.weight": "fn.norm.weight",
    "fn.norm.bias": "fn.norm.bias",
    "fn.norm_out.weight": "fn.norm_out.weight",
    "fn.norm_out.bias": "fn.norm_out.bias",
    "to_qkv.weight": "fn.fn.fn.to_qkv.weight",
    "to_out.0.weight": "fn.fn.fn.to_out.0.weight",
    "to_out.0.bias": "fn.fn.fn.to_out.0.bias",
    "net.0.weight": "fn.fn.fn.proj_in.weight",
    "net.0.bias": "fn.fn.fn.proj_in.bias",
    "net.3.weight": "fn.fn.fn.proj_out.weight",
    "net.3.bias": "fn.fn.fn.proj_out.bias",
}
_BRANCH_KEY = re.compile(
    r"^transformer\.layers\.(?:layers\.(\d+)\.([01])|blocks\.(\d+)\.([fg])\.net)\."
    r"(scale|fn\.norm(?:_out)?\.(?:weight|bias)|fn(?:\.fn)+\.(?:to_qkv\.weight|to_out\.0\.(?:weight|bias)"
    r"|net\.[03]\.(?:weight|bias)))$"
)


def dalle_config(hparams: dict[str, Any], source: str) -> dict[str, Any]:
    """Upstream ``hparams`` -> this project's `DALLE` keywords (without ``vae``), every upstream
    default filled in; an option that cannot be mapped is a `TrainError` naming it."""
    known = {*UPSTREAM_DEFAULTS, *REQUIRED, *IGNORED}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise TrainError(
            f"{source}: unknown DALLE hparams {', '.join(unknown)}; upstream DALLE's are "
            f"{', '.join(sorted(known))}"
        )
    missing = [key for key in REQUIRED if key not in hparams]
    if missing:
        raise TrainError(f"{source}: hparams lack {', '.join(missing)}, which upstream's DALLE requires")
    config = {**UPSTREAM_DEFAULTS, **{k: v for k, v in hparams.items() if k not in IGNORED}}
    config["upstream_rotary"] = bool(config["rotary_emb"])
    attn_types = config["attn_types"] or ("full",)
    attn_types = (attn_types,) if isinstance(attn_types, str) else tuple(attn_types)
    for kind in attn_types:
        if kind in REFUSED_ATTN_TYPES:
            raise TrainError(
                f"{source}: attn_types {kind!r} cannot be converted: {REFUSED_ATTN_TYPES[kind]}; "
                f"convertible attn_types: {', '.join(MAPPED_ATTN_TYPES)}"
            )
        if kind not in MAPPED_ATTN_TYPES:
            raise TrainError(
                f"{source}: attn_types {kind!r} is not an upstream attention type; convertible: "
                f"{', '.join(MAPPED_ATTN_TYPES)}"
            )
    config["attn_types"] = [MAPPED_ATTN_TYPES[kind] for kind in attn_types]
    for key in ("shared_attn_ids", "shared_ff_ids"):
        if config[key] is not None:
            config[key] = list(config[key])
    return config


def branch_keys(weights: Iterable[str]) -> dict[str, str]:
    """Upstream transformer keys -> this project's (``transformer.attn_branches.0.scale``, ...);
    keys that are not transformer branch weights are left out."""
    mapped = {}
    for key in weights:
        match = _BRANCH_KEY.match(key)
        if match is None:
            continue
        layer = match[1] or match[3]
        branch = "attn" if (match[2] or match[4]) in ("0", "f") else "ff"
        part = match[5]
        tail = part if part in _PARTS else re.sub(r"^fn(?:\.fn)+\.", "", part)
        mapped[key] = f"transformer.{branch}_branches.{layer}.{_PARTS[tail]}"
    return mapped


def rotary_feature_order(dim_head: int, rot: int) -> Tensor:
    """For each feature of a head in this project's order, the upstream feature it is: ``[dim_head]``.

    Upstream rotates the pairs ``(2i, 2i + 1)`` of the first ``rot`` features (rotary-embedding-
    torch's interleaved ``rotate_half``), this project the pairs ``(i, i + rot / 2)``
    (`dalle_core.transformer.apply_rotary`), with the same angle for pair ``i``; the features
    after ``rot`` are not rotated and keep their places.
    """
    pairs = torch.arange(rot // 2)
    return torch.cat((2 * pairs, 2 * pairs + 1, torch.arange(rot, dim_head)))


def _reorder_heads(tensor: Tensor, dim: int, order: Tensor) -> Tensor:
    """``tensor`` whose dimension ``dim`` holds whole heads (``to_qkv.weight``'s ``3 h D`` rows,
    ``to_out.0.weight``'s ``h D`` columns) with each head's features taken in ``order [D]``."""
    return tensor.unflatten(dim, (-1, len(order))).index_select(dim + 1, order).flatten(dim, dim + 1)


def _check_rotary_angles(saved: Tensor, angles: Tensor, order: Tensor, source: str) -> None:
    """Upstream's ``transformer.pos_emb`` ``[1, seq_len + 1, rot]`` (the angles upstream's model
    loads with its weights, pairs interleaved) must be this project's ``angles [seq_len, rot]``
    (half-split; upstream's extra last position is never used): to half precision, as DeepSpeed
    fp16/bf16 checkpoints stored them."""
    seq_len, rot = angles.shape
    if saved.dim() != 3 or saved.shape[1] < seq_len or saved.shape[2] != rot:
        raise TrainError(
            f"{source}: transformer.pos_emb has shape {list(saved.shape)}, but the rotary angles of the "
            f"model its hparams describe have {rot} features for {seq_len} positions"
        )
    if not torch.allclose(saved[0, :seq_len, order[:rot]].float(), angles, rtol=2**-8, atol=1e-6):
        raise TrainError(
            f"{source}: transformer.pos_emb, the rotary angles upstream saved, differs from those of "
            f"upstream dalle-pytorch 1.6.6 with rotary-embedding-torch that this project computes (made "
            f"with another version of them?): its rotary_emb=True cannot be converted"
        )


def _to_half_split_rotary(
    out: dict[str, Tensor], saved_angles: Tensor | None, angles: Tensor, dim_head: int, source: str
) -> None:
    """Upstream's saved rotary angles (when there) checked against ``angles [seq_len, rot]``, and
    each head's features of the mapped ``out``'s ``to_qkv`` rows and ``to_out`` columns put in
    this project's order (`rotary_feature_order`), in place."""
    order = rotary_feature_order(dim_head, angles.shape[1])  # [D]
    if saved_angles is not None:
        _check_rotary_angles(saved_angles, angles, order, source)
    for key, tensor in out.items():
        if key.endswith(".to_qkv.weight"):
            out[key] = _reorder_heads(tensor, 0, order)  # rows [3 h D, d]
        elif key.endswith(".to_out.0.weight"):
            out[key] = _reorder_heads(tensor, 1, order)  # columns [d, h D]


def map_dalle_weights(
    weights: dict[str, Tensor],
    target: dict[str, Tensor],
    total_text_tokens: int,
    share_io: bool,
    source: str,
    *,
    dim_head: int,
    rotary_angles: Tensor | None = None,
) -> dict[str, Tensor]:
    """Upstream DALLE ``weights`` (its ``vae.*`` left out) -> a state dict for this project's
    model, whose own state dict (``vae.*`` left out) is ``target``: every target key filled, every
    upstream key used, every shape checked. ``rotary_angles [seq_len, rot]``: the model's rotary
    angles (`dalle_core.transformer.rotary_angles`) when it has ``rotary_emb``."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(new_key: str, tensor: Tensor, *old_keys: str) -> None:
        if new_key not in target:
            raise TrainError(
                f"{source}: {', '.join(old_keys)} has no place in the model its hparams describe "
                f"(this project's {new_key} does not exist there)"
            )
        if new_key in out and not torch.equal(out[new_key], tensor):
            raise TrainError(
                f"{source}: {', '.join(old_keys)} should hold the same tensor as another shared layer's "
                f"(this project's {new_key}) but does not: shared_attn_ids / shared_ff_ids do not fit "
                f"the weights"
            )
        out[new_key] = tensor
        used.update(old_keys)

    if rotary_angles is not None:
        used.add("transformer.pos_emb")  # upstream's rotary angles: checked below
    for old, new in branch_keys(weights).items():
        tensor = weights[old]
        put(new, tensor.reshape(-1) if new.endswith(".scale") else tensor, old)  # scale [1, 1, d] -> [d]
    for old, new in (
        ("text_pos_emb.weight", "text_pos_emb.weight"),
        ("to_logits.0.weight", "final_norm.weight"),
        ("to_logits.0.bias", "final_norm.bias"),
    ):
        if old in weights:
            put(new, weights[old], old)
    for index, new in ((0, "image_row_emb.weight"), (1, "image_col_emb.weight")):
        for old in (
            f"image_pos_emb.weights_{index}",
            f"image_pos_emb.weights.{index}",
        ):  # axial-positional-embedding 0.2 / 0.3
            if old in weights:
                emb = weights[old]  # [1, f, 1, d] (rows) or [1, 1, f, d] (columns)
                put(new, emb.reshape(-1, emb.shape[-1]), old)  # -> [f, d]
    head_w, head_b = weights.get("to_logits.1.weight"), weights.get("to_logits.1.bias")
    if head_w is not None and head_b is not None:  # [Vt + Vi, d], [Vt + Vi]
        vt = total_text_tokens
        old = ("to_logits.1.weight", "to_logits.1.bias")
        if share_io:
            put("text_emb.weight", head_w[:vt], *old)
            put("image_emb.weight", head_w[vt:], *old)
            put("text_head_bias", head_b[:vt], *old)
            put("image_head_bias", head_b[vt:], *old)
            for emb in ("text_emb", "image_emb"):  # upstream's SharedEmbedding: views of to_logits.1
                for part, whole in (("weight", head_w), ("bias", head_b)):
                    key = f"{emb}.linear.{part}"
                    if key in weights and not torch.equal(weights[key], whole):
                        raise TrainError(
                            f"{source}: {key} differs from to_logits.1.{part}, whose tensor it "
                            f"shares in upstream's model with share_input_output_emb"
                        )
                    used.add(key)
        else:
            put("text_head.weight", head_w[:vt], *old)
            put("image_head.weight", head_w[vt:], *old)
            put("text_head.bias", head_b[:vt], *old)
            put("image_head.bias", head_b[vt:], *old)
    if not share_io:
        for key in ("text_emb.weight", "image_emb.weight"):
            if key in weights:
                put(key, weights[key], key)
    unused = sorted(set(weights) - used)
    if unused:
        raise TrainError(
            f"{source}: weights {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} "
            f"have no place in the model its hparams describe"
        )
    missing = sorted(set(target) - set(out))
    if missing:
        raise TrainError(
            f"{source}: the weights lack what this project's {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''} would be converted from (see the "
            f"mapping in the dalle-train README)"
        )
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise TrainError(
                f"{source}: the weight for {key} has shape {list(tensor.shape)} but the model "
                f"its hparams describe needs {list(target[key].shape)}"
            )
    for keys in shared_groups(target):  # a shared module is listed under every layer that uses it
        differing = [key for key in keys[1:] if not torch.equal(out[key], out[keys[0]])]
        if differing:
            raise TrainError(
                f"{source}: this project's {keys[0]} and {differing[0]} are one tensor (shared_attn_ids / "
                f"shared_ff_ids of the hparams), but the upstream weights converted into them differ: the "
                f"hparams' sharing does not fit the weights"
            )
    if rotary_angles is not None:  # shapes checked: whole heads of dim_head features
        _to_half_split_rotary(out, weights.get("transformer.pos_emb"), rotary_angles, dim_head, source)
    return {key: tensor.to(target[key].dtype) for key, tensor in out.items()}


def shared_groups(state: dict[str, Tensor]) -> list[list[str]]:
    """Keys of ``state`` that name one tensor (the same memory, shape and strides), in groups
    of two or more, each in ``state``'s order."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        memory = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        groups.setdefault((*memory, tuple(tensor.shape), tensor.stride()), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]
