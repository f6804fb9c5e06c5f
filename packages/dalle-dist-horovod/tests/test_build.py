"""`dalle_dist_horovod.build` without building: the C++17 patch, the cache's key and place, the
reuse of a cached wheel (nothing run), the atomic rename of a finished build, and what
``--install`` installs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dalle_dist_horovod import build

CMAKE_TOP = """cmake_minimum_required(VERSION 3.13)
set(CMAKE_CXX_STANDARD 14)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
    string(PREPEND GLOO_CMAKE "set(CMAKE_CXX_STANDARD 17)\\n")
"""
CMAKE_TORCH = """if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")
    set(CMAKE_CXX_STANDARD 14)
endif()
"""


LIBRARY = "horovod/torch/mpi_lib_v2.cpython-311-x86_64-linux-gnu.so"


def fake_wheel(path: Path, library: str = LIBRARY) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(library, b"ELF")
        archive.writestr("horovod-0.28.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: horovod\n")
    return path


def source_tree(root: Path, top: str = CMAKE_TOP, torch: str = CMAKE_TORCH) -> Path:
    (root / "horovod/torch").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(top)
    (root / "horovod/torch/CMakeLists.txt").write_text(torch)
    return root


def test_patch_raises_both_files_to_cxx17_and_nothing_else(tmp_path: Path) -> None:
    source = source_tree(tmp_path)
    patched = build.patch_cmake(source)
    assert [p.relative_to(source).as_posix() for p in patched] == list(build.CMAKE_FILES)
    top = (source / "CMakeLists.txt").read_text()
    assert top == CMAKE_TOP.replace("set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)")
    assert "    set(CMAKE_CXX_STANDARD 17)\nendif()" in (source / "horovod/torch/CMakeLists.txt").read_text()


@pytest.mark.parametrize("which", ["top", "torch"])
def test_patch_fails_clearly_when_the_line_is_not_there(tmp_path: Path, which: str) -> None:
    texts = {"top": CMAKE_TOP, "torch": CMAKE_TORCH}
    texts[which] = texts[which].replace("STANDARD 14", "STANDARD 20")
    source = source_tree(tmp_path, texts["top"], texts["torch"])
    with pytest.raises(build.BuildError, match=r"no line 'set\(CMAKE_CXX_STANDARD 14\)'") as error:
        build.patch_cmake(source)
    assert ("horovod/torch/CMakeLists.txt" in str(error.value)) == (which == "torch")


def test_patch_fails_clearly_when_a_file_is_missing(tmp_path: Path) -> None:
    source = source_tree(tmp_path)
    (source / "horovod/torch/CMakeLists.txt").unlink()
    with pytest.raises(build.BuildError, match="missing from Horovod's sources"):
        build.patch_cmake(source)


def test_cache_location_follows_dalle_cache_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DALLE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert build.default_cache() == tmp_path / "home/.cache/dalle/wheels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.default_cache() == tmp_path / "xdg/dalle/wheels"
    monkeypatch.setenv("DALLE_CACHE", str(tmp_path / "dalle"))
    assert build.default_cache() == tmp_path / "dalle/wheels"


def test_the_key_names_horovod_torch_python_and_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build.cache_key("0.28.1", "2.13.0+cpu", "cp311", "linux_x86_64") == \
        "horovod-0.28.1-torch2.13.0+cpu-cp311-linux_x86_64"
    assert build.python_tag() == f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert "-" not in build.platform_tag() and "." not in build.platform_tag()
    monkeypatch.setattr(build, "torch_version", lambda: "9.9.9")
    assert build.cache_directory(Path("/c")).name.startswith("horovod-0.28.1-torch9.9.9-cp")


def test_a_cached_wheel_is_used_without_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = build.cache_directory(tmp_path)
    target.mkdir(parents=True)
    wheel = fake_wheel(target / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ran {args} although the wheel is cached")

    monkeypatch.setattr(build, "run", refuse)
    assert build.build(tmp_path) == wheel


def test_a_build_is_renamed_into_place_when_finished_and_its_temp_folder_removed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command the build runs, in order, with pip and the compiler replaced by fakes."""
    commands: list[list[str]] = []
    built_in: list[Path] = []

    def fake_run(command: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        commands.append(command)
        if "download" in command:
            where = Path(command[command.index("-d") + 1])
            sdist = tmp_path / "sdist-src/horovod-0.28.1"
            source_tree(sdist)
            (sdist / "setup.py").write_text("")
            where.mkdir(parents=True)
            subprocess.run(["tar", "czf", str(where / "horovod-0.28.1.tar.gz"), "-C", str(sdist.parent),
                            "horovod-0.28.1"], check=True)
        if "wheel" in command[3:4]:
            assert env is not None
            assert env["HOROVOD_WITH_PYTORCH"] == "1" and env["HOROVOD_WITHOUT_MPI"] == "1"
            source = Path(command[-1])
            assert "STANDARD 17" in (source / "horovod/torch/CMakeLists.txt").read_text()
            out = Path(command[command.index("-w") + 1])
            out.mkdir(parents=True)
            fake_wheel(out / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl")
            built_in.append(out)

    monkeypatch.setattr(build, "run", fake_run)
    monkeypatch.setattr(build, "find_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(build, "find_cmake", lambda constraint, progress: "/usr/bin/cmake")
    cache = tmp_path / "cache"
    wheel = build.build(cache)
    assert wheel.parent == build.cache_directory(cache)
    assert zipfile.ZipFile(wheel).namelist()[0] == LIBRARY
    assert (wheel.parent / "build-info.json").is_file()
    assert [c[3] for c in commands] == ["install", "download", "wheel"]
    assert "--no-build-isolation" in commands[2] and "--no-deps" in commands[2]
    assert commands[1][4:] [:4] == ["horovod==0.28.1", "--no-deps", "--no-binary", ":all:"]
    assert sorted(p.name for p in cache.iterdir()) == [wheel.parent.name]  # no temp folder left
    assert built_in[0].parent.parent == cache  # built beside the target, then renamed
    assert "patched horovod/torch/CMakeLists.txt: C++ standard 14 -> 17" in capsys.readouterr().out


def test_a_wheel_without_the_torch_library_at_its_place_is_refused(tmp_path: Path) -> None:
    """What Horovod's CMake does to a source path with a ``+`` (read as a regular expression)."""
    misplaced = fake_wheel(tmp_path / "a.whl", "root/torch2.13.0+cpu/horovod/torch/mpi_lib_v2.so")
    with pytest.raises(build.BuildError, match=r"lacks horovod/torch/mpi_lib_v2\.\*\.so"):
        build.check_wheel(misplaced)
    build.check_wheel(fake_wheel(tmp_path / "b.whl"))


def test_sources_are_compiled_where_the_path_is_no_regular_expression(tmp_path: Path) -> None:
    assert build.source_root(tmp_path / "plain") == tmp_path / "plain/src"
    elsewhere = build.source_root(tmp_path / "torch2.13.0+cpu")
    try:
        assert "+" not in str(elsewhere) and elsewhere.is_dir()
    finally:
        elsewhere.rmdir()


def test_a_broken_cached_wheel_is_built_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = build.cache_directory(tmp_path)
    target.mkdir(parents=True)
    fake_wheel(target / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl", "root/elsewhere/mpi_lib_v2.so")
    monkeypatch.setattr(build, "find_compiler", lambda: (_ for _ in ()).throw(build.BuildError("building")))
    with pytest.raises(build.BuildError, match="building"):
        build.build(tmp_path)


def test_a_failed_build_leaves_no_cache_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing(command: list[str], **kwargs: object) -> None:
        raise build.BuildError("command failed")

    monkeypatch.setattr(build, "run", failing)
    monkeypatch.setattr(build, "find_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(build, "find_cmake", lambda constraint, progress: "/usr/bin/cmake")
    with pytest.raises(build.BuildError):
        build.build(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler found .*apt-get install g\\+\\+"):
        build.find_compiler()


def test_install_pins_torch_and_installs_the_wheel_without_dependencies(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = tmp_path / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("horovod-0.28.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: horovod\n"
                         "Requires-Dist: cloudpickle\nRequires-Dist: psutil\nRequires-Dist: pyyaml\n"
                         "Requires-Dist: packaging\nRequires-Dist: cffi>=1.4.0\n"
                         "Requires-Dist: torch; extra == \"pytorch\"\n")
    assert build.wheel_requirements(wheel) == ["cloudpickle", "psutil", "pyyaml", "packaging", "cffi>=1.4.0"]
    commands: list[tuple[list[str], str]] = []

    def fake_run(command: list[str], **kwargs: object) -> None:
        constraint = command[command.index("-c") + 1] if "-c" in command else ""
        commands.append((command, Path(constraint).read_text() if constraint else ""))

    monkeypatch.setattr(build, "run", fake_run)
    monkeypatch.setattr(build, "torch_version", lambda: "2.13.0+cpu")
    monkeypatch.setattr(build.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, "0.28.1", ""))
    build.install(wheel)
    (deps, constraint), (install, _) = commands
    assert deps[3:6] == ["install", "-c", deps[5]]
    assert deps[6:] == ["cloudpickle", "psutil", "pyyaml", "packaging", "cffi>=1.4.0"]
    assert constraint == "torch==2.13.0+cpu\n"
    assert install[3:] == ["install", "--no-deps", "--force-reinstall", str(wheel)]


def test_print_path_names_the_cache_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--cache", str(tmp_path), "--print-path"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == build.cache_directory(tmp_path.resolve())
