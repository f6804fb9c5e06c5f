"""An error or skip report about bad input names the input that is bad, and no other.

Each case puts good files beside exactly one bad one, ``charlie``, among ``alpha``, ``bravo``,
``delta`` and ``echo`` (no name is part of another, and the bad one sits in the middle of the
scan order), then checks that the report or the error names charlie's file, names none of the
good ones, and counts one skip of the right kind. The same holds for the paths given to the
commands: with one bad path among good ones, the error names the bad one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import test_generate
from conftest import TINY_DALLE, TINY_VAE
from test_data_folder import image_bytes, put
from test_flags_reach_model import TINY_CLIP

from dalle_train import cli
from dalle_train.data import ImageFolder, ImageTextFolder
from dalle_train.data.folder import _FolderDataset
from dalle_train.data.report import KINDS

# fixtures of test_generate: a tiny saved DALLE and CLIP, and only dalle-core's plugins (autouse)
model_dir, clip_dir = test_generate.model_dir, test_generate.clip_dir
only_builtin_plugins = test_generate.only_builtin_plugins

GOOD = ("alpha", "bravo", "delta", "echo")
BAD = "charlie"
CAPTION = "a small square"


def make_folder(root: Path, names: tuple[str, ...] = (*GOOD[:2], BAD, *GOOD[2:])) -> Path:
    """A picture and a one-line caption for each name."""
    for seed, name in enumerate(names):
        put(root, f"{name}.png", image_bytes(seed=seed))
        put(root, f"{name}.txt", CAPTION)
    return root


def assert_names_only_the_bad_file(text: str, bad: Path) -> None:
    assert str(bad) in text, f"{bad.name} is not named in: {text}"
    for name in GOOD:
        assert f"{name}." not in text, f"a good file, {name}, is named in: {text}"


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "dalle_train.data" and r.levelno >= logging.WARNING]


def error_line(capsys) -> str:
    """The command's one-line error (the progress bar shares stderr, and may still hold its line)."""
    err = capsys.readouterr().err
    assert err.count("dalle-train ") == 1, err
    return err[err.index("dalle-train "):].splitlines()[0]


# ---------------------------------------------------------------- one bad file, one skip report


def truncated(root: Path) -> Path:
    return put(root, f"{BAD}.png", image_bytes(size=(64, 64))[:200])


def not_an_image(root: Path) -> Path:
    (root / f"{BAD}.png").unlink()
    return put(root, f"{BAD}.jpg", b"<html>not a picture</html>")


def without_caption(root: Path) -> Path:
    (root / f"{BAD}.txt").unlink()
    return root / f"{BAD}.png"


def without_image(root: Path) -> Path:
    (root / f"{BAD}.png").unlink()
    return root / f"{BAD}.txt"


def empty_caption(root: Path) -> Path:
    return put(root, f"{BAD}.txt", " \n\t\n")


def latin1_caption(root: Path) -> Path:
    return put(root, f"{BAD}.txt", b"caf\xe9 au lait")


def deleted_image(root: Path) -> Path:
    (root / f"{BAD}.png").unlink()
    return root / f"{BAD}.png"


#: what breaks charlie (returning the file to be named) and the kind of skip it is
DAMAGE = {
    "truncated image": (truncated, "corrupt_image"),
    "not an image": (not_an_image, "corrupt_image"),
    "image without caption": (without_caption, "missing_caption"),
    "caption without image": (without_image, "missing_image"),
    "empty caption": (empty_caption, "empty_caption"),
    "caption not UTF-8": (latin1_caption, "unreadable_caption"),
    "image deleted after the scan": (deleted_image, "corrupt_image"),
}
#: damage done after the dataset was made (so not through the commands)
AFTER_SCAN = ("image deleted after the scan",)
#: what the VAE's image folder can have wrong (captions are not read there)
IMAGE_DAMAGE = ("truncated image", "not an image", "image deleted after the scan")


@pytest.mark.parametrize("dataset, damage", [
    *((ImageTextFolder, damage) for damage in DAMAGE),
    *((ImageFolder, damage) for damage in IMAGE_DAMAGE),
])
def test_one_bad_file_is_the_one_reported(tmp_path, caplog, dataset, damage):
    caplog.set_level(logging.WARNING)
    root = make_folder(tmp_path / "data")
    breaks, kind = DAMAGE[damage]
    if damage in AFTER_SCAN:
        data, bad = dataset(root, 16), breaks(root)
    else:
        bad = breaks(root)
        data = dataset(root, 16)
    samples = [data.load(index, epoch) for epoch in range(2) for index in range(len(data))]
    assert data.report.as_dict() == {**dict.fromkeys(KINDS, 0), kind: 1, "total": 1}
    assert data.report.sources(kind) == [str(bad)]
    (warning,) = warnings(caplog)  # once, though every image was loaded in two epochs
    assert_names_only_the_bad_file(warning, bad)
    loaded = {Path(sample.source).stem for sample in samples if sample is not None}
    assert loaded == set(GOOD)


