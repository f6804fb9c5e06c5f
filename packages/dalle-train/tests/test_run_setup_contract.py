"""Run set-up's promises, checked in-process on the ``vae`` command's flags without training:

- ``--resume`` takes every flag not given from the checkpoint (a path flag as a path), keeps the
  given ones, and refuses given model flags that differ, listing each difference;
  ``--resume`` (or a checkpoint to resume from) and ``--start-fresh`` contradict;
  ``--start-fresh`` deletes the checkpoints; existing checkpoints need one of the two;
- the count flags (and ``--max-steps``) below 1 are refused naming the flag, 1 is accepted;
- every run, loop and logging flag reaches the prepared run; the saved configuration is its
  sections as JSON values, without the one that only says where and how this process runs;
  every flag of a training command is read into exactly one field of its configuration;
  checkpoints of runs written before the configuration was typed (flat flags) still resume;
- `fit` hands the optimizer and schedule flags and the prepared run to the loop, closes the
  metrics whatever happens, and ends with the line and exit code of how the run ended;
- ``--device`` and unreadable checkpoints give one-line errors naming what the user gave.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import SHAPES, TINY_VAE

from dalle_core import DiscreteVAE
from dalle_core.backends import SingleProcessBackend
from dalle_train.cli import build_parser, given_flags
from dalle_train.commands import common
from dalle_train.commands.clip import ClipConfig
from dalle_train.commands.common import CONFIG_KEY, device_from_flag, load_model, prepare_run
from dalle_train.commands.dalle import DalleConfig
from dalle_train.commands.vae import VaeConfig
from dalle_train.config import Distribution, Launch, Section, TrainConfig, option
from dalle_train.errors import TrainError
from dalle_train.training.checkpoints import save_checkpoint
from dalle_train.training.layout import CHECKPOINTS, LATEST
from dalle_train.training.loop import LoopSettings, Outcome
from dalle_train.training.metrics import SilentMetrics
from dalle_train.training.precision import Precision


def namespace(command: str, *argv: str) -> argparse.Namespace:
    args = build_parser().parse_args([command, *argv])
    args.given = given_flags([command, *argv])
    return args


def parse(*argv: str) -> VaeConfig:
    return VaeConfig.from_args(namespace("vae", *argv))


def resuming_from(config: VaeConfig, directory: Path | None) -> VaeConfig:
    """``config`` continuing ``directory`` (as ``dalle --dalle-path`` of a run's checkpoint sets it)."""
    return replace(config, launch=replace(config.launch, resume_from=directory))


class Metrics:
    """Stands in for `MetricsLog`: records what it was opened with."""

    def __init__(self, out: Path, **options: Any) -> None:
        self.out, self.options = out, options

        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "MetricsLog", Metrics)


