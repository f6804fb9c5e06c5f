"""`convert`: an upstream checkpoint (file or DeepSpeed directory) -> a model directory of this
project, written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalle_core import DALLE
from dalle_core.interfaces import Tokenizer
from dalle_core.transformer import rotary_angles
from dalle_train.choices import VaeFlags
from dalle_train.convert.deepspeed_dir import is_deepspeed_dir, read_deepspeed_dir
from dalle_train.convert.mapping import dalle_config, map_dalle_weights
from dalle_train.convert.upstream import UpstreamCheckpoint, read_checkpoint
from dalle_train.convert.vaes import checkpoint_vae, discrete_vae
from dalle_train.errors import TrainError

#: written beside config.json: where the model came from and what was not converted
PROVENANCE = "upstream.json"
#: what upstream's training state becomes
DROPPED_NOTE = (
    "a model directory holds no training state; fine-tune the converted model with "
    "dalle-train dalle --dalle-path OUT, which starts a new optimizer and schedule"
)


def read_upstream(path: Path) -> UpstreamCheckpoint:
    """An upstream vae.pt / dalle.pt file, or a DeepSpeed checkpoint directory of its scripts."""
    if path.is_dir():
        if not is_deepspeed_dir(path):
            raise TrainError(
                f"{path} is a folder but not a DeepSpeed checkpoint directory (no 'latest' file "
                f"and no <tag>/mp_rank_00_model_states.pt); give a vae.pt, a dalle.pt or one"
            )
        return read_deepspeed_dir(path)
    return read_checkpoint(path)


def convert(
    path: Path,
    out: Path,
    *,
    vae_flags: VaeFlags | None = None,
    tokenizer_for: Callable[[UpstreamCheckpoint], Tokenizer | None] = lambda checkpoint: None,
    say: Callable[[str], None] = print,
) -> UpstreamCheckpoint:
    """Convert ``path`` into the model directory ``out`` (which must not exist or be empty):
    a DiscreteVAE (from a vae.pt) or a DALLE with its VAE and the tokenizer ``tokenizer_for``
    gives for the checkpoint (None: none saved) (from a dalle.pt)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"{out} already exists and is not an empty folder: give a new OUT")
    checkpoint = read_upstream(path)
    if checkpoint.kind == "vae":
        model: Any = discrete_vae(checkpoint.hparams, checkpoint.weights, checkpoint.source)
    else:
        model = build_dalle(checkpoint, vae_flags or VaeFlags(), tokenizer_for(checkpoint))
    write_atomically(out, lambda folder: _save(model, checkpoint, folder))
    what = "DiscreteVAE" if checkpoint.kind == "vae" else f"DALLE with its {checkpoint.vae_class_name}"
    version = checkpoint.version or "version unknown"
    say(f"converted {checkpoint.source} (upstream {version}) into {out}: {what}")
    if checkpoint.dropped:
        say(f"note: upstream's {', '.join(checkpoint.dropped)} dropped: {DROPPED_NOTE}")
    return checkpoint


def build_dalle(checkpoint: UpstreamCheckpoint, vae_flags: VaeFlags, tokenizer: Tokenizer | None) -> DALLE:
    """This project's DALLE holding the weights of the upstream one."""
    source = checkpoint.source
    config = dalle_config(checkpoint.hparams, source)
    vae = checkpoint_vae(checkpoint, vae_flags)
    if tokenizer is not None and tokenizer.vocab_size > config["num_text_tokens"]:
        raise TrainError(
            f"the tokenizer given has {tokenizer.vocab_size} ids but {source} was trained with "
            f"num_text_tokens={config['num_text_tokens']}: give the tokenizer it was trained with"
        )
    _check_grid(checkpoint, vae)
    try:
        model = DALLE(vae=vae, tokenizer=tokenizer, **config)
    except (TypeError, ValueError) as error:
        raise TrainError(f"{source}: this project's DALLE refuses its hparams: {error}") from error
    target = {key: value for key, value in model.state_dict().items() if not key.startswith("vae.")}
    upstream = {key: value for key, value in checkpoint.weights.items() if not key.startswith("vae.")}
    angles = None
    if config["rotary_emb"]:
        angles = rotary_angles(config["dim_head"], model.text_len, model.fmap_size, upstream=True)
    state = map_dalle_weights(
        upstream,
        target,
        model.total_text_tokens,
        bool(config["share_input_output_emb"]),
        source,
        dim_head=config["dim_head"],
        rotary_angles=angles,
    )
    model.load_state_dict(state, strict=False)  # the VAE's weights are in place already
    return model.eval()


def _check_grid(checkpoint: UpstreamCheckpoint, vae: Any) -> None:
    """The codes per side the DALLE's axial embeddings were made for must be the VAE's."""
    for key in ("image_pos_emb.weights_0", "image_pos_emb.weights.0"):
        if key in checkpoint.weights:
            side = checkpoint.weights[key].shape[1]
            if side != vae.fmap_size:
                raise TrainError(
                    f"{checkpoint.source}: the DALLE was made for {side} x {side} image codes, but its VAE "
                    f"({type(vae).__name__}, {vae.image_size} px) gives {vae.fmap_size} x {vae.fmap_size}"
                )


def _save(model: Any, checkpoint: UpstreamCheckpoint, folder: Path) -> None:
    model.save_pretrained(folder)
    provenance = {
        "source": checkpoint.source,
        "kind": checkpoint.kind,
        "upstream_version": checkpoint.version,
        "epoch": checkpoint.epoch,
        "vae_class_name": checkpoint.vae_class_name,
        "hparams": checkpoint.hparams,
        "vae_params": checkpoint.vae_params,
        "not_converted": checkpoint.dropped,
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=1, default=str) + "\n")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """``write(folder)`` into a temporary folder beside ``out``, renamed to ``out`` when complete;
    on any failure nothing is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        write(temporary)
        if out.is_dir():
            out.rmdir()  # empty: checked before
        os.replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