@pytest.mark.parametrize("channels", [3, 4])
def test_images_in_other_modes_are_read_and_only_the_broken_one_is_reported(tmp_path, caplog, channels):
    """No mode is "wrong" for --transparent or without it: grayscale, palette, RGBA and CMYK
    files are converted; only the file that cannot be decoded is skipped."""
    caplog.set_level(logging.WARNING)
    root = tmp_path / "modes"
    for name, mode, fmt in zip(GOOD, ("L", "P", "RGBA", "CMYK"), ("PNG", "PNG", "PNG", "JPEG")):
        put(root, f"{name}.{fmt.lower()}", image_bytes(mode, fmt=fmt))
        put(root, f"{name}.txt", CAPTION)
    put(root, f"{BAD}.txt", CAPTION)
    bad = put(root, f"{BAD}.png", image_bytes("LA")[:100])
    data = ImageTextFolder(root, 16, channels=channels)
    samples = [data[index] for index in range(len(data))]
    assert data.report.as_dict()["corrupt_image"] == data.report.count() == 1
    assert_names_only_the_bad_file(" ".join(warnings(caplog)), bad)
    assert sorted(s.image.shape[0] for s in samples if s is not None) == [channels] * len(GOOD)


# ---------------------------------------------------------------------- through the commands


def train_argv(command: str, root: Path, vae: Path, out: Path) -> list[str]:
    """One step of ``command`` on ``root`` with a tiny model, in batches of 4."""
    model = {"dalle": [*TINY_DALLE, "--vae-path", str(vae)], "vae": TINY_VAE, "clip": TINY_CLIP}[command]
    folder = "--image-folder" if command == "vae" else "--image-text-folder"
    return [command, folder, str(root), *model, "--batch-size", "4", "--max-steps", "1", "--threads", "1",
            "--sample-every", "0", "--output-dir", str(out)]


@pytest.mark.parametrize("command, damage", [
    *(("dalle", damage) for damage in DAMAGE if damage not in AFTER_SCAN),
    ("vae", "truncated image"),
    ("clip", "empty caption"),
])
def test_training_reports_the_bad_file_and_goes_on(tmp_path, vae_dir, caplog, capsys, command, damage):
    caplog.set_level(logging.WARNING)
    root = make_folder(tmp_path / "data")
    breaks, kind = DAMAGE[damage]
    bad = breaks(root)
    assert cli.main(train_argv(command, root, vae_dir, tmp_path / "run")) == 0
    (warning,) = warnings(caplog)
    assert_names_only_the_bad_file(warning, bad)
    if kind != "corrupt_image":  # found by the scan: counted in the line that announces the data
        announced = next(line for line in capsys.readouterr().out.splitlines() if str(root) in line)
        assert announced.endswith(f"(skipped 1 sample: 1 {KINDS[kind][0]})")


@pytest.mark.parametrize("command", ["dalle", "clip"])
def test_a_worker_process_reports_the_bad_file(tmp_path, vae_dir, caplog, command):
    caplog.set_level(logging.WARNING)
    root = make_folder(tmp_path / "data")
    bad = truncated(root)
    # nothing is loaded in the main process: --eval-size 0 (CLIP), --sample-prompts (DALLE)
    alone = ["--eval-size", "0"] if command == "clip" else ["--sample-prompts", "a"]
    argv = [*train_argv(command, root, vae_dir, tmp_path / "run"), *alone, "--batch-size", "5"]
    assert cli.main([*argv, "--num-workers", "1"]) == 0
    (warning,) = warnings(caplog)  # ValueError when there is none
    assert_names_only_the_bad_file(warning, bad)


@pytest.mark.parametrize("command", ["dalle", "clip"])
def test_caption_too_long_names_its_file(tmp_path, vae_dir, capsys, command):
    root = make_folder(tmp_path / "data")
    put(root, f"{BAD}.txt", "a caption far longer than forty-eight bytes, which is the text length here\n")
    one_batch = ["--batch-size", "5", *(["--eval-size", "0"] if command == "clip" else [])]
    assert cli.main([*train_argv(command, root, vae_dir, tmp_path / "run"), *one_batch]) == 2
    error = error_line(capsys)
    assert error.startswith(f"dalle-train {command}: error: the caption of ")
    assert_names_only_the_bad_file(error, root / f"{BAD}.png")
    assert "--text-seq-len 48" in error and "--truncate-captions" in error


