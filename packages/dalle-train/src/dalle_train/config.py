"""Typed configuration of the training commands: their flags, parsed once into frozen sections.

A command's flags become one `TrainConfig` (``vae``, ``dalle`` and ``clip`` each extend it with
their model and task sections) by `TrainConfig.from_args`, right after argparse; the upstream
spellings (``--fp16``, ``--amp``, ``--lr_decay``, ``--wandb``) are resolved there, and nothing
downstream reads the argparse namespace. Each part of the program gets the sections it needs.

Every field of a section is named after the flag that sets it (``learning_rate`` is
``--learning-rate``); a field set by other flags too names them in its metadata (`option`).
Runs save their sections as JSON (`TrainConfig.saved`), and ``--resume`` merges them back
(`TrainConfig.resumed`): a field whose flags the user did not give takes the saved value, a
given field that shapes the model or names the data (``fixed``) must equal the saved one.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dalle_train.data.shards import is_local
from dalle_train.errors import TrainError
from dalle_train.training.precision import precision_from_flags

S = TypeVar("S", bound="Section")
C = TypeVar("C", bound="TrainConfig")


def option(default: Any = dataclasses.MISSING, *, flags: tuple[str, ...] = (), fixed: bool = False) -> Any:
    """A section field. ``flags``: the ``dest`` of every flag that sets it, when not only its own
    name (``precision`` is also set by ``--fp16`` and ``--amp``); ``fixed``: a resumed run must
    keep the checkpoint's value (it shapes the model or names the data)."""
    return field(default=default, metadata={"flags": flags, "fixed": fixed})


def _flags(item: dataclasses.Field) -> tuple[str, ...]:
    return item.metadata.get("flags") or (item.name,)


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