def one_line_error(call: Any) -> str:
    with pytest.raises(TrainError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def a_run(out: Path, model: DiscreteVAE, *flags: str) -> dict[str, Any]:
    """``OUT/checkpoints/step-2`` as a run with ``flags`` would have saved it; its state."""
    state = {"step": 2, "run": {CONFIG_KEY: parse(*SHAPES, *TINY_VAE, *flags).saved()}}
    save_checkpoint(out / CHECKPOINTS, 2, model, state, keep=None)
    return state


def test_every_flag_reaches_the_prepared_run(tmp_path: Path, metrics: None) -> None:
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    config = parse(*SHAPES, *TINY_VAE, "--output-dir", str(out), "--threads", str(threads), "--seed", "5",
                   "--device", "cpu", "--precision", "bf16", "--epochs", "3", "--max-steps", "7",
                   "--ga-steps", "2", "--clip-grad-norm", "0.5", "--save-every-n-steps", "4",
                   "--keep-n-checkpoints", "2", "--log-every", "6", "--sample-every", "9", "--tensorboard",
                   "--wandb-name", "proj", "--wandb-entity", "team", "--image-folder", str(tmp_path))
    run = prepare_run(config)
    assert run.out == out and run.device == torch.device("cpu") and torch.get_num_threads() == threads
    bf16 = Precision("bf16", torch.device("cpu"))
    assert run.settings == LoopSettings(precision=bf16, batch_size=4, epochs=3, max_steps=7, ga_steps=2,
                                        clip_grad_norm=0.5, save_every=4, keep=2, log_every=6, sample_every=9)
    saved = config.saved()
    assert run.config == config and run.saved() == {CONFIG_KEY: saved}
    assert run.resume_from is None and run.resume_state is None
    assert isinstance(run.metrics, Metrics) and run.metrics.out == out
    assert run.metrics.options == {"tensorboard": True, "wandb_project": "proj", "wandb_entity": "team",
                                   "config": saved}
    assert saved["data"]["image_folder"] == str(tmp_path) and saved["optim"]["seed"] == 5
    assert "launch" not in saved


def test_seed_fp16_spellings_plateau_and_no_clipping(tmp_path: Path, metrics: None) -> None:
    config = parse(*SHAPES, *TINY_VAE, "--output-dir", str(tmp_path), "--seed", "7", "--amp", "--lr-decay",
                   "--clip-grad-norm", "0", "--wandb")
    run = prepare_run(config)
    drawn = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(4))
    assert run.settings.precision.name == "fp16" and run.settings.clip_grad_norm is None
    assert config.optim.lr_schedule == "plateau"
    assert run.settings.max_steps is None and run.settings.keep is None
    assert run.metrics.options["wandb_project"] == "dalle-train"
    assert run.metrics.options["tensorboard"] is False
    for spelling in ("--fp16", "--precision fp16"):
        again = prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path), *spelling.split()))
        assert again.settings.precision.name == "fp16"
    plain = prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path)))
    assert plain.settings.precision.name == "fp32" and plain.metrics.options["wandb_project"] is None
    assert plain.settings.clip_grad_norm is None and plain.settings.epochs == 20


@pytest.mark.parametrize("flag", ["batch_size", "ga_steps", "epochs", "save_every_n_steps", "log_every",
                                  "max_steps"])
def test_counts_below_one_are_refused_naming_the_flag(tmp_path: Path, flag: str, metrics: None) -> None:
    option = f"--{flag.replace('_', '-')}"
    for value in ("0", "-2"):
        config = parse(*SHAPES, "--output-dir", str(tmp_path), option, value)
        with pytest.raises(TrainError, match=f"^{option} must be at least 1, got {value}$"):
            prepare_run(config)
    prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path), option, "1"))  # 1 is enough


def test_resume_and_start_fresh_contradict(tmp_path: Path, vae_dir: Path, metrics: None, capsys) -> None:
    out = tmp_path / "run"
    a_run(out, DiscreteVAE.from_pretrained(vae_dir))
    message = "--resume and --start-fresh contradict each other: pick one"
    both = parse("--output-dir", str(out), "--resume", "--start-fresh")
    assert one_line_error(lambda: prepare_run(both)) == message
    from_a_checkpoint = resuming_from(parse("--output-dir", str(out), "--start-fresh"),
                                      out / CHECKPOINTS / "step-2")
    assert one_line_error(lambda: prepare_run(from_a_checkpoint)) == message
    assert (out / CHECKPOINTS / LATEST).is_file()
    assert one_line_error(lambda: prepare_run(parse(*SHAPES, "--output-dir", str(out)))) == (
        f"{out / CHECKPOINTS} already holds checkpoints (latest: step-2): pass --resume to continue that "
        f"run, --start-fresh to replace it, or another --output-dir")
    capsys.readouterr()
    run = prepare_run(parse(*SHAPES, "--output-dir", str(out), "--start-fresh"))
    assert capsys.readouterr().out == f"--start-fresh: removed {out / CHECKPOINTS}\n"
    assert not (out / CHECKPOINTS).exists() and run.resume_from is None and run.resume_state is None
    prepare_run(parse(*SHAPES, "--output-dir", str(out), "--start-fresh"))  # nothing to remove
    assert capsys.readouterr().out == ""


