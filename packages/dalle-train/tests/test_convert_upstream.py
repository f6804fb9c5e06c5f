"""``dalle-train convert``: upstream (lucidrains' dalle-pytorch) checkpoints made with upstream's own
classes, saved as its scripts save them, converted through the command line, then compared: the
same text and image inputs give the same logits (fp32, atol 1e-5) and loss, the same images
give the same codes. Options that cannot be converted exactly are refused by name.

Needs the real ``dalle_pytorch`` (see upstream_files.py); skipped when it is not installed.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from upstream_files import (
    UPSTREAM_VERSION,
    import_upstream,
    randomize,
    save_dalle_pt,
    save_deepspeed_dir,
    save_vae_pt,
)

from dalle_core import DALLE, DiscreteVAE
from dalle_core.plugins import registry, reset_plugins
from dalle_train.cli import main

upstream = import_upstream()
pytestmark = pytest.mark.skipif(
    upstream is None,
    reason="dalle_pytorch (the upstream project, pip install --no-deps dalle-pytorch==1.6.6 "
    "and its small dependencies) is not installed",
)

ATOL = 1e-5  # fp32: the two models add the same terms in other orders
VAE_PARAMS = {
    "image_size": 16,
    "num_tokens": 32,
    "codebook_dim": 16,
    "num_layers": 2,
    "hidden_dim": 8,
    "num_resnet_blocks": 1,
    "channels": 3,
}
BASE = {
    "dim": 16,
    "num_text_tokens": 50,
    "text_seq_len": 6,
    "depth": 3,
    "heads": 2,
    "dim_head": 8,
    "rotary_emb": False,
    "shift_tokens": False,
}

#: upstream DALLE option sets, each converted and compared
OPTION_SETS = {
    "train_dalle_defaults": {},
    "shift_tokens": {"shift_tokens": True},
    "stable": {"stable": True},
    "sandwich_norm": {"sandwich_norm": True},
    "share_input_output_emb": {"share_input_output_emb": True},
    "axial_types": {"attn_types": ("full", "axial_row", "axial_col")},
    "axial_optimize_for_inference": {
        "attn_types": ("axial_row", "axial_col"),
        "optimize_for_inference": True,
    },
    "shared_ids": {
        "attn_types": ("full", "axial_row", "full"),
        "shared_attn_ids": (0, 1, 0),
        "shared_ff_ids": (0, 0, 1),
    },
    "shared_ids_as_train_dalle_strings": {
        "shared_attn_ids": ("a", "a", "b"),
        "shared_ff_ids": ("x", "y", "x"),
    },
    "reversible": {"reversible": True},
    "dropouts_and_loss_weight": {"attn_dropout": 0.1, "ff_dropout": 0.2, "loss_img_weight": 3},
    "everything": {
        "shift_tokens": True,
        "stable": True,
        "sandwich_norm": True,
        "share_input_output_emb": True,
        "reversible": True,
        "attn_types": ("full", "axial_row", "axial_col"),
        "shared_attn_ids": (0, 1, 2),
        "shared_ff_ids": (0, 0, 1),
    },
    # rotary alone: rot = 3 * (dim_head // 3 // 2 * 2) of dim_head features rotated; an odd
    # dim_head // 3 of 5 or more gives upstream's own text frequencies (upstream's rotary-embedding-
    # torch 0.3 cannot build dim_head // 3 == 2: it divides by dim - 2)
    "rotary_dim_head_10": {"rotary_emb": True, "dim_head": 10},  # 3 (odd, one frequency): 6 of 10
    "rotary_dim_head_12": {"rotary_emb": True, "dim_head": 12},  # 4 (even): 12 of 12
    "rotary_dim_head_14": {"rotary_emb": True, "dim_head": 14},  # 4 (even): 12 of 14
    "rotary_dim_head_16": {"rotary_emb": True, "dim_head": 16},  # 5 (odd): 12 of 16
    "rotary_shift_tokens": {"rotary_emb": True, "dim_head": 16, "shift_tokens": True},
    "rotary_sandwich_norm": {"rotary_emb": True, "dim_head": 14, "sandwich_norm": True},
    "rotary_reversible": {"rotary_emb": True, "dim_head": 16, "reversible": True},
    "rotary_axial_types": {
        "rotary_emb": True,
        "dim_head": 16,
        "attn_types": ("full", "axial_row", "axial_col"),
    },
    "rotary_everything": {
        "rotary_emb": True,
        "dim_head": 16,
        "shift_tokens": True,
        "stable": True,
        "sandwich_norm": True,
        "share_input_output_emb": True,
        "reversible": True,
        "attn_types": ("full", "axial_row", "full"),
        "shared_attn_ids": (0, 1, 0),
        "shared_ff_ids": (0, 0, 1),
    },
    # upstream DALLE's own defaults: rotary, token shift, dim_head 64 (21: odd, 60 of 64 rotated)
    "upstream_dalle_defaults": {"rotary_emb": True, "shift_tokens": True, "dim_head": 64},
}


def upstream_dalle(options: dict[str, Any], seed: int = 0, vae_params: dict[str, Any] = VAE_PARAMS):
    """(upstream DALLE with a DiscreteVAE, its hparams as train_dalle.py would save them)."""
    torch.manual_seed(seed)
    vae = upstream.DiscreteVAE(**vae_params)
    hparams = {**BASE, **options}
    dalle = upstream.DALLE(vae=vae, **hparams)
    randomize(dalle, seed)
    return dalle.eval(), hparams


def inputs(dalle, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids with padding (0) at the end of some rows, and every image code."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 50, (batch, BASE["text_seq_len"]), generator=generator)
    text[0, 4:] = 0
    text[1, 1:] = 0
    codes = torch.randint(0, VAE_PARAMS["num_tokens"], (batch, dalle.image_seq_len), generator=generator)
    return text, codes


def convert(path: Path, out: Path, *flags: str) -> int:
    return main(["convert", str(path), str(out), *flags])


def assert_same_logits(theirs, ours: DALLE, seed: int = 1) -> None:
    text, codes = inputs(theirs, seed=seed)
    with torch.no_grad():
        for image in (codes, codes[:, :5], None):  # full, partial, text only
            expected = theirs(text.clone(), image.clone() if image is not None else None)
            got = ours(text.clone(), image)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        loss_theirs = theirs(text.clone(), codes.clone(), return_loss=True)
        loss_ours = ours(text.clone(), codes, return_loss=True)
        torch.testing.assert_close(loss_ours, loss_theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_every_option_set_gives_upstreams_logits(name: str, tmp_path: Path) -> None:
    theirs, hparams = upstream_dalle(OPTION_SETS[name])
    path = save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS)
    assert convert(path, tmp_path / "out") == 0
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    assert_same_logits(theirs, ours)


def test_images_give_upstreams_codes_and_logits(tmp_path: Path) -> None:
    theirs, hparams = upstream_dalle({"shift_tokens": True})
    convert(save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS), tmp_path / "out")
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected_codes = theirs.vae.get_codebook_indices(images)
    assert torch.equal(ours.vae.get_codebook_indices(images), expected_codes)
    assert len(set(expected_codes.flatten().tolist())) > 1  # a real comparison, not a constant
    text, _ = inputs(theirs, batch=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(text, images), theirs(text.clone(), images), atol=ATOL, rtol=0)


def test_converted_checkpoint_records_what_it_came_from_and_says_what_is_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({})
    convert(save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS, epoch=11), tmp_path / "out")
    said = capsys.readouterr().out
    assert "opt_state, scheduler_state dropped" in said
    assert "no tokenizer saved" in said  # 50 text ids: not upstream's default BPE
    record = json.loads((tmp_path / "out" / "upstream.json").read_text())
    assert record["epoch"] == 11 and record["upstream_version"] == UPSTREAM_VERSION
    assert record["vae_class_name"] == "DiscreteVAE" and record["not_converted"] == [
        "opt_state",
        "scheduler_state",
    ]


def test_vae_pt_gives_upstreams_codes(tmp_path: Path) -> None:
    torch.manual_seed(3)
    theirs = upstream.DiscreteVAE(**VAE_PARAMS).eval()
    path = save_vae_pt(tmp_path / "vae.pt", theirs, VAE_PARAMS)
    assert convert(path, tmp_path / "vae") == 0
    ours = DiscreteVAE.from_pretrained(tmp_path / "vae")
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours.get_codebook_indices(images), theirs.get_codebook_indices(images))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepspeed_directory_is_consolidated(dtype: torch.dtype, tmp_path: Path) -> None:
    theirs, hparams = upstream_dalle({"shift_tokens": True, "attn_types": ("full", "axial_row")})
    directory = save_deepspeed_dir(tmp_path / "dalle-ds-cp", theirs, hparams, VAE_PARAMS, dtype=dtype)
    assert convert(directory, tmp_path / "out") == 0
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    if dtype == torch.float32:
        assert_same_logits(theirs, ours)
    else:  # the weights as trained in bf16: the model equals upstream's with those weights
        theirs.load_state_dict(
            {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in theirs.state_dict().items()}
        )
        assert_same_logits(theirs, ours)


def test_deepspeed_zero3_is_refused_naming_zero_to_fp32(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({})
    directory = save_deepspeed_dir(tmp_path / "dalle-ds-cp", theirs, hparams, VAE_PARAMS, stage=3)
    assert convert(directory, tmp_path / "out") == 2
    assert "zero_to_fp32.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_deepspeed_model_parallel_shards_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    theirs, hparams = upstream_dalle({})
    directory = save_deepspeed_dir(tmp_path / "dalle-ds-cp", theirs, hparams, VAE_PARAMS)
    folder = directory / "global_step7"
    (folder / "mp_rank_01_model_states.pt").write_bytes((folder / "mp_rank_00_model_states.pt").read_bytes())
    assert convert(directory, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "mp_rank_01" in err and "only one model rank" in err
    assert not (tmp_path / "out").exists()


def test_deepspeed_aux_file_alone_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    theirs, hparams = upstream_dalle({})
    directory = save_deepspeed_dir(tmp_path / "dalle-ds-cp", theirs, hparams, VAE_PARAMS)
    assert convert(directory / "auxiliary.pt", tmp_path / "out") == 2
    assert "DeepSpeed" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["rotary_dim_head_16", "rotary_everything", "upstream_dalle_defaults"])
def test_greedy_generation_gives_upstreams_codes(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs, hparams = upstream_dalle(OPTION_SETS[name])
    convert(save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS), tmp_path / "out")
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    assert ours.config["upstream_rotary"] is True
    text, _ = inputs(theirs)
    # upstream's generate_images made greedy (its Gumbel-max draw -> argmax) and returning the codes
    monkeypatch.setattr(
        upstream.dalle_pytorch, "gumbel_sample", lambda t, temperature, dim: t.argmax(dim=dim)
    )
    monkeypatch.setattr(theirs.vae, "decode", lambda codes: codes)
    expected = theirs.generate_images(text.clone())
    assert len(set(expected.flatten().tolist())) > 1  # a real comparison, not a constant
    for use_cache in (True, False):
        assert torch.equal(ours.generate_image_codes(text, temperature=0, use_cache=use_cache), expected)


def test_rotary_angles_of_another_upstream_version_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({"rotary_emb": True, "dim_head": 16})
    with torch.no_grad():  # as rotary-embedding-torch's earlier pixel frequencies (logspace) would be
        theirs.transformer.pos_emb[..., 4:] *= 1.1
    assert convert(save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "transformer.pos_emb" in err and "dalle.pt" in err
    assert not (tmp_path / "out").exists()


#: an 8 x 8 grid of codes, so that upstream's 5 x 5 conv_like window is smaller than the image
WIDE_VAE_PARAMS = {**VAE_PARAMS, "image_size": 32}


@pytest.mark.parametrize(
    "options",
    [
        {"attn_types": ("full", "conv_like")},
        {"attn_types": ("conv_like",), "rotary_emb": True, "dim_head": 16, "shift_tokens": True},
    ],
    ids=["conv_like", "conv_like_rotary_shift_tokens"],
)
def test_conv_like_becomes_the_trailing_window(
    options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream's conv_like (window ending at the query) converts to ``conv_like_trailing``: the
    same logits and the same greedy codes; the centred ``conv_like`` would differ."""
    theirs, hparams = upstream_dalle(options, vae_params=WIDE_VAE_PARAMS)
    path = save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, WIDE_VAE_PARAMS)
    assert convert(path, tmp_path / "out") == 0
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    assert "conv_like_trailing" in ours.config["attn_types"]
    assert_same_logits(theirs, ours)
    centred = {**ours.config, "attn_types": ["conv_like" if kind == "conv_like_trailing" else kind
                                              for kind in ours.config["attn_types"]]}
    other = DALLE(vae=ours.vae, **{k: v for k, v in centred.items() if k != "vae"}).eval()
    other.load_state_dict(ours.state_dict())
    text, codes = inputs(theirs)
    with torch.no_grad():
        assert (other(text, codes) - ours(text, codes)).abs().max() > 1e-2  # the window matters here
    monkeypatch.setattr(
        upstream.dalle_pytorch, "gumbel_sample", lambda t, temperature, dim: t.argmax(dim=dim)
    )
    monkeypatch.setattr(theirs.vae, "decode", lambda codes: codes)
    expected = theirs.generate_images(text.clone())
    for use_cache in (True, False):
        assert torch.equal(ours.generate_image_codes(text, temperature=0, use_cache=use_cache), expected)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"attn_types": ("full", "sparse")}, "'sparse'"),  # DeepSpeed's kernel: its layout is not in the file
        ({"attn_types": ("full", "diagonal")}, "'diagonal'"),
        ({"window": 3}, "window"),
    ],
)
def test_hparams_that_cannot_be_mapped_are_refused_by_name(
    change: dict[str, Any], named: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({})
    assert (
        convert(
            save_dalle_pt(tmp_path / "dalle.pt", theirs, {**hparams, **change}, VAE_PARAMS), tmp_path / "out"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert named in err and "full" in err or named in err and "upstream DALLE's are" in err


def test_shared_layers_whose_weights_differ_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """hparams that share layers 0 and 2, with weights where those layers differ (an edited file):
    refused, not silently converted with one of the two."""
    theirs, hparams = upstream_dalle(OPTION_SETS["shared_ids"])
    weights = dict(theirs.state_dict())
    key = next(
        k for k in weights if k.startswith("transformer.layers.layers.2.0.") and k.endswith("to_qkv.weight")
    )
    weights[key] = weights[key] + 1  # layer 2's attention no longer layer 0's
    path = tmp_path / "dalle.pt"
    torch.save({"hparams": hparams, "vae_params": VAE_PARAMS, "vae_class_name": "DiscreteVAE",
                "weights": weights, "version": UPSTREAM_VERSION}, path)
    assert convert(path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "transformer.attn_branches.0.fn.fn.fn.to_qkv.weight and transformer.attn_branches.2" in err
    assert "the hparams' sharing does not fit the weights" in err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_hparams_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({})
    path = save_dalle_pt(tmp_path / "dalle.pt", theirs, {**hparams, "depth": 2}, VAE_PARAMS)
    assert convert(path, tmp_path / "out") == 2
    assert "transformer.layers.layers.2" in capsys.readouterr().err


class Payload:
    """A pickle that would run code when unpickled unsafely."""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_foreign_and_incomplete_files_are_refused_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "ran"
    payload = Payload()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"hparams": {}, "weights": payload}, protocol=2))
    assert convert(evil, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "weights_only" in err
    assert not marker.exists()

    no_weights = tmp_path / "no_weights.pt"
    torch.save({"hparams": {"dim": 4}}, no_weights)
    assert convert(no_weights, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(no_weights) in err and "no 'weights'" in err

    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    assert convert(not_a_dict, tmp_path / "out") == 2
    assert "holds a Tensor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    theirs, hparams = upstream_dalle({})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert convert(save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS), tmp_path / "out") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_converted_dalle_generates_with_dalle_train_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    theirs = upstream.DALLE(vae=upstream.DiscreteVAE(**VAE_PARAMS), **{**BASE, "num_text_tokens": 300})
    hparams = {**BASE, "num_text_tokens": 300}  # room for dalle-core's bytes tokenizer (257 ids)
    path = save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS)
    assert convert(path, tmp_path / "out", "--tokenizer", "bytes") == 0
    assert DALLE.from_pretrained(tmp_path / "out").tokenizer is not None  # saved with the model
    assert (
        main(
            [
                "generate",
                "--dalle-path",
                str(tmp_path / "out"),
                "--text",
                "ab",
                "--num-images",
                "2",
                "--seed",
                "0",
                "--outputs-dir",
                str(tmp_path / "images"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "images").rglob("*.png"))) >= 2


def test_a_tokenizer_larger_than_the_models_text_ids_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({})  # 50 text ids
    assert (
        convert(
            save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, VAE_PARAMS),
            tmp_path / "out",
            "--tokenizer",
            "bytes",
        )
        == 2
    )
    assert "257 ids" in capsys.readouterr().err


def test_openai_vae_needs_its_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    theirs, hparams = upstream_dalle({})
    path = tmp_path / "dalle.pt"
    torch.save(
        {
            "hparams": hparams,
            "vae_params": None,
            "vae_class_name": "OpenAIDiscreteVAE",
            "weights": theirs.state_dict(),
            "version": UPSTREAM_VERSION,
        },
        path,
    )
    monkeypatch.setenv("DALLE_BLOCK_PLUGINS", "dalle_vae_openai")
    reset_plugins()
    try:
        assert convert(path, tmp_path / "out") == 2
    finally:
        monkeypatch.delenv("DALLE_BLOCK_PLUGINS")
        reset_plugins()
    err = capsys.readouterr().err
    assert "openai" in err and "dalle-vae-openai" in err


def test_vqgan_dalle_needs_the_vqgan_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    theirs, hparams = upstream_dalle({})
    path = tmp_path / "dalle.pt"
    torch.save(
        {
            "hparams": hparams,
            "vae_params": None,
            "vae_class_name": "VQGanVAE",
            "weights": theirs.state_dict(),
            "version": UPSTREAM_VERSION,
        },
        path,
    )
    assert convert(path, tmp_path / "out") == 2
    assert "--vqgan_model_path" in capsys.readouterr().err


def upstream_openai_vae():
    """Upstream's OpenAIDiscreteVAE around small networks of OpenAI's own ``dall_e`` package (its
    constructor would download OpenAI's files and needs torch < 1.11: the same attributes are set)."""
    dall_e = pytest.importorskip(
        "dall_e", reason="OpenAI's dall_e package (pip install --no-deps DALL-E==0.1, and attrs)"
    )
    torch.manual_seed(4)
    vae = upstream.OpenAIDiscreteVAE.__new__(upstream.OpenAIDiscreteVAE)
    torch.nn.Module.__init__(vae)
    vae.enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    vae.dec = dall_e.Decoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    vae.channels, vae.num_layers, vae.image_size, vae.num_tokens = 3, 3, 256, 512
    return vae


def test_openai_vae_dalle_gives_upstreams_logits_and_codes(tmp_path: Path) -> None:
    entry = registry("vaes").get("openai")
    if entry is None or not entry.usable()[0]:
        pytest.skip("the openai VAE plugin (dalle-vae-openai) is not installed")
    vae = upstream_openai_vae()
    hparams = {**BASE, "depth": 1, "text_seq_len": 4, "shift_tokens": True}
    torch.manual_seed(0)
    theirs = upstream.DALLE(vae=vae, **hparams)
    randomize(theirs, 0)
    theirs.eval()
    path = save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, None)
    assert convert(path, tmp_path / "out") == 0
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(8))
    codes = theirs.vae.get_codebook_indices(images)
    assert torch.equal(ours.vae.get_codebook_indices(images), codes)
    text = torch.tensor([[5, 9, 0, 0], [7, 1, 2, 3]])
    with torch.no_grad():
        expected = theirs(text.clone(), codes.clone())
        # 1028 positions of logits up to ~1: a relative 1e-5 as well (fp32 sums of 1028 terms)
        torch.testing.assert_close(ours(text, codes), expected, atol=ATOL, rtol=1e-5)


