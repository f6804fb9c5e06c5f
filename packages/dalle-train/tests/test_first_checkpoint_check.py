"""The first checkpoint of a run is read back before it is published: a model (or VAE) whose
save and load do not agree stops the run there, with nothing published; a good one changes
nothing about the run (its random streams included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dalle_core.pretrained import PretrainedMixin
from dalle_train.errors import TrainError
from dalle_train.training.checkpoints import step_dirs
from dalle_train.training.layout import CHECKPOINTS, LATEST
from dalle_train.training.loop import LoopSettings, Task, train
from dalle_train.training.optim import Schedule
from dalle_train.training.precision import Precision
from dalle_train.training.reload_check import FirstCheckpointCheck, codes_of, vae_of, weights_problem


class Coder(PretrainedMixin, nn.Module):
    """A VAE-like model: codes are ``argmax`` of a 1x1 convolution, shifted by one when ``flip``."""

    image_size, channels, num_tokens, fmap_size = 4, 3, 5, 4

    def __init__(self, flip: bool = False, remember_flip: bool = True) -> None:
        super().__init__()
        self.flip = flip
        self.config: dict[str, Any] = {"flip": flip} if remember_flip else {}
        self.to_logits = nn.Conv2d(3, 5, 1)

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, 4, 4] -> [B, 16]
        codes = self.to_logits(images).argmax(1).flatten(1)
        return (codes + 1) % self.num_tokens if self.flip else codes


class Train(Task):
    """Loss: the mean of the model's weights times the batch."""

    name = "check"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def loss(self, batch: float, step: int) -> torch.Tensor:
        weights = torch.cat([p.flatten() for p in self.model.parameters()])
        return weights.mean() * batch + torch.rand(()) * 0  # draws from the global generator

    def batch_size(self, batch: float) -> int:
        return 1

    def write_samples(self, step: int, directory: Path) -> dict[str, Path | float]:
        return {}


class Ones:
    batches_per_epoch, epoch = None, 0

    def __iter__(self):
        while True:
            yield 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NoMetrics:
    def log(self, step: int, values: dict[str, Any]) -> None:
        pass


def run(model: nn.Module, out: Path) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = LoopSettings(Precision("fp32", torch.device("cpu")), max_steps=4, save_every=2, log_every=2)
    train(Train(model), Ones(), optimizer, Schedule(optimizer, "constant", 4), settings, out, NoMetrics(), {})