def test_resume_takes_the_flags_not_given_from_the_checkpoint(tmp_path: Path, vae_dir: Path,
                                                              metrics: None) -> None:
    out, other = tmp_path / "run", tmp_path / "other"
    model = DiscreteVAE.from_pretrained(vae_dir)
    state = a_run(out, model, "--image-folder", "/data/a", "--learning-rate", "0.01", "--seed", "3")
    config = parse("--resume", "--output-dir", str(out), "--max-steps", "9", "--image-size", "32",
                   "--image-folder", "/data/a", "--learning-rate", "0.02")
    run = prepare_run(config)
    assert run.resume_from == out / CHECKPOINTS / "step-2" and run.resume_state == state
    resumed = run.config
    assert resumed.data.image_folder == Path("/data/a") and resumed.data.dataset == "shapes"
    assert (resumed.model.image_size, resumed.model.num_tokens, resumed.model.emb_dim) == (32, 16, 8)
    assert (resumed.optim.seed, resumed.optim.max_steps, resumed.optim.learning_rate) == (3, 9, 0.02)
    assert resumed.optim.batch_size == 4 and resumed.launch == config.launch
    assert run.settings.max_steps == 9 and run.saved() == {CONFIG_KEY: resumed.saved()}
    # a checkpoint of another run to resume from (`dalle --dalle-path OTHER/checkpoints/step-2`)
    other_state = a_run(other, model, "--seed", "4")
    new = parse("--output-dir", str(tmp_path / "new"))
    run = prepare_run(resuming_from(new, other / CHECKPOINTS / "step-2"))
    assert run.resume_from == other / CHECKPOINTS / "step-2" and run.resume_state == other_state
    assert run.config.optim.seed == 4 and run.out == tmp_path / "new"
    config = resuming_from(parse("--output-dir", str(out)), None)  # `dalle` without --dalle-path
    assert "already holds checkpoints" in one_line_error(lambda: prepare_run(config))


def test_resume_refuses_differing_model_flags_listing_each(tmp_path: Path, vae_dir: Path,
                                                            metrics: None) -> None:
    out = tmp_path / "run"
    a_run(out, DiscreteVAE.from_pretrained(vae_dir), "--image-folder", "/data/a")
    config = parse("--resume", "--output-dir", str(out), "--image-size", "64", "--image-folder", "/data/b",
                   "--num-layers", "3", "--learning-rate", "0.5")
    assert one_line_error(lambda: prepare_run(config)) == (
        "these flags differ from the checkpoint being resumed: --image-folder /data/b (checkpoint: /data/a); "
        "--image-size 64 (checkpoint: 32). Drop them to keep the checkpoint's values, "
        "or pass --start-fresh to begin a new run")


@dataclass(frozen=True)
class Part(Section):
    """A section as a later version might have it: ``cache`` new, ``depth`` set by two flags."""

    data: Path | None
    cache: Path = option(Path("/c"), fixed=True)
    depth: int = option(2, flags=("depth", "deep"), fixed=True)


def test_a_section_takes_saved_values_as_its_types_and_ignores_what_it_lacks() -> None:
    differences: list[str] = []
    part = Part(data=Path("default"), cache=Path("/mine"))
    saved = {"data": "/saved", "depth": 3, "retired_flag": 1}
    resumed = part.resumed(saved, frozenset({"cache"}), differences)
    assert resumed == Part(data=Path("/saved"), cache=Path("/mine"), depth=3) and differences == []
    assert isinstance(resumed.data, Path)  # saved as a string
    assert Part(None).resumed({"data": None}, frozenset(), differences).data is None
    # a field given through another of its flags is the user's, and a fixed one must match
    kept = Part(data=None, depth=5).resumed({"data": None, "depth": 3}, frozenset({"deep"}), differences)
    assert kept.depth == 5 and differences == ["--depth 5 (checkpoint: 3)"]
    assert Part(data=None).to_json() == {"data": None, "cache": "/c", "depth": 2}


def test_how_a_process_runs_is_never_taken_from_a_checkpoint() -> None:
    config = parse("--distributed-backend", "ddp", "--output-dir", "here")
    saved = {**config.saved(), "distributed": {"backend": "deepspeed"},
             "launch": {"output_dir": "elsewhere", "resume": True}}
    resumed = config.resumed(saved)
    assert resumed.distributed.backend == "ddp" and resumed.launch == config.launch