class Section:
    """Base of the frozen config sections: built from the parsed flags by field name, saved as
    JSON, merged back on resume."""

    #: whether runs save this section (and a resume takes it from the checkpoint); False for
    #: what only says where and how this process runs
    saved: ClassVar[bool] = True

    @classmethod
    def from_args(cls: type[S], args: argparse.Namespace) -> S:
        """The section from argparse's namespace: each field from the flag of its name (a field
        with a default may be missing: flags of runs saved before it existed)."""
        values = {item.name: getattr(args, item.name) for item in fields(cls)  # type: ignore[arg-type]
                  if hasattr(args, item.name) or item.default is dataclasses.MISSING}
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """Field -> JSON value (paths as strings)."""
        return {item.name: _shown(getattr(self, item.name)) for item in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def path_fields(cls) -> frozenset[str]:
        """The fields that hold a `Path` (saved as strings)."""
        hints = typing.get_type_hints(cls)
        return frozenset(name for name, hint in hints.items()
                         if hint is Path or Path in typing.get_args(hint))

    def resumed(self: S, saved: dict[str, Any], given: frozenset[str], differences: list[str]) -> S:
        """This section with every field not given on the command line taken from ``saved``;
        a given ``fixed`` field that differs from it is appended to ``differences``. Fields
        the checkpoint lacks (new in this version) keep their parsed value; saved fields this
        version lacks are ignored."""
        changes, paths = {}, self.path_fields()
        for item in fields(self):  # type: ignore[arg-type]
            if item.name not in saved:
                continue
            value = saved[item.name]
            if item.name in paths and value is not None:
                value = Path(value)
            if not given & set(_flags(item)):
                changes[item.name] = value
            elif item.metadata.get("fixed") and getattr(self, item.name) != value:
                differences.append(f"{_flag_name(_flags(item)[0])} {_shown(getattr(self, item.name))} "
                                   f"(checkpoint: {_shown(value)})")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Launch(Section):
    """Where and how this process runs; never saved with a run."""

    saved: ClassVar[bool] = False

    output_dir: Path
    resume: bool
    start_fresh: bool
    device: str
    threads: int | None
    #: the ``dest`` of every flag written on the command line
    given: frozenset[str] = frozenset()
    #: a checkpoint to continue exactly, named otherwise than by ``--resume`` (``--dalle-path``)
    resume_from: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Launch:
        return cls(output_dir=args.output_dir, resume=args.resume, start_fresh=args.start_fresh,
                   device=args.device, threads=args.threads, given=frozenset(getattr(args, "given", ())))


@dataclass(frozen=True)
class Distribution(Section):
    """How the processes of a run train together; never saved (a run may resume on another
    backend or number of processes)."""

    saved: ClassVar[bool] = False
    #: a registered distributed backend: none (one process), ddp or fsdp (dalle-train), or one a plugin adds
    backend: str = option("none", flags=("distributed_backend", "deepspeed"))
    #: DeepSpeed's ZeRO stage (1, 2 or 3); None: the backend's default
    zero_stage: int | None = None
    #: DeepSpeed: keep the optimizer's state on the CPU (ZeRO-Offload)
    offload: bool = False
    #: DeepSpeed: a JSON configuration merged with what the flags say
    deepspeed_config: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Distribution:
        backend = args.distributed_backend
        if args.deepspeed:
            if backend not in ("none", "deepspeed"):
                raise TrainError(f"--deepspeed means --distributed-backend deepspeed; it cannot be combined "
                                 f"with --distributed-backend {backend}")
            backend = "deepspeed"
        given = {"--zero-stage": args.zero_stage is not None, "--offload": args.offload,
                 "--deepspeed-config": args.deepspeed_config is not None}
        if backend != "deepspeed" and any(given.values()):
            named = ", ".join(flag for flag, set_ in given.items() if set_)
            raise TrainError(f"{named}: only the deepspeed backend reads it; add --distributed-backend "
                             f"deepspeed (or --deepspeed), or leave it out with --distributed-backend "
                             f"{backend}")
        return cls(backend=backend, zero_stage=args.zero_stage, offload=args.offload,
                   deepspeed_config=args.deepspeed_config)

    def backend_options(self) -> dict[str, Any]:
        """The keyword arguments the backend's factory is given (the engine flags that were set)."""
        options: dict[str, Any] = {}
        if self.zero_stage is not None:
            options["zero_stage"] = self.zero_stage
        if self.offload:
            options["offload"] = True
        if self.deepspeed_config is not None:
            options["config_file"] = str(self.deepspeed_config)
        return options


@dataclass(frozen=True)
class Optimization(Section):
    """How the model is optimized: length, batches, AdamW, the schedule, precision, the seed."""

    seed: int
    epochs: int
    max_steps: int | None
    batch_size: int
    ga_steps: int
    learning_rate: float
    weight_decay: float
    #: None: no clipping (``--clip-grad-norm 0``)
    clip_grad_norm: float | None
    lr_schedule: str = option(flags=("lr_schedule", "lr_decay"))
    lr_decay_rate: float = 0.98
    warmup_steps: int = 0
    #: fp32, bf16 or fp16, whichever of ``--precision``, ``--fp16``, ``--amp`` said it
    precision: str = option("fp32", flags=("precision", "fp16", "amp"))
    compile: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optimization:
        return cls(
            seed=args.seed, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            ga_steps=args.ga_steps, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
            clip_grad_norm=args.clip_grad_norm or None,
            lr_schedule="plateau" if args.lr_decay else args.lr_schedule, lr_decay_rate=args.lr_decay_rate,
            warmup_steps=args.warmup_steps,
            precision=precision_from_flags(args.precision, args.fp16, args.amp),
            compile=args.compile,
        )


@dataclass(frozen=True)
class Checkpointing(Section):
    """When checkpoints are written and how many are kept."""

    save_every_n_steps: int
    #: None: keep all
    keep_n_checkpoints: int | None


@dataclass(frozen=True)
class Logging(Section):
    """Metrics and pictures: how often, and where besides ``OUT/metrics.jsonl``."""

    log_every: int
    sample_every: int
    tensorboard: bool
    #: the W&B project (``--wandb-name``, or ``dalle-train`` for a bare ``--wandb``); None: no W&B
    wandb_project: str | None = option(flags=("wandb_name", "wandb"))
    wandb_entity: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Logging:
        return cls(log_every=args.log_every, sample_every=args.sample_every, tensorboard=args.tensorboard,
                   wandb_project=args.wandb_name or ("dalle-train" if args.wandb else None),
                   wandb_entity=args.wandb_entity)


@dataclass(frozen=True, kw_only=True)
class Data(Section):
    """What both kinds of data share: a built-in dataset instead of a folder, RGBA, workers."""

    dataset: str | None = option(fixed=True)
    dataset_size: int = option(fixed=True)
    transparent: bool = option(fixed=True)
    num_workers: int = 0

    #: the flag that names the folder (in messages); its destination is the folder's field
    folder_flag: ClassVar[str]

    @property
    def folder(self) -> Path | None:
        """The folder the data comes from (None: the built-in ``dataset``)."""
        return getattr(self, self.folder_flag[2:].replace("-", "_"))


@dataclass(frozen=True, kw_only=True)
class ImageData(Data):
    """Images without captions (``dalle-train vae``): a folder or a built-in dataset."""

    folder_flag: ClassVar[str] = "--image-folder"
    image_folder: Path | None = option(fixed=True)


@dataclass(frozen=True, kw_only=True)
class CaptionedData(Data):
    """Image-text pairs (``dalle``, ``clip``): a folder or a built-in dataset."""

    folder_flag: ClassVar[str] = "--image-text-folder"
    #: a folder; with ``wds``, shards (a file, folder, brace-expanded list or URL, as given)
    image_text_folder: str | None = option(fixed=True)
    random_resize_crop_lower_ratio: float = 0.75
    truncate_captions: bool = False
    #: ``--wds IMAGE_KEY,CAPTION_KEY``: the folder names WebDataset shards; None: a folder of files
    wds: str | None = option(None, fixed=True)
    wds_caption_field: str = "caption"
    resample_shards: bool = False
    #: ``--tokens DIR``: pre-encoded shards (``dalle-train encode``) instead of images
    tokens: str | None = option(None, fixed=True)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CaptionedData:
        """As `Section.from_args`, with a folder's path in its normal form (``data/`` is
        ``data``) and a URL as written."""
        section = super().from_args(args)
        source = section.image_text_folder
        if source is not None and is_local(source):
            section = dataclasses.replace(section, image_text_folder=str(Path(source)))
        return section


@dataclass(frozen=True)
class TrainConfig:
    """A training command's configuration: the sections every training command has. Each
    command's subclass adds its model (and task) sections; every section but ``launch`` and
    ``distributed`` is saved with the run."""

    launch: Launch
    distributed: Distribution
    optim: Optimization
    checkpoints: Checkpointing
    logging: Logging

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace) -> C:
        """Every section from the parsed flags (the only reader of argparse's namespace)."""
        hints = typing.get_type_hints(cls)
        return cls(**{item.name: hints[item.name].from_args(args) for item in fields(cls)})

    def saved(self) -> dict[str, dict[str, Any]]:
        """The sections that define the run, as JSON (stored with every checkpoint)."""
        return {item.name: section.to_json() for item, section in self._sections() if section.saved}

    def resumed(self: C, saved: dict[str, dict[str, Any]]) -> C:
        """This configuration merged with a checkpoint's `saved` sections (see `Section.resumed`);
        given fixed fields that differ from the checkpoint are one `TrainError` listing each."""
        differences: list[str] = []
        sections = {
            item.name: section.resumed(saved[item.name], self.launch.given, differences)
            for item, section in self._sections() if section.saved and item.name in saved
        }
        if differences:
            raise TrainError(
                "these flags differ from the checkpoint being resumed: " + "; ".join(sorted(differences))
                + ". Drop them to keep the checkpoint's values, or pass --start-fresh to begin a new run"
            )
        return dataclasses.replace(self, **sections)

    def sections_of_flags(self, flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """`saved` of a run written before the configuration was typed (its checkpoints store
        the flat flags): each section built from them as from the command line."""
        args = argparse.Namespace(**flags)
        hints = typing.get_type_hints(type(self))
        return {item.name: hints[item.name].from_args(args).to_json()
                for item, section in self._sections() if section.saved}

    def _sections(self) -> list[tuple[dataclasses.Field, Section]]:
        return [(item, getattr(self, item.name)) for item in fields(self)]