def test_a_model_whose_checkpoint_reloads_differently_stops_at_the_first_save_unpublished(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(TrainError) as caught:
        run(Coder(flip=True, remember_flip=False), tmp_path)  # from_pretrained builds flip=False
    assert str(caught.value).startswith(
        "the run's first checkpoint does not reload as it was saved: its VAE (Coder) gives other codes "
        "for the same images after reloading (")
    assert "its save_pretrained and from_pretrained do not agree. The run stops now" in str(caught.value)
    checkpoints = tmp_path / CHECKPOINTS
    assert step_dirs(checkpoints) == [] and not (checkpoints / LATEST).exists()
    assert [p.name for p in checkpoints.iterdir()] == [".tmp-step-2"]  # deleted when the next run starts


def test_a_checkpoint_that_cannot_be_read_back_is_named(tmp_path):
    model = Coder()
    model.extra = nn.Parameter(torch.ones(1))  # added after construction: from_pretrained has no place for it
    with pytest.raises(TrainError, match=r"first checkpoint does not reload as it was saved: it cannot be "
                                         r"read back \(KeyError: .*unexpected keys \['extra'\]"):
        run(model, tmp_path)


def test_a_good_checkpoint_is_checked_without_changing_the_run(tmp_path, monkeypatch):
    checked: list[Path] = []

    class Counting(FirstCheckpointCheck):
        def __call__(self, model: nn.Module, load: Any, directory: Path, whole: bool) -> None:
            checked.append(directory)
            super().__call__(model, load, directory, whole)

    class Unchecked(FirstCheckpointCheck):
        def __init__(self, model: nn.Module) -> None:
            pass

        def __call__(self, *args: Any) -> None:
            pass

    torch.manual_seed(0)
    run(Coder(flip=True), tmp_path / "checked")
    after_checked = torch.rand(3)
    monkeypatch.setattr("dalle_train.training.loop.FirstCheckpointCheck", Counting)
    torch.manual_seed(0)
    run(Coder(flip=True), tmp_path / "counted")
    assert [p.name for p in checked] == [".tmp-step-2"]  # the first save only
    monkeypatch.setattr("dalle_train.training.loop.FirstCheckpointCheck", Unchecked)
    torch.manual_seed(0)
    run(Coder(flip=True), tmp_path / "unchecked")
    assert torch.equal(torch.rand(3), after_checked)  # reloading drew from no generator of the run
    saved = [torch.load(tmp_path / run_ / CHECKPOINTS / "step-4" / "training" / "state.pt",
                        weights_only=True)["rng"]["torch"] for run_ in ("checked", "unchecked")]
    assert torch.equal(saved[0], saved[1])


def reload_problem(model: nn.Module, reloaded: nn.Module, whole: bool = True) -> str | None:
    return FirstCheckpointCheck(model).problem(model, reloaded, whole)


def test_the_problem_names_what_differs():
    model = Coder()
    same = Coder()
    same.load_state_dict(model.state_dict())
    assert reload_problem(model, same) is None
    other = Coder()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.to_logits.bias.add_(1)
    assert reload_problem(model, other) == "the weight to_logits.bias has other values after reloading"
    assert reload_problem(nn.Linear(2, 2), nn.Linear(2, 3)) == (
        "the weight weight has other values after reloading")
    renamed = nn.Sequential(nn.Linear(2, 2))
    assert reload_problem(nn.Linear(2, 2), renamed) == (
        "the weights ['bias', 'weight'] are missing and ['0.bias', '0.weight'] are new after reloading")
    holder = nn.Module()
    holder.vae = model
    assert reload_problem(holder, nn.Module()).startswith("the weights ['vae.to_logits.bias'")
    emptied = nn.Module()
    emptied.vae = nn.Module()
    emptied.vae.to_logits = Coder().to_logits
    emptied.vae.to_logits.load_state_dict(model.to_logits.state_dict())
    assert reload_problem(holder, emptied) == "the reloaded model has no VAE (Coder before)"


def test_a_frozen_vae_is_encoded_before_training_and_a_trained_one_only_when_whole():
    frozen = Coder(flip=True).requires_grad_(False)
    check = FirstCheckpointCheck(frozen)
    assert check.frozen_codes is not None and check.frozen_codes.shape == (2, 16)
    with torch.no_grad():
        frozen.to_logits.bias[0] += 100  # codes taken now would differ: the ones from the start are used
    reloaded = Coder(flip=True)
    reloaded.load_state_dict(frozen.state_dict())
    assert check.problem(frozen, reloaded, whole=False) is not None  # the codes before training differ
    trained = Coder(flip=True, remember_flip=False)
    forgetful = Coder(flip=False, remember_flip=False)
    forgetful.load_state_dict(trained.state_dict())
    assert FirstCheckpointCheck(trained).frozen_codes is None
    assert "gives other codes" in reload_problem(trained, forgetful, whole=True)
    assert reload_problem(trained, forgetful, whole=False) is None  # sharded: its weights were compared


def test_the_check_tells_the_comparison_whether_the_vae_may_run_here(tmp_path):
    trained = Coder(flip=True, remember_flip=False)
    forgetful = Coder(flip=False, remember_flip=False)  # same weights, other codes
    forgetful.load_state_dict(trained.state_dict())
    check = FirstCheckpointCheck(trained)
    check(trained, lambda directory: forgetful, tmp_path, whole=False)  # sharded: its weights compared
    with pytest.raises(TrainError, match="gives other codes"):
        check(trained, lambda directory: forgetful, tmp_path, whole=True)


def test_the_weights_compared_are_named_when_only_lost_or_only_gained():
    one, two = {"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.ones(1)}
    assert weights_problem(two, one) == "the weights ['b'] are missing and none are new after reloading"
    assert weights_problem(one, two) == "the weights none are missing and ['b'] are new after reloading"
    assert weights_problem(two, {"a": torch.zeros(2), "b": torch.ones(1)}) is None


def test_weights_kept_in_half_precision_are_compared_as_saved():
    saved = {"w": torch.tensor([0.1, 1 / 3], dtype=torch.float16), "n": torch.tensor([3, 4])}
    assert weights_problem(saved, {"w": saved["w"].float(), "n": torch.tensor([3, 4])}) is None
    # fp32 master weights read back, whose half copies the engine holds: equal once rounded
    assert weights_problem(saved, {"w": torch.tensor([0.1, 1 / 3]), "n": torch.tensor([3, 4])}) is None
    assert weights_problem(saved, {"w": saved["w"].float() + 1e-2, "n": torch.tensor([3, 4])}) == (
        "the weight w has other values after reloading")


def test_a_model_without_a_vae_is_checked_by_its_weights_alone():
    model = nn.Linear(2, 2)
    check = FirstCheckpointCheck(model)
    assert check.vae is None and check.images is None and check.frozen_codes is None
    same = nn.Linear(2, 2)
    same.load_state_dict(model.state_dict())
    assert check.problem(model, same) is None


def test_the_vae_is_the_model_itself_or_its_vae_attribute():
    vae = Coder()
    holder = nn.Module()
    holder.vae = vae
    assert vae_of(vae) is vae and vae_of(holder) is vae
    not_callable = nn.Module()
    not_callable.get_codebook_indices = None
    assert vae_of(nn.Linear(1, 1)) is None and vae_of(not_callable) is None


def test_the_codes_compared_are_counted():
    model = Coder(flip=False)
    reloaded = Coder(flip=True)  # every code shifted by one
    reloaded.load_state_dict(model.state_dict())
    assert reload_problem(model, reloaded) == (
        "its VAE (Coder) gives other codes for the same images after reloading (32 of 32 differ): its "
        "save_pretrained and from_pretrained do not agree")
    # without `whole` the VAE being trained is encoded: every process holds it
    assert FirstCheckpointCheck(model).problem(model, reloaded) == reload_problem(model, reloaded)


def test_the_check_images_are_fixed_and_drawn_from_no_generator_of_the_run():
    models = Coder(), Coder(flip=True)  # their initial weights drawn before
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    first, second = (FirstCheckpointCheck(model) for model in models)
    assert torch.equal(torch.rand(4), expected)
    assert first.images.shape == (2, 3, 4, 4) and torch.equal(first.images, second.images)
    assert 0 <= first.images.min() and first.images.max() < 1 and first.images.std() > 0.1


class Flat:
    """A VAE that is not a torch module (a plugin may give one): codes are the mean brightness."""

    image_size, channels = 4, 3

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        return (images.mean(1).flatten(1) * 10).long()


def test_a_vae_that_is_not_a_module_is_encoded_once_before_training():
    holder = nn.Module()
    holder.vae = Flat()
    check = FirstCheckpointCheck(holder)
    assert torch.equal(check.frozen_codes, Flat().get_codebook_indices(check.images))
    again = nn.Module()
    again.vae = Flat()
    assert check.problem(holder, again, whole=False) is None


class ModeCoder(Coder):
    """Codes that show the mode they were taken in (all 0 in eval mode), on a VAE without weights."""

    def __init__(self) -> None:
        super().__init__()
        del self.to_logits
        self.modes: list[bool] = []

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return torch.full((images.shape[0], 16), int(self.training))


def test_the_vae_is_encoded_in_eval_mode_and_its_mode_put_back():
    for training in (True, False):
        vae = ModeCoder().train(training)
        assert codes_of(vae, torch.rand(2, 3, 4, 4)).tolist() == [[0] * 16] * 2
        assert vae.modes == [False] and vae.training is training


def test_a_checkpoint_that_fails_to_load_is_named_with_its_folder(tmp_path):
    model = Coder()

    def load(directory: Path) -> nn.Module:
        raise ValueError(f"no weights in {directory.name}")

    with pytest.raises(TrainError) as caught:
        FirstCheckpointCheck(model)(model, load, tmp_path / ".tmp-step-2", whole=True)
    assert str(caught.value) == (
        "the run's first checkpoint does not reload as it was saved: it cannot be read back (ValueError: "
        "no weights in .tmp-step-2). The run stops now rather than write checkpoints that cannot be used "
        f"(what was written is in {tmp_path / '.tmp-step-2'} until the next run starts)")


def test_a_good_reload_changes_no_random_generator():
    model = Coder()
    check = FirstCheckpointCheck(model)

    def load(directory: Path) -> nn.Module:
        reloaded = Coder()  # draws its initial weights
        reloaded.load_state_dict(model.state_dict())
        return reloaded

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    check(model, load, Path("unused"), whole=True)
    assert torch.equal(torch.rand(4), expected)