def test_runs_saved_with_flat_flags_resume(tmp_path: Path, vae_dir: Path, metrics: None) -> None:
    """Checkpoints written before the configuration was typed stored the flat flags."""
    out = tmp_path / "run"
    flat = {"image_folder": "/data/a", "dataset": None, "dataset_size": 4000, "transparent": False,
            "num_workers": 0, "image_size": 32, "num_tokens": 16, "num_layers": 2, "num_resnet_blocks": 0,
            "emb_dim": 8, "hidden_dim": 8, "smooth_l1_loss": False, "kl_loss_weight": 0.0,
            "straight_through": False, "reinmax": False, "starting_temp": 1.0, "temp_min": 0.5,
            "anneal_rate": 1e-6, "num_images_save": 4, "seed": 3, "precision": None, "fp16": False,
            "amp": True, "compile": False, "tensorboard": False, "wandb": True, "wandb_name": None,
            "wandb_entity": None, "log_every": 10, "sample_every": 100, "epochs": 20, "max_steps": 6,
            "batch_size": 4, "ga_steps": 1, "learning_rate": 0.01, "weight_decay": 0.0,
            "clip_grad_norm": None, "lr_schedule": "exponential", "lr_decay": True, "lr_decay_rate": 0.98,
            "warmup_steps": 0, "save_every_n_steps": 1000, "keep_n_checkpoints": None}
    save_checkpoint(out / CHECKPOINTS, 2, DiscreteVAE.from_pretrained(vae_dir),
                    {"step": 2, "run": {"flags": flat}}, keep=None)
    resumed = prepare_run(parse("--resume", "--output-dir", str(out))).config
    assert resumed.data.image_folder == Path("/data/a") and resumed.model.image_size == 32
    assert (resumed.optim.seed, resumed.optim.max_steps, resumed.optim.precision) == (3, 6, "fp16")
    assert resumed.optim.lr_schedule == "plateau" and resumed.logging.wandb_project == "dalle-train"


def test_the_saved_configuration_is_every_section_but_how_this_process_runs(tmp_path: Path) -> None:
    config = parse(*SHAPES, "--output-dir", str(tmp_path), "--image-folder", str(tmp_path), "--resume",
                   "--device", "cpu", "--distributed-backend", "ddp")
    saved = config.saved()
    kept = [item.name for item in fields(config) if item.name not in ("launch", "distributed")]
    assert list(saved) == kept and config.distributed.backend == "ddp"
    assert saved == {name: asdict(getattr(config, name)) | (
        {"image_folder": str(tmp_path)} if name == "data" else {}) for name in kept}
    assert json.loads(json.dumps(saved)) == saved


#: flags a training command accepts without a configuration field: argparse's own, and
#: upstream's single checkpoint file name (checkpoints are OUT/checkpoints/step-N here)
#: parsed but not configuration: the subcommand, the launcher's --local_rank (backends read LOCAL_RANK)
NOT_CONFIG = {"command", "run", "given", "dalle_output_file_name", "local_rank"}


@pytest.mark.parametrize("command,config_class", [("vae", VaeConfig), ("dalle", DalleConfig),
                                                  ("clip", ClipConfig)])
def test_every_flag_is_read_into_the_configuration(command: str, config_class: type[TrainConfig]) -> None:
    """Each flag of a training command reaches exactly one field of its configuration (a flag
    added without one would be parsed and never used), and every field is some flag's."""
    dests = set(vars(namespace(command, *SHAPES))) - NOT_CONFIG
    read: list[str] = [item.name for item in fields(Launch) if item.name not in ("given", "resume_from")]
    config = config_class.from_args(namespace(command, *SHAPES))
    for section in fields(config):
        if section.name != "launch":
            read += [flag for item in fields(getattr(config, section.name))
                     for flag in item.metadata.get("flags") or (item.name,)]
    assert sorted(read) == sorted(dests)


