"""Every flag of ``dalle-train`` reaches the keyword it names, and no neighbour's.

Each row of a table sets one flag alone, to a value that is neither its default nor the value
of any other row, and runs the real command with the training loop intercepted: `train`'s
arguments are captured and no step is taken (``generate``: `DALLE.generate_images` and
`DALLE.generate_texts` are spied on and still run). What was built is described as a flat
dict of facts (the model's ``config``, structural facts of its modules, the loop settings, the
optimizer's groups, the schedule, the batches, the task) and compared with the facts of the
same command without the flag: the row's changes, and nothing else, must appear, so a flag that
reaches a neighbour's keyword, or two swapped flags, fail. The upstream underscore spellings
are checked to mean the same as the dashed ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import test_generate
import torch
from conftest import SHAPES, TINY_DALLE, TINY_VAE
from PIL import Image
from torch import nn

from dalle_core import DALLE, DiscreteVAE
from dalle_core.layers import DivideMax
from dalle_core.vae import ResBlock
from dalle_train import cli
from dalle_train.commands import common
from dalle_train.commands.generate import prompt_seed
from dalle_train.tasks.vae import vae_temperature
from dalle_train.training.loop import Outcome

# fixtures of test_generate: a tiny saved DALLE, and only dalle-core's plugins (autouse)
model_dir, only_builtin_plugins = test_generate.model_dir, test_generate.only_builtin_plugins

TINY_CLIP = ["--tokenizer", "bytes", "--text-seq-len", "48", "--visual-image-size", "32",
             "--visual-patch-size", "16", "--dim-text", "16", "--dim-image", "16", "--dim-latent", "16",
             "--text-enc-depth", "1", "--visual-enc-depth", "1", "--text-heads", "2", "--visual-heads", "2",
             "--batch-size", "8", "--eval-size", "8"]
#: steps at which the VAE's Gumbel temperature is compared (the last one is at the minimum)
ANNEAL_STEPS = (0, 100, 1000, 100_000)
#: shapes: 64 pictures; DALLE and VAE: 16 batches of 4 an epoch; CLIP: 56 trained on, 7 batches of 8
EPOCHS = 20

Facts = dict[str, Any]


# ---------------------------------------------------------------------------- what was built


def dropout(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def dalle_structure(model: DALLE) -> Facts:
    transformer = model.transformer
    attention = [branch.fn.fn.fn for branch in transformer.attn_branches]  # LayerScale > PreNorm > Shifted
    feedforward = [branch.fn.fn.fn for branch in transformer.ff_branches]
    return {
        "layers": len(attention),
        "attention modules": len(set(map(id, attention))),
        "feed-forward modules": len(set(map(id, feedforward))),
        "attention heads": {a.heads for a in attention},
        "head width": {a.dim_head for a in attention},
        "qkv features": {a.to_qkv.out_features for a in attention},
        "width": model.text_emb.embedding_dim,
        "text positions": len(model.text_pad_ids),
        "patterns": [pattern.kind for pattern in transformer.patterns],
        "kernel": transformer.kernels.name,
        "attention dropout": {dropout(a.to_out[1]) for a in attention},
        "feed-forward dropout": {dropout(f.dropout) for f in feedforward},
        "reversible": transformer.reversible is not None,
        "token shift": transformer.shift is not None,
        "rotary": transformer.rotary_cos is not None,
        "learned positions": model.text_pos_emb is not None,
        "output heads": model.text_head is not None,
        "divide by max": isinstance(model.norm_by_max, DivideMax),
        "sandwich norm": {isinstance(b.fn.norm_out, nn.LayerNorm) for b in transformer.attn_branches},
        "checkpointing": transformer.activation_checkpointing,
        "image loss weight": model.loss_img_weight,
    }


def vae_structure(model: DiscreteVAE) -> Facts:
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    return {
        "codebook": tuple(model.codebook.weight.shape),
        "downsamplings": sum(conv.stride == (2, 2) for conv in convs),
        "image channels": convs[0].in_channels,
        "hidden channels": convs[0].out_channels,
        "code logits": convs[-1].out_channels,
        "resnet blocks": sum(isinstance(m, ResBlock) for m in model.modules()),
        "codes per side": model.fmap_size,
    }


def clip_structure(model: Any) -> Facts:
    return {
        "text width": model.text_emb.embedding_dim,
        "image width": model.to_visual_embedding.out_features,
        "latent width": {model.to_text_latent.out_features, model.to_visual_latent.out_features},
        "text layers": len(model.text_transformer.layers),
        "image layers": len(model.visual_transformer.layers),
        "text heads": {layer[0].fn.fn.heads for layer in model.text_transformer.layers},
        "image heads": {layer[0].fn.fn.heads for layer in model.visual_transformer.layers},
        "text positions": model.text_pos_emb.num_embeddings,
        "patches": model.visual_pos_emb.num_embeddings,
        "patch features": model.to_visual_embedding.in_features,
    }


STRUCTURE: dict[str, Callable[[Any], Facts]] = {
    "dalle": dalle_structure, "vae": vae_structure, "clip": clip_structure,
}


def plain(value: Any) -> bool:
    """A value a flag can set directly (numbers, words, lists of words), not a module or tensor."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(item, str) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def facts(task: Any, batches: Any, optimizer: torch.optim.Optimizer, schedule: Any, settings: Any) -> Facts:
    """Everything the flags may reach, flattened: ``model.<config key>``, structural facts,
    ``loop.<LoopSettings field>``, ``optimizer.*``, ``schedule.*``, ``batches.*``,
    ``dataset.<attribute>`` and ``task.<attribute>``."""
    found = {f"model.{key}": value for key, value in task.model.config.items()}
    found.update(STRUCTURE[task.name](task.model))
    found.update({f"loop.{f.name}": getattr(settings, f.name) for f in fields(settings)})
    found["loop.precision"] = settings.precision.name
    found.update({
        "optimizer.lr": [group["lr"] for group in optimizer.param_groups],
        "optimizer.weight_decay": [group["weight_decay"] for group in optimizer.param_groups],
        "schedule.peaks": schedule.peaks, "schedule.kind": schedule.schedule,
        "schedule.total": schedule.total, "schedule.warmup": schedule.warmup,
        "schedule.decay_rate": schedule.decay_rate,
        "batches.batch_size": batches.batch_size, "batches.seed": batches.seed,
        "batches.num_workers": batches.num_workers, "batches.samples": batches.size,
        "torch threads": torch.get_num_threads(),
    })
    dataset = getattr(batches.dataset, "dataset", batches.dataset)  # CLIP trains on a part of it
    found.update({f"dataset.{key}": value for key, value in vars(dataset).items() if plain(value)})
    found.update({f"task.{key}": value for key, value in vars(task).items() if plain(value)})
    if hasattr(task, "held"):
        found["task.held"] = len(task.held)
    if hasattr(task, "temperature"):
        found["task.temperatures"] = [task.temperature(step) for step in ANNEAL_STEPS]
    return found