def test_generate_names_the_prompt_that_is_too_long(model_dir, tmp_path, capsys):
    long = "charlie is a prompt far too long for sixteen"
    argv = ["generate", "--dalle-path", str(model_dir), "--text", f"alpha one|{long}|bravo two",
            "--num-images", "1", "--seed", "1", "--device", "cpu", "--outputs-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    error = error_line(capsys)
    assert repr(long) in error and "alpha one" not in error and "bravo two" not in error


@pytest.mark.parametrize("command, message", [
    ("vae", "none of the first 5 images could be read"),  # its reconstruction images, read first
    ("dalle", "no image of epoch 0 could be read"),
    ("clip", "no image of epoch 0 could be read"),
])
def test_a_folder_where_no_image_can_be_read_is_an_error(
    tmp_path, vae_dir, capsys, monkeypatch, command, message
):
    root = tmp_path / "data"
    for name in (*GOOD, BAD):
        put(root, f"{name}.png", image_bytes(size=(64, 64))[:200])
        put(root, f"{name}.txt", CAPTION)
    loads = []
    real_load = _FolderDataset._image

    def load(self, path, generator):
        loads.append(path)
        assert len(loads) < 200, "still looking for a readable image after 200 tries"
        return real_load(self, path, generator)

    monkeypatch.setattr(_FolderDataset, "_image", load)
    assert cli.main(train_argv(command, root, vae_dir, tmp_path / "run")) == 2
    error = error_line(capsys)
    assert message in error


# ------------------------------------------------------------- one bad path among good ones


@pytest.fixture
def paths(tmp_path, vae_dir, model_dir, clip_dir) -> dict[str, Path]:
    """Good and bad paths by name (those a row uses together are not the start of each other)."""
    made = {"pairs": make_folder(tmp_path / "pairs"), "vae": vae_dir, "dalle": model_dir, "clip": clip_dir,
            "missing": tmp_path / "nowhere-at-all", "file": tmp_path / "pairs" / f"{BAD}.png",
            "broken-config": tmp_path / "broken-config", "broken-weights": tmp_path / "broken-weights",
            "no-pairs": tmp_path / "only-captions"}
    put(made["broken-config"], "config.json", "{not json")
    test_generate.tiny_vae().save_pretrained(made["broken-weights"])
    (made["broken-weights"] / "model.safetensors").write_bytes(b"\0" * 64)
    put(made["no-pairs"], f"{BAD}.txt", CAPTION)
    return made


TRAINING = [*TINY_DALLE, "--max-steps", "1"]
#: (argv with {name} for the paths of the fixture above, the name of the one bad path)
BAD_PATHS = [
    (["dalle", "--image-text-folder", "{missing}", "--vae-path", "{vae}", *TRAINING], "missing"),
    (["dalle", "--image-text-folder", "{file}", "--vae-path", "{vae}", *TRAINING], "file"),
    (["dalle", "--image-text-folder", "{no-pairs}", "--vae-path", "{vae}", *TRAINING], "no-pairs"),
    (["dalle", "--image-text-folder", "{pairs}", "--vae-path", "{missing}", *TRAINING], "missing"),
    (["dalle", "--image-text-folder", "{pairs}", "--vae-path", "{broken-config}", *TRAINING],
     "broken-config"),
    (["dalle", "--image-text-folder", "{pairs}", "--vae-path", "{broken-weights}", *TRAINING],
     "broken-weights"),
    (["dalle", "--image-text-folder", "{pairs}", "--dalle-path", "{missing}", "--max-steps", "1"], "missing"),
    (["vae", "--image-folder", "{missing}", *TINY_VAE], "missing"),
    (["clip", "--image-text-folder", "{missing}", *TINY_CLIP], "missing"),
    (["generate", "--dalle-path", "{missing}", "--text", "a"], "missing"),
    (["generate", "--dalle-path", "{dalle}", "--text", "a", "--clip-path", "{missing}"], "missing"),
    (["generate", "--dalle-path", "{dalle}", "--text", "a", "--clip-path", "{broken-weights}"],
     "broken-weights"),
    (["generate", "--dalle-path", "{dalle}", "--text", "a", "--vae-path", "{missing}"], "missing"),
    (["generate", "--dalle-path", "{dalle}", "--text", "a", "--vae-path", "{broken-config}"],
     "broken-config"),
]


@pytest.mark.parametrize("argv, bad", BAD_PATHS, ids=[
    f"{argv[0]} {argv[argv.index('{' + bad + '}') - 1]} {bad}" for argv, bad in BAD_PATHS])
def test_error_names_the_bad_path_and_no_good_one(paths, tmp_path, capsys, argv, bad):
    given = [word[1:-1] for word in argv if word.startswith("{")]
    argv = [str(paths[word[1:-1]]) if word.startswith("{") else word for word in argv]
    out = ["--outputs-dir" if argv[0] == "generate" else "--output-dir", str(tmp_path / "out")]
    assert cli.main([*argv, *out]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert str(paths[bad]) in error, error
    for name in given:
        if name != bad:
            assert str(paths[name]) not in error, f"the good path {name} is named: {error}"