def test_device_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_from_flag("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_from_flag("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_from_flag("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError) as torch_error:
        torch.device("nonsense")
    assert one_line_error(lambda: device_from_flag("nonsense")) == (
        f"--device nonsense: not usable here ({str(torch_error.value).splitlines()[0]}); "
        f"try cpu, cuda, cuda:1 or auto")
    message = one_line_error(lambda: device_from_flag("cuda:99"))
    assert message.startswith("--device cuda:99: not usable here (") and "None" not in message


def test_load_model_names_the_checkpoint(tmp_path: Path, vae_dir: Path) -> None:
    assert load_model(DiscreteVAE, vae_dir).num_tokens == 16
    assert one_line_error(lambda: load_model(DiscreteVAE, tmp_path)).startswith(f"checkpoint {tmp_path}: ")


def test_fit_runs_the_loop_with_the_flags_and_says_how_it_ended(
        tmp_path: Path, metrics: None, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "run"
    config = parse(*SHAPES, "--output-dir", str(out), "--learning-rate", "0.03", "--weight-decay", "0.1",
                   "--lr-schedule", "cosine", "--warmup-steps", "2", "--lr-decay-rate", "0.9",
                   "--epochs", "3", "--ga-steps", "2")
    run = prepare_run(config)
    run.resume_state = {"step": 1}
    task = SimpleNamespace(model=torch.nn.Linear(2, 3))
    batches = SimpleNamespace(batches_per_epoch=10)
    calls: list[tuple[Any, ...]] = []
    endings = iter([Outcome(step=15, checkpoint=out / "step-15", last_loss=0.123456),
                    Outcome(step=4, checkpoint=out / "step-4", interrupted_by=15),
                    Outcome(step=0, checkpoint=None, interrupted_by=2, last_loss=None)])

    def train(task: Any, batches: Any, optimizer: Any, schedule: Any, settings: Any, out: Path, metrics: Any,
              config: Any, resume_state: Any, backend: Any, resume_dir: Path | None) -> Outcome:
        calls.append((task, batches, optimizer, schedule, settings, out, metrics, config, resume_state,
                      backend, resume_dir))
        return next(endings)

    monkeypatch.setattr(common, "train", train)
    capsys.readouterr()
    assert common.fit(task, batches, run) == 0
    assert capsys.readouterr().out == f"done: step 15, loss 0.1235; checkpoint {out / 'step-15'}\n"
    assert run.metrics.closed
    got_task, got_batches, optimizer, schedule, *rest = calls[0]
    assert got_task is task and got_batches is batches
    assert rest == [run.settings, run.out, run.metrics, {CONFIG_KEY: config.saved()}, run.resume_state,
                    run.backend, run.resume_from]
    assert run.backend.plugin_name == "none"
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        (0.03, 0.1, 1), (0.03, 0.0, 1)]
    assert schedule.optimizer is optimizer and schedule.schedule == "cosine"
    assert (schedule.total, schedule.warmup, schedule.decay_rate) == (15, 2, 0.9)  # 3 epochs of 10 / 2

    assert common.fit(task, batches, run) == 128 + 15
    assert capsys.readouterr().out == (f"stopped by signal 15 at step 4; checkpoint {out / 'step-4'}; "
                                       f"continue with: --resume --output-dir {out}\n")
    assert common.fit(task, batches, run) == 128 + 2
    assert capsys.readouterr().out == (f"stopped by signal 2 at step 0; no checkpoint; "
                                       f"continue with: --resume --output-dir {out}\n")

    def failing(*args: Any) -> Outcome:
        raise RuntimeError("boom")

    monkeypatch.setattr(common, "train", failing)
    run.metrics.closed = False
    with pytest.raises(RuntimeError, match="boom"):
        common.fit(task, batches, run)
    assert run.metrics.closed


class Second(SingleProcessBackend):
    """Stands in for process ``rank`` of ``world_size`` (no process group)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self._rank, self._world = rank, world_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world


def test_a_distributed_run_is_announced_seeded_per_process_and_logged_by_the_root(
        tmp_path: Path, metrics: None, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    config = parse(*SHAPES, "--output-dir", str(tmp_path), "--seed", "7", "--batch-size", "3",
                   "--ga-steps", "2")
    monkeypatch.setattr(common, "start_backend", lambda name: Second(0, 2))
    capsys.readouterr()
    run = prepare_run(config)
    assert capsys.readouterr().out == (
        "distributed: none, 2 processes x --batch-size 3 x --ga-steps 2 = 12 samples per optimizer step; "
        "--learning-rate 0.001 is used as given (not scaled with the processes)\n")
    assert isinstance(run.metrics, Metrics)
    monkeypatch.setattr(common, "start_backend", lambda name: Second(1, 2))
    run = prepare_run(config)
    drawn = torch.rand(3)
    torch.manual_seed(7 + 1)
    assert torch.equal(drawn, torch.rand(3))  # seed + rank
    assert isinstance(run.metrics, SilentMetrics) and capsys.readouterr().out == ""
    monkeypatch.setattr(common, "start_backend", lambda name: Second(0, 1))
    prepare_run(config)
    assert capsys.readouterr().out == ""  # one process: nothing to announce


def test_a_process_other_than_the_root_exits_quietly_with_the_run(
        tmp_path: Path, metrics: None, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(common, "start_backend", lambda name: Second(1, 2))
    run = prepare_run(parse(*SHAPES, "--output-dir", str(tmp_path)))
    task, batches = SimpleNamespace(model=torch.nn.Linear(2, 3)), SimpleNamespace(batches_per_epoch=10)
    endings = iter([Outcome(step=5, checkpoint=None, last_loss=0.5), Outcome(step=2, checkpoint=None,
                                                                            interrupted_by=15)])
    monkeypatch.setattr(common, "train", lambda *args: next(endings))
    capsys.readouterr()
    assert common.fit(task, batches, run) == 0
    assert common.fit(task, batches, run) == 128 + 15
    assert capsys.readouterr().out == ""


def test_backend_names_and_spellings_are_read_exactly() -> None:
    with pytest.raises(TrainError) as caught:
        common.start_backend("nope")
    assert str(caught.value).startswith("--distributed-backend nope: unknown distributed backend 'nope'")
    engine = {"zero_stage": None, "offload": False, "deepspeed_config": None}
    both = argparse.Namespace(distributed_backend="deepspeed", deepspeed=True, **engine)
    assert Distribution.from_args(both).backend == "deepspeed"
    assert Distribution.from_args(both).backend_options() == {}


@pytest.mark.parametrize("flags, named", [
    (["--zero-stage", "3"], "--zero-stage"), (["--offload"], "--offload"),
    (["--deepspeed-config", "ds.json", "--zero-stage", "2"], "--zero-stage, --deepspeed-config"),
])
def test_deepspeed_flags_reach_its_factory_and_no_other_backend(flags: list[str], named: str) -> None:
    with pytest.raises(TrainError, match=f"^{named}: only the deepspeed backend reads it; add "
                                         f"--distributed-backend deepspeed .* --distributed-backend ddp$"):
        parse(*flags, "--distributed-backend", "ddp")
    options = parse(*flags, "--deepspeed").distributed.backend_options()
    expected = {"--zero-stage": ("zero_stage", int(flags[-1]) if "--zero-stage" in flags else None),
                "--offload": ("offload", True), "--deepspeed-config": ("config_file", "ds.json")}
    assert options == {key: value for flag, (key, value) in expected.items() if flag in flags}


def test_the_backend_is_built_with_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[str, dict[str, Any]]] = []

    def create(name: str, **options: Any) -> SingleProcessBackend:
        built.append((name, options))
        return SingleProcessBackend()

    monkeypatch.setattr(common, "create_backend", create)
    assert common.start_backend("deepspeed", zero_stage=3).plugin_name == "none"
    assert built == [("deepspeed", {"zero_stage": 3})]


def test_flags_are_read_as_typed() -> None:
    bare = argparse.Namespace(output_dir=Path("o"), resume=False, start_fresh=False, device="cpu",
                              threads=None)
    assert Launch.from_args(bare).given == frozenset()
    assert parse("--compile").optim.compile is True and parse().optim.compile is False