@pytest.fixture
def built(monkeypatch, tmp_path) -> Callable[..., Facts]:
    """``built(*argv)``: run ``dalle-train *argv`` up to the training loop; the facts of what
    it was handed."""
    captured: list[Facts] = []

    def train(task, batches, optimizer, schedule, settings, out, metrics, run_config, resume=None,
              backend=None, resume_dir=None):
        captured.append(facts(task, batches, optimizer, schedule, settings))
        return Outcome(step=0, checkpoint=None, last_loss=0.0)

    monkeypatch.setattr(common, "train", train)

    def build(*argv: str) -> Facts:
        out = tmp_path / f"run-{len(captured)}"
        assert cli.main([*argv, "--output-dir", str(out)]) == 0
        return captured.pop()

    return build


def assert_changes(base: Facts, changed: Facts, expected: Facts) -> None:
    """``changed`` is ``base`` with ``expected`` applied, and nothing else."""
    unknown = set(expected) - set(base)
    assert not unknown, f"the table names facts that are not collected: {unknown}"
    assert base.keys() == changed.keys()
    assert {k: changed[k] for k in expected} == expected, "the flag did not reach what it names"
    others = {k: (base[k], changed[k]) for k in base if k not in expected and base[k] != changed[k]}
    assert not others, f"the flag changed what it does not name: {others}"


