"""Tiny random-weight VQGANs in the published file formats (a taming YAML config and a PyTorch
Lightning ``.ckpt``)."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

VQ_TARGET = "taming.models.vqgan.VQModel"
GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"


def taming_yaml(
    target: str = VQ_TARGET,
    *,
    resolution: int = 32,
    ch_mult: tuple[int, ...] = (1, 1, 2),
    n_embed: int = 64,
    embed_dim: int = 32,
    in_channels: int = 3,
    attn_resolutions: tuple[int, ...] = (8,),
) -> str:
    """A config in the layout of the published taming configs, scaled down (GroupNorm needs
    multiples of 32 channels, so ``ch`` and ``z_channels`` are 32)."""
    if target == GUMBEL_TARGET:
        extra = """    kl_weight: 1.0e-08
    monitor: val/rec_loss
    temperature_scheduler_config:
      target: taming.lr_scheduler.LambdaWarmUpCosineScheduler
      params:
        warm_up_steps: 0
        max_decay_steps: 1000001
        lr_start: 0.9
        lr_max: 0.9
        lr_min: 1.0e-06
"""
        loss = "      target: taming.modules.losses.vqperceptual.DummyLoss\n"
    else:
        extra = ""
        loss = """      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
"""
    return f"""model:
  base_learning_rate: 4.5e-06
  target: {target}
  params:
{extra}    embed_dim: {embed_dim}
    n_embed: {n_embed}
    ddconfig:
      double_z: false
      z_channels: 32
      resolution: {resolution}
      in_channels: {in_channels}
      out_ch: {in_channels}
      ch: 32
      ch_mult: [{", ".join(map(str, ch_mult))}]
      num_res_blocks: 1
      attn_resolutions: [{", ".join(map(str, attn_resolutions))}]
      dropout: 0.0
    lossconfig:
{loss}"""


class ModelCheckpoint:
    """Stands for a Lightning callback: pickled into checkpoints, never to be run on load."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath
        self.best_model_score = torch.tensor(0.25)

    def __setstate__(self, state: dict) -> None:
        raise AssertionError("a pickled callback was unpickled with its own code")


def lightning_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict:
    """A dict shaped like a PyTorch Lightning 1.x checkpoint: the weights plus pickled objects
    (callbacks keyed by their class, a callback instance) and training state."""
    callback = ModelCheckpoint("logs/checkpoints")
    return {
        "epoch": 12,
        "global_step": 34567,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x"}},
        "trainer_callbacks": [callback],
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
        "lr_schedulers": [],
        "state_dict": collections.OrderedDict(state_dict),
    }


def random_state_dict(yaml_text: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for the VQGAN of ``yaml_text``, plus ``loss.`` entries as a trained
    checkpoint has (discriminator weights, not used for inference)."""
    from dalle_vae_taming.config import parse_vqgan_config
    from dalle_vae_taming.network import TamingVQGAN

    torch.manual_seed(seed)
    state = TamingVQGAN(parse_vqgan_config(yaml_text, "test config")).state_dict()
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    return state


@dataclass(frozen=True)
class VQGanFiles:
    """A config file, a checkpoint file, and their bytes."""

    config: Path
    model: Path

    @property
    def config_bytes(self) -> bytes:
        return self.config.read_bytes()

    @property
    def model_bytes(self) -> bytes:
        return self.model.read_bytes()


def write_vqgan(directory: Path, yaml_text: str, seed: int = 0) -> VQGanFiles:
    """Write ``model.yaml`` and ``last.ckpt`` (as taming's ``logs/<run>/`` folders hold them)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = VQGanFiles(directory / "model.yaml", directory / "last.ckpt")
    files.config.write_text(yaml_text)
    torch.save(lightning_checkpoint(random_state_dict(yaml_text, seed)), files.model)
    return files


#: the module of the classes in `write_uninstalled_lightning_vqgan`'s checkpoint
UNINSTALLED = "uninstalled_lightning"

UNINSTALLED_SOURCE = '''"""Classes shaped like Lightning's, written by the tests. Each import logs a line."""

with open({log!r}, "a") as handle:
    handle.write("imported\\n")


class AttributeDict(dict):
    """As ``lightning_fabric.utilities.data.AttributeDict``: a dict with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(key) from error

    def __setattr__(self, key, value):
        self[key] = value


class TaggedDict(dict):
    """A dict subclass whose objects also carry attributes."""


class Metrics(list):
    """A list subclass."""


class EarlyStopping:
    """A callback class: old Lightning versions key ``checkpoint["callbacks"]`` by it."""


class Namespace:
    """An object pickled with its attributes."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
'''


def write_uninstalled_lightning_vqgan(directory: Path, yaml_text: str, seed: int = 0) -> VQGanFiles:
    """`write_vqgan`, but the checkpoint's ``hyper_parameters`` is an ``AttributeDict`` (a dict
    subclass) holding a dict subclass with attributes, a list subclass (and the class itself),
    an object and a ``defaultdict``, and its ``callbacks`` are keyed by a callback class. Those
    classes live in the module `UNINSTALLED`, written to ``directory`` (each import of it
    appends a line to ``directory / "imports.log"``) and in ``sys.modules`` only while saving:
    afterwards it cannot be imported, as Lightning on a machine without it."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{UNINSTALLED}.py"
    source.write_text(UNINSTALLED_SOURCE.format(log=str(directory / "imports.log")))
    files = VQGanFiles(directory / "model.yaml", directory / "last.ckpt")
    files.config.write_text(yaml_text)
    spec = importlib.util.spec_from_file_location(UNINSTALLED, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[UNINSTALLED] = module
    try:
        spec.loader.exec_module(module)
        tagged = module.TaggedDict(monitor="val/rec_loss", mode="min")
        tagged.flags = {"readonly": True}
        hyper_parameters = module.AttributeDict(
            base_learning_rate=4.5e-6,
            config=tagged,
            metrics_class=module.Metrics,  # pickled before its object, which refers to it by memo
            metrics=module.Metrics(["val/rec_loss", "val/aeloss"]),
            args=module.Namespace(batch_size=8, gpus="0,"),
            history=collections.defaultdict(list, loss=[0.5, 0.25]),
        )
        checkpoint = {
            "hyper_parameters": hyper_parameters,  # first: what a loader without stand-ins refuses first
            "callbacks": {module.EarlyStopping: {"wait_count": 2, "best_score": torch.tensor(0.5)}},
            "epoch": 12,
            "global_step": 34567,
            "state_dict": collections.OrderedDict(random_state_dict(yaml_text, seed)),
        }
        torch.save(checkpoint, files.model)
    finally:
        del sys.modules[UNINSTALLED]
    return files


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