#: a taming VQGAN config scaled down, at upstream VQGanVAE's fixed 256 px: f = 256 / 16 (upstream
#: reads f from attn_resolutions, this project from ch_mult: both 16), 16 x 16 codes
VQGAN_YAML = """model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 16
    n_embed: 32
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 1, 1, 2]
      num_res_blocks: 1
      attn_resolutions: [16]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.DummyLoss
"""


class TamingVQModel(torch.nn.Module):
    """The inference half of taming's ``VQModel`` (its modules, ``encode`` and ``decode``, as
    taming-transformers writes them), built from taming's own encoder, quantizer and decoder:
    the class itself is a Lightning module, and Lightning is not installed here."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, **training_only: Any):
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor):
        return self.quantize(self.quant_conv(self.encoder(x)))  # (quant, loss, (perplexity, _, indices))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))


def test_vqgan_dalle_gives_upstreams_logits_and_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream's VQGanVAE (its real wrapper around taming's model) in upstream's DALLE, saved as
    train_dalle.py saves it, converted with the VQGAN's files given by upstream's flags."""
    pytest.importorskip("dalle_vae_taming", reason="dalle-vae-taming (the vqgan VAE plugin) is not installed")
    pytest.importorskip("taming.modules.vqvae.quantize", reason="taming-transformers is not installed")
    monkeypatch.setattr(sys.modules["taming.models.vqgan"], "VQModel", TamingVQModel)
    config = tmp_path / "model.yaml"
    config.write_text(VQGAN_YAML)
    torch.manual_seed(6)
    params = yaml.safe_load(VQGAN_YAML)["model"]["params"]
    vqgan = TamingVQModel(**params)
    torch.save({"state_dict": vqgan.state_dict(), "global_step": 10}, tmp_path / "last.ckpt")
    vae = upstream.VQGanVAE(str(tmp_path / "last.ckpt"), str(config))
    assert torch.equal(vae.model.quantize.embedding.weight, vqgan.quantize.embedding.weight)
    hparams = {**BASE, "depth": 2, "shift_tokens": True}
    torch.manual_seed(0)
    theirs = upstream.DALLE(vae=vae, **hparams)
    randomize(theirs, 0)
    theirs.eval()
    assert theirs.image_seq_len == 256
    path = save_dalle_pt(tmp_path / "dalle.pt", theirs, hparams, None)
    vqgan_flags = ["--taming", "--vqgan_model_path", str(tmp_path / "last.ckpt"),
                   "--vqgan_config_path", str(config)]
    assert convert(path, tmp_path / "out", *vqgan_flags) == 0
    ours = DALLE.from_pretrained(tmp_path / "out").eval()
    assert type(ours.vae).__name__ == "VQGanVAE" and ours.vae.fmap_size == 16
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(8))
    codes = theirs.vae.get_codebook_indices(images)
    assert torch.equal(ours.vae.get_codebook_indices(images), codes)
    assert len(set(codes.flatten().tolist())) > 1  # a real comparison, not a constant
    assert_same_logits(theirs, ours)
    # another VQGAN (other weights) than the one the DALLE was trained with is refused
    torch.manual_seed(7)
    torch.save({"state_dict": TamingVQModel(**params).state_dict()}, tmp_path / "other.ckpt")
    other_flags = [*vqgan_flags[:2], str(tmp_path / "other.ckpt"), *vqgan_flags[3:]]
    assert convert(path, tmp_path / "out2", *other_flags) == 2
    assert not (tmp_path / "out2").exists()
