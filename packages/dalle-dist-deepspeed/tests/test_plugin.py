"""Registration with dalle-core, and what a user sees without deepspeed, without a launcher or with
a configuration file that cannot be used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_deepspeed

from dalle_core.plugins import registry
from dalle_dist_deepspeed import DeepSpeedBackend
from dalle_train import cli

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_without_deepspeed(script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter in which ``import deepspeed`` fails."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['deepspeed'] = None\n" + script],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_registered_as_deepspeed_through_the_entry_point():
    entry = registry("backends")["deepspeed"]
    assert entry.package == "dalle-dist-deepspeed"
    assert entry.factory is DeepSpeedBackend and entry.metadata["requires"] == ("deepspeed",)
    assert "ZeRO" in entry.description


def test_imports_and_lists_itself_as_unusable_without_deepspeed():
    result = run_without_deepspeed(
        "import dalle_dist_deepspeed\n"
        "from dalle_train import cli\n"
        "cli.main(['plugins'])\n"
        "print('deepspeed' in sys.modules and sys.modules['deepspeed'] is not None)\n"
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("deepspeed "))
    assert "dalle-dist-deepspeed" in line and "no: deepspeed not installed" in line
    assert result.stdout.splitlines()[-1] == "False"  # nothing imported it


def test_choosing_it_without_deepspeed_says_what_to_install(tmp_path: Path):
    for flags in ("'--distributed-backend', 'deepspeed'", "'--deepspeed'"):
        result = run_without_deepspeed(
            "from dalle_train import cli\n"
            f"args = ['dalle', '--dataset', 'shapes', '--output-dir', {str(tmp_path)!r}, {flags}]\n"
            "sys.exit(cli.main(args))\n"
        )
        assert result.returncode == 2
        assert (
            "--distributed-backend deepspeed: 'deepspeed' (from dalle-dist-deepspeed) cannot be used here: "
            'deepspeed not installed; install it with: pip install "dalle-dist-deepspeed[deepspeed]"'
        ) in result.stderr


@needs_deepspeed
def test_without_a_launcher_the_error_names_both_launchers(
    tmp_path: Path, vae_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    args = ["dalle", "--dataset", "shapes", "--vae-path", str(vae_dir), "--output-dir", str(tmp_path / "a")]
    assert cli.main([*args, "--distributed-backend", "deepspeed"]) == 2
    error = capsys.readouterr().err
    assert (
        "--distributed-backend deepspeed: the deepspeed backend runs under a launcher that sets RANK" in error
    )
    assert "deepspeed --num_gpus N $(which dalle-train)" in error and "torchrun --nproc_per_node N" in error


def test_an_unreadable_configuration_file_is_a_flag_error(
    tmp_path: Path, vae_dir: Path, capsys: pytest.CaptureFixture[str]
):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": ')
    args = [
        "dalle",
        "--dataset",
        "shapes",
        "--vae-path",
        str(vae_dir),
        "--output-dir",
        str(tmp_path / "a"),
        "--deepspeed",
        "--deepspeed-config",
        str(bad),
    ]
    assert cli.main(args) == 2
    assert (
        f"--distributed-backend deepspeed: --deepspeed-config {bad}: not valid JSON"
        in capsys.readouterr().err
    )
    bad.write_text('{"zero_optimization": {"stage": 0}}')
    assert cli.main(args) == 2
    assert (
        '"zero_optimization.stage" of --deepspeed-config: ZeRO stage 0 is not one of 1, 2, 3'
        in capsys.readouterr().err
    )


def test_flag_kwargs_reach_the_backend():
    backend = DeepSpeedBackend(zero_stage=3, offload=True)
    assert (backend.zero_stage, backend.offload, backend.replicated) == (3, True, False)
    assert DeepSpeedBackend().zero_stage == 1 and DeepSpeedBackend(zero_stage=2).replicated is True