# -------------------------------------------------------------------------------------- tables

# Every value differs from its flag's default and from every value (and base value) of the
# same table, so a flag that reached another's keyword, or two swapped flags, cannot pass.
DALLE_MODEL = [
    (["--dim", "24"], {"model.dim": 24, "width": 24}),
    (["--text-seq-len", "56"], {"model.text_seq_len": 56, "text positions": 56, "task.text_seq_len": 56,
                                "task.tokens_per_sample": 56 + 16}),
    (["--depth", "3"], {"model.depth": 3, "layers": 3, "attention modules": 3, "feed-forward modules": 3,
                        "patterns": ["full"] * 3}),
    (["--heads", "5"], {"model.heads": 5, "attention heads": {5}, "qkv features": {3 * 5 * 8}}),
    (["--dim-head", "6"], {"model.dim_head": 6, "head width": {6}, "qkv features": {3 * 2 * 6}}),
    (["--attn-dropout", "0.125"], {"model.attn_dropout": 0.125, "attention dropout": {0.125}}),
    (["--ff-dropout", "0.375"], {"model.ff_dropout": 0.375, "feed-forward dropout": {0.375}}),
    (["--loss-img-weight", "2.5"], {"model.loss_img_weight": 2.5, "image loss weight": 2.5}),
    (["--attn-types", "axial_row,axial_col"], {"model.attn_types": ["axial_row", "axial_col"],
                                               "patterns": ["axial_row", "axial_col"]}),
    (["--attn-kernel", "sdpa"], {"model.attn_kernel": "sdpa", "kernel": "sdpa"}),
    (["--shared-attn-ids", "0,0"], {"model.shared_attn_ids": [0, 0], "attention modules": 1}),
    (["--shared-ff-ids", "1,1"], {"model.shared_ff_ids": [1, 1], "feed-forward modules": 1}),
    (["--reversible"], {"model.reversible": True, "reversible": True}),
    (["--no-shift-tokens"], {"model.shift_tokens": False, "token shift": False}),
    (["--no-rotary-emb"], {"model.rotary_emb": False, "rotary": False, "learned positions": True}),
    (["--share-input-output-emb"], {"model.share_input_output_emb": True, "output heads": False}),
    (["--stable-softmax"], {"model.stable": True, "divide by max": True}),
    (["--sandwich-norm"], {"model.sandwich_norm": True, "sandwich norm": {True}}),
    (["--checkpointing"], {"model.activation_checkpointing": True, "checkpointing": True}),
]

#: "0 turns it off": a row whose value may be a base value
OFF = ["--clip-grad-norm", "0"]
# through `dalle`; the three commands share this code (common.prepare_run and common.fit)
TRAINING = [
    (["--learning-rate", "0.0123"], {"optimizer.lr": [0.0123] * 2, "schedule.peaks": [0.0123] * 2}),
    (["--weight-decay", "0.0456"], {"optimizer.weight_decay": [0.0456, 0.0]}),  # matrices only
    (["--clip-grad-norm", "0.789"], {"loop.clip_grad_norm": 0.789}),
    (OFF, {"loop.clip_grad_norm": None}),
    (["--ga-steps", "7"], {"loop.ga_steps": 7, "schedule.total": EPOCHS * 16 // 7}),
    (["--save-every-n-steps", "9"], {"loop.save_every": 9}),
    (["--keep-n-checkpoints", "11"], {"loop.keep": 11}),
    (["--log-every", "13"], {"loop.log_every": 13}),
    (["--sample-every", "15"], {"loop.sample_every": 15}),
    (["--lr-schedule", "constant"], {"schedule.kind": "constant"}),
    (["--lr-decay"], {"schedule.kind": "plateau"}),
    (["--warmup-steps", "17"], {"schedule.warmup": 17}),
    (["--lr-decay-rate", "0.77"], {"schedule.decay_rate": 0.77}),
    (["--epochs", "19"], {"loop.epochs": 19, "schedule.total": 19 * 16}),
    (["--max-steps", "21"], {"loop.max_steps": 21, "schedule.total": 21}),
    (["--batch-size", "10"],
     {"batches.batch_size": 10, "loop.batch_size": 10, "schedule.total": EPOCHS * (64 // 10)}),
    (["--seed", "23"], {"batches.seed": 23, "dataset.seed": 23, "task.seed": 23}),
    (["--num-workers", "14"], {"batches.num_workers": 14}),  # started only when batches are drawn
    (["--threads", "12"], {"torch threads": 12}),
    (["--dataset-size", "40"], {"batches.samples": 40, "dataset.count": 40, "schedule.total": EPOCHS * 10}),
    (["--precision", "bf16"], {"loop.precision": "bf16"}),
    (["--fp16"], {"loop.precision": "fp16"}),
    (["--amp"], {"loop.precision": "fp16"}),
    (["--null-cond-prob", "0.3"], {"task.null_cond_prob": 0.3}),
    (["--truncate-captions"], {"task.truncate": True}),
    (["--sample-prompts", "a pink moon|a grey sun"], {"task.prompts": ["a pink moon", "a grey sun"]}),
]

def temperatures(start: float = 1.0, minimum: float = 0.5, rate: float = 1e-6) -> list[float]:
    """The VAE's temperatures at `ANNEAL_STEPS` (defaults: the flags' defaults)."""
    return [vae_temperature(step, start, minimum, rate) for step in ANNEAL_STEPS]


VAE = [
    (["--image-size", "48"], {"model.image_size": 48, "codes per side": 6, "dataset.image_size": 48}),
    (["--num-layers", "2"], {"model.num_layers": 2, "downsamplings": 2, "codes per side": 8}),
    (["--num-tokens", "24"], {"model.num_tokens": 24, "codebook": (24, 8), "code logits": 24}),
    (["--emb-dim", "12"], {"model.codebook_dim": 12, "codebook": (16, 12)}),
    (["--hidden-dim", "20"], {"model.hidden_dim": 20, "hidden channels": 20}),
    (["--num-resnet-blocks", "5"], {"model.num_resnet_blocks": 5, "resnet blocks": 10}),  # encoder + decoder
    (["--smooth-l1-loss"], {"model.smooth_l1_loss": True}),
    (["--kl-loss-weight", "0.25"], {"model.kl_div_loss_weight": 0.25}),
    (["--straight-through"], {"model.straight_through": True}),
    (["--reinmax"], {"model.reinmax": True}),
    (["--starting-temp", "1.75"], {"task.start": 1.75, "task.temperatures": temperatures(start=1.75)}),
    (["--temp-min", "0.375"], {"task.minimum": 0.375, "task.temperatures": temperatures(minimum=0.375)}),
    (["--anneal-rate", "0.003"], {"task.rate": 0.003, "task.temperatures": temperatures(rate=0.003)}),
    (["--num-images-save", "6"], {"task.shown": 6}),
    (["--lr-decay-rate", "0.77"], {"schedule.decay_rate": 0.77}),  # the VAE's default schedule
]

CLIP = [
    (["--dim-text", "20"], {"model.dim_text": 20, "text width": 20}),
    (["--dim-image", "28"], {"model.dim_image": 28, "image width": 28}),
    (["--dim-latent", "36"], {"model.dim_latent": 36, "latent width": {36}}),
    (["--text-enc-depth", "3"], {"model.text_enc_depth": 3, "text layers": 3}),
    (["--visual-enc-depth", "5"], {"model.visual_enc_depth": 5, "image layers": 5}),
    (["--text-heads", "6"], {"model.text_heads": 6, "text heads": {6}}),
    (["--visual-heads", "7"], {"model.visual_heads": 7, "image heads": {7}}),
    (["--text-seq-len", "40"], {"model.text_seq_len": 40, "text positions": 40, "task.text_seq_len": 40}),
    (["--visual-image-size", "96"], {"model.visual_image_size": 96, "patches": 36, "dataset.image_size": 96}),
    (["--visual-patch-size", "4"], {"model.visual_patch_size": 4, "patches": 64, "patch features": 3 * 16}),
    (["--eval-size", "12"], {"task.held": 12, "batches.samples": 52, "schedule.total": EPOCHS * (52 // 8)}),
]

TABLES = {"dalle": DALLE_MODEL + TRAINING, "vae": VAE, "clip": CLIP}


def shapes_argv(command: str, vae: Path) -> list[str]:
    """The command on the built-in shapes with the tiny model of test_training."""
    model = {"dalle": [*TINY_DALLE, "--vae-path", str(vae)], "vae": TINY_VAE, "clip": TINY_CLIP}[command]
    return [command, *SHAPES, *model]


def rows(table: dict[str, list]) -> list:
    return [pytest.param(command, flags, expected, id=f"{command} {' '.join(flags)}")
            for command, entries in table.items() for flags, expected in entries]


@pytest.mark.parametrize("command, flags, expected", rows(TABLES))
def test_flag_reaches_what_it_names_and_nothing_else(built, vae_dir, command, flags, expected):
    argv = shapes_argv(command, vae_dir)
    assert_changes(built(*argv), built(*argv, *flags), expected)


@pytest.mark.parametrize("command", TABLES)
def test_each_table_sets_distinct_values(vae_dir, command):
    """The tables' premise: no row's value is another row's or one of the base command line's."""
    values = [flags[1] for flags, _ in TABLES[command] if len(flags) == 2 and flags != OFF]
    assert len(values) == len(set(values))
    assert not set(values) & set(shapes_argv(command, vae_dir))


# ------------------------------------------------------------------------ folders of images

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Eight small RGB pictures, each with a one-line caption."""
    root = tmp_path_factory.mktemp("pairs")
    for i in range(8):
        Image.new("RGB", (40, 36), (30 * i, 200 - 20 * i, 90)).save(root / f"picture-{i}.png")
        (root / f"picture-{i}.txt").write_text(f"picture number {i}\n")
    return root


def folder_argv(command: str, data: Path, vae: Path) -> list[str]:
    flag = "--image-folder" if command == "vae" else "--image-text-folder"
    model = shapes_argv(command, vae)[1 + len(SHAPES):]
    return [command, flag, str(data), *model, "--batch-size", "2", "--threads", "1", "--sample-every", "0"]


FOLDER = {
    "dalle": [(["--random-resize-crop-lower-ratio", "0.6"], {"dataset.resize_ratio": 0.6})],
    "vae": [(["--transparent"], {"model.channels": 4, "image channels": 4, "dataset.channels": 4,
                                 "model.normalization": [[0.5, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 1.0]]})],
    "clip": [(["--transparent"], {"model.channels": 4, "patch features": 4 * 16 * 16, "dataset.channels": 4}),
             (["--random-resize-crop-lower-ratio", "0.6"], {"dataset.resize_ratio": 0.6})],
}


@pytest.mark.parametrize("command, flags, expected", rows(FOLDER))
def test_data_flag_reaches_the_folder_dataset(built, folder, vae_dir, command, flags, expected):
    argv = folder_argv(command, folder, vae_dir)
    assert_changes(built(*argv), built(*argv, *flags), expected)


def test_dalle_transparent_reads_rgba_for_an_rgba_vae_and_is_refused_with_an_rgb_one(
    built, folder, vae_dir, tmp_path, capsys
):
    rgba = tmp_path / "rgba-vae"
    DiscreteVAE(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8,
                channels=4).save_pretrained(rgba)
    argv = folder_argv("dalle", folder, vae_dir)
    assert built(*argv, "--vae-path", str(rgba), "--transparent")["dataset.channels"] == 4
    assert cli.main([*argv, "--transparent", "--output-dir", str(tmp_path / "refused")]) == 2
    assert "--transparent reads RGBA images, but the VAE takes 3 channels" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ generate

PROMPT = "a red circle"


@pytest.fixture
def sampled(monkeypatch, model_dir, tmp_path) -> Callable[..., Facts]:
    """``sampled(*flags)``: run ``dalle-train generate`` with ``flags``; what reached
    `DALLE.generate_images` and `DALLE.generate_texts` (which still run, uncompiled)."""
    images, texts = DALLE.generate_images, DALLE.generate_texts
    calls: dict[str, list[dict[str, Any]]] = {"images": [], "texts": []}

    def autocast() -> torch.dtype | None:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def generate_images(self, text, **kwargs):
        calls["images"].append({**kwargs, "rows": len(text), "seed": kwargs["generator"].initial_seed(),
                                "autocast": autocast()})
        return images(self, text, **{**kwargs, "compile": False})  # compiling takes tens of seconds

    def generate_texts(self, text, **kwargs):
        calls["texts"].append({**{k: kwargs[k] for k in ("filter_thres", "top_p", "temperature")},
                               "seed": kwargs["generator"].initial_seed()})
        return texts(self, text, **kwargs)

    monkeypatch.setattr(DALLE, "generate_images", generate_images)
    monkeypatch.setattr(DALLE, "generate_texts", generate_texts)

    def run(*flags: str) -> Facts:
        for made in calls.values():
            made.clear()
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        argv = ["generate", "--dalle-path", str(model_dir), "--text", PROMPT, "--outputs-dir", str(out),
                "--num-images", "4", "--batch-size", "2", "--seed", "7", "--device", "cpu", *flags]
        assert cli.main(argv) == 0
        found: Facts = {"rows": [call["rows"] for call in calls["images"]], "gentext": calls["texts"][:]}
        for key in ("filter_thres", "top_p", "temperature", "cond_scale", "compile", "seed", "clip",
                    "autocast"):
            found[key] = {call[key] for call in calls["images"]}
        return found

    return run


def gentext(**changes: Any) -> list[dict[str, Any]]:
    """What ``--gentext`` hands `DALLE.generate_texts`: the defaults with ``changes``."""
    defaults = {"filter_thres": 0.9, "top_p": None, "temperature": 1.0, "seed": prompt_seed(7, PROMPT)}
    return [{**defaults, **changes}]


# base: --num-images 4 --batch-size 2 --seed 7 (and defaults --top-k 0.9, --temperature 1, --cond-scale 1)
GENERATE = [
    (["--top-k", "0.25"], {"filter_thres": {0.25}}),
    (["--top-p", "0.625"], {"top_p": {0.625}}),
    (["--temperature", "0.875"], {"temperature": {0.875}}),
    (["--cond-scale", "1.5"], {"cond_scale": {1.5}}),
    (["--batch-size", "3"], {"rows": [3, 1]}),
    (["--num-images", "5"], {"rows": [2, 2, 1]}),
    (["--seed", "11"], {"seed": {prompt_seed(11, PROMPT)}}),
    (["--compile"], {"compile": {True}}),
    (["--precision", "bf16"], {"autocast": {torch.bfloat16}}),
    (["--gentext"], {"gentext": gentext()}),
    (["--gentext", "--top-k", "0.25"], {"gentext": gentext(filter_thres=0.25), "filter_thres": {0.25}}),
    (["--gentext", "--top-p", "0.625"], {"gentext": gentext(top_p=0.625), "top_p": {0.625}}),
    (["--gentext", "--temperature", "0.875"],
     {"gentext": gentext(temperature=0.875), "temperature": {0.875}}),
]


@pytest.mark.parametrize("flags, expected", [pytest.param(*row, id=" ".join(row[0])) for row in GENERATE])
def test_generate_flag_reaches_the_sampler(sampled, flags, expected):
    assert_changes(sampled(), sampled(*flags), expected)


# --------------------------------------------------------------------------- upstream spellings


def upstream(flag: str) -> str:
    """The underscore spelling of ``flag`` (``--no-shift-tokens``: ``--no-shift_tokens``)."""
    if flag.startswith("--no-"):
        return "--no-" + flag[5:].replace("-", "_")
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def subparser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


SPELLED = [(command, flags) for command, entries in {**TABLES, "generate": GENERATE}.items()
           for flags, _ in entries if list(map(upstream, flags)) != flags]


@pytest.mark.parametrize("command, flags", [pytest.param(*row, id=f"{row[0]} {' '.join(row[1])}")
                                            for row in SPELLED])
def test_underscore_spelling_parses_to_the_same_values(command, flags):
    base = [command, "--dalle-path", "model"] if command == "generate" else [command]
    parser = cli.build_parser()
    spelled = list(map(upstream, flags))
    registered = subparser(command)._option_string_actions
    assert all(word in registered for word in spelled if word.startswith("--"))  # not an abbreviation
    assert vars(parser.parse_args([*base, *spelled])) == vars(parser.parse_args([*base, *flags]))


# the upstream spellings the README promises, per command (upstream train_vae.py, train_dalle.py, generate.py)
README_SPELLINGS = {
    "vae": "--image_folder --image_size --starting_temp --temp_min --anneal_rate --num_tokens --num_layers "
           "--num_resnet_blocks --emb_dim --hidden_dim --kl_loss_weight --smooth_l1_loss --lr_decay_rate "
           "--num_images_save --transparent --epochs --batch_size --learning_rate",
    "dalle": "--image_text_folder --vae_path --dalle_path --taming --bpe_path --hug --chinese "
             "--truncate_captions --random_resize_crop_lower_ratio --fp16 --amp --epochs --batch_size "
             "--learning_rate --clip_grad_norm --lr_decay --ga_steps --save_every_n_steps "
             "--keep_n_checkpoints --dim --depth --heads --dim_head --text_seq_len --attn_types "
             "--reversible --loss_img_weight "
             "--shift_tokens --rotary_emb --shared_attn_ids --shared_ff_ids --share_input_output_emb "
             "--stable_softmax --wandb_name --wandb_entity --vqgan_model_path --vqgan_config_path",
    "generate": "--dalle_path --text --num_images --batch_size --top_k --outputs_dir --bpe_path --hug "
                "--chinese --taming --vqgan_model_path --vqgan_config_path --gentxt",
}
#: upstream spellings whose dashed flag is not the same word
RENAMED = {"--gentxt": "--gentext"}


@pytest.mark.parametrize("command", README_SPELLINGS)
def test_readme_upstream_spellings_are_the_dashed_flags(command):
    actions = subparser(command)._option_string_actions
    for spelling in README_SPELLINGS[command].split():
        dashed = RENAMED.get(spelling, spelling.replace("_", "-"))
        assert spelling in actions, f"dalle-train {command} does not accept {spelling}"
        assert actions[spelling] is actions[dashed], f"{spelling} is not {dashed}"
        assert actions[spelling].dest == dashed[2:].replace("-", "_")


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_dashed_flag_has_its_underscore_spelling_with_the_same_destination(command):
    for action in subparser(command)._actions:
        for option in action.option_strings:
            if option.startswith("--") and "-" in option[2:] and not option.startswith("--no-"):
                twin = "--" + option[2:].replace("-", "_")
                assert twin in action.option_strings, f"{command} {option} has no {twin}"
                assert action.dest == option[2:].replace("-", "_"), f"{command} {option} -> {action.dest}"
