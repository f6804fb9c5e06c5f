"""Build Horovod for the torch of this interpreter, cache the wheel, and optionally install it.

    python -m dalle_dist_horovod.build [--install] [--cache DIR] [--jobs N] [--rebuild]
    dalle-build-horovod --install

Horovod 0.28.1 (its last release) ships no wheels and its sources ask CMake for C++14, which
current torch headers refuse (they need C++17). This script:

1. downloads Horovod's source distribution from the package index
   (``pip download horovod==0.28.1 --no-deps --no-binary :all:``);
2. changes ``set(CMAKE_CXX_STANDARD 14)`` to 17 in its top ``CMakeLists.txt`` and in
   ``horovod/torch/CMakeLists.txt`` (a clear error if either line is not there);
3. builds a wheel with the torch already installed (``pip wheel --no-build-isolation --no-deps``,
   ``HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1``, without MPI, TensorFlow and MXNet);
4. keeps the wheel in ``<cache>/horovod-<horovod>-torch<torch>-<python>-<platform>/``, where
   ``<cache>`` is ``--cache`` or ``${DALLE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/dalle}/wheels``.
   A cached wheel for the same versions is used as it is, never rebuilt (``--rebuild`` forces).
   The build runs in a temporary folder beside it that is renamed into place when it succeeded,
   and the wheel is checked to hold ``horovod/torch/mpi_lib_v2.*.so``. (Horovod's CMake reads
   the source path as a regular expression: a ``+`` in it, as in ``torch2.13.0+cpu``, puts the
   library at a wrong place in the wheel, so the sources are compiled elsewhere when the cache's
   path has such characters.)
5. with ``--install``, installs the wheel (``--no-deps``) and Horovod's pure-Python runtime
   dependencies (cloudpickle, psutil, pyyaml, packaging, cffi) into this interpreter, under a
   constraint that keeps torch at the installed version.

The build is not isolated (it compiles against the installed torch): it installs what it needs
into this interpreter first (setuptools, wheel, packaging when missing, and Horovod's runtime
requirements, which its setup.py asks for while building). It needs a C++ compiler (``g++``, or
``$CXX``) and CMake 3.13 or newer (installed with pip when missing). A build takes minutes (3.5
to 6 measured on two cores; 23 measured elsewhere); each stage is announced with the time
elapsed, and the compiler's output is streamed.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

#: the Horovod release built (its last one)
HOROVOD_VERSION = "0.28.1"
#: files whose C++ standard is raised, relative to the source tree
CMAKE_FILES = ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")
CXX14_LINE = re.compile(r"^(\s*)set\(CMAKE_CXX_STANDARD 14\)[ \t]*$", re.MULTILINE)
#: what Horovod is built with: torch and gloo only
BUILD_ENVIRONMENT = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    # CMake 4 refuses projects asking for compatibility with CMake < 3.5 (gloo's, eigen's)
    "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
}
#: Horovod's runtime requirements when it is built with torch (from its setup.py), used when
#: the wheel's metadata cannot be read
RUNTIME_REQUIREMENTS = ("cloudpickle", "psutil", "pyyaml", "packaging", "cffi>=1.4.0")
#: what building needs in this interpreter besides torch (the build is not isolated)
BUILD_REQUIREMENTS = {"setuptools": "setuptools", "wheel": "wheel", "packaging": "packaging"}
MINIMUM_CMAKE = (3, 13)
#: Horovod's CMake uses its source path as a regular expression (SET_OUTPUT_DIR): a path with one
#: of these (e.g. the ``+`` of ``torch2.13.0+cpu``) puts the library at a wrong place in the wheel
REGEX_SPECIAL = set("+*?()[]{}^$|\\")
#: the library the wheel must hold (Horovod's torch extension)
TORCH_LIBRARY = re.compile(r"^horovod/torch/mpi_lib_v2\.[^/]*\.so$")


class BuildError(RuntimeError):
    """A step of the build failed; the message says which and what to do."""


class Progress:
    """One line per stage, with the time elapsed since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        print(f"[dalle-build-horovod {elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def default_cache() -> Path:
    """``${DALLE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/dalle}/wheels``."""
    root = os.environ.get("DALLE_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dalle")
    return Path(root) / "wheels"


def torch_version() -> str:
    """The installed torch's version (with its local label, e.g. ``2.13.0+cpu``), read from its
    metadata without importing it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            f"torch is not installed in {sys.executable}: install torch first, Horovod is built "
            "against the installed one"
        ) from None


def python_tag() -> str:
    """``cp311`` for CPython 3.11."""
    prefix = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name)
    return f"{prefix}{sys.version_info.major}{sys.version_info.minor}"


def platform_tag() -> str:
    """``linux_x86_64`` and the like."""
    return re.sub(r"[^A-Za-z0-9]+", "_", sysconfig.get_platform())


def cache_key(horovod: str, torch: str, python: str, platform: str) -> str:
    """Name of the folder holding the wheel built for these versions."""
    return f"horovod-{horovod}-torch{torch}-{python}-{platform}"


def cache_directory(cache: Path, horovod: str = HOROVOD_VERSION) -> Path:
    """Where the wheel for this interpreter, its torch and ``horovod`` is kept under ``cache``."""
    return cache / cache_key(horovod, torch_version(), python_tag(), platform_tag())


def cached_wheel(directory: Path) -> Path | None:
    """The wheel in a finished cache folder, or None."""
    wheels = sorted(directory.glob("horovod-*.whl")) if directory.is_dir() else []
    return wheels[0] if len(wheels) == 1 else None


def patch_cmake(source: Path) -> list[Path]:
    """Raise the C++ standard of Horovod's CMake files from 14 to 17 (torch's headers need 17);
    `BuildError` when a file lacks the line (Horovod's sources are not the ones expected)."""
    patched = []
    for name in CMAKE_FILES:
        path = source / name
        if not path.is_file():
            raise BuildError(f"cannot patch {path}: the file is missing from Horovod's sources")
        text = path.read_text()
        new, count = CXX14_LINE.subn(r"\1set(CMAKE_CXX_STANDARD 17)", text)
        if count == 0:
            raise BuildError(
                f"cannot patch {path}: no line 'set(CMAKE_CXX_STANDARD 14)' to raise to 17 "
                f"(this script patches Horovod {HOROVOD_VERSION}'s sources; these differ)"
            )
        path.write_text(new)
        patched.append(path)
    return patched


def run(command: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run ``command`` with its output streamed; `BuildError` naming it when it fails."""
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(list(command), env=env, cwd=cwd)
    if result.returncode != 0:
        raise BuildError(f"command failed with exit code {result.returncode}: {' '.join(command)}")


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    """``python -m pip ARGS`` for this interpreter."""
    run([sys.executable, "-m", "pip", *args], env=env)


def torch_constraint(directory: Path) -> Path:
    """A pip constraints file pinning torch at the installed version (so that no requirement
    makes pip replace it)."""
    path = directory / "torch-constraint.txt"
    path.write_text(f"torch=={torch_version()}\n")
    return path


def find_compiler() -> str:
    """The C++ compiler CMake will use: ``$CXX``, else ``g++`` or ``c++`` on the PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise BuildError(
        f"no C++ compiler found ({' or '.join(candidates)} not on the PATH): Horovod is C++ and "
        "needs one with C++17, e.g. apt-get install g++ (or set CXX)"
    )


def cmake_version(binary: str) -> tuple[int, ...] | None:
    """``cmake --version`` of ``binary`` as numbers, None when it does not run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"version\s*(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_cmake(constraint: Path, progress: Progress) -> str:
    """A CMake of at least 3.13: ``$HOROVOD_CMAKE``, the one on the PATH, or one installed with
    pip into this interpreter."""
    candidates = [os.environ.get("HOROVOD_CMAKE"), shutil.which("cmake"),
                  os.path.join(sysconfig.get_path("scripts"), "cmake")]
    for candidate in candidates:
        if candidate and (cmake_version(candidate) or (0,)) >= MINIMUM_CMAKE:
            return candidate
    progress("no CMake >= 3.13 found: installing it with pip")
    pip("install", "-c", str(constraint), "cmake>=3.13,<4")
    installed = os.path.join(sysconfig.get_path("scripts"), "cmake")
    if (cmake_version(installed) or (0,)) < MINIMUM_CMAKE:
        raise BuildError(f"pip installed cmake but {installed} does not run")
    return installed


def missing_modules(modules: dict[str, str]) -> list[str]:
    """The requirements (values) whose import names (keys) are not installed here."""
    import importlib.util

    return [requirement for module, requirement in modules.items()
            if importlib.util.find_spec(module) is None]


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional ``Requires-Dist`` (no extras), with their markers."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    except (OSError, StopIteration, zipfile.BadZipFile):
        return list(RUNTIME_REQUIREMENTS)
    requirements = metadata.get_all("Requires-Dist") or []
    return [r for r in requirements if not re.search(r"\bextra\s*==", r)]


def source_root(work: Path) -> Path:
    """Where to unpack and compile the sources: under ``work`` unless its path has characters
    that Horovod's CMake would read as a regular expression, else a new folder in the system's
    temporary directory."""
    if not REGEX_SPECIAL & set(str(work.resolve())):
        return work / "src"
    fallback = Path(tempfile.mkdtemp(prefix="dalle-build-horovod-"))
    if REGEX_SPECIAL & set(str(fallback.resolve())):
        raise BuildError(f"no folder to build in whose path lacks the characters "
                         f"{''.join(sorted(REGEX_SPECIAL))} (Horovod's CMake reads the source path as "
                         "a regular expression): set TMPDIR")
    return fallback


def check_wheel(wheel: Path) -> None:
    """`BuildError` unless the wheel holds Horovod's torch library at its place."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    if not any(TORCH_LIBRARY.match(name) for name in names):
        libraries = [name for name in names if name.endswith(".so")] or ["none"]
        raise BuildError(f"{wheel.name} lacks horovod/torch/mpi_lib_v2.*.so (its libraries: "
                         f"{', '.join(libraries)}): Horovod was built without torch support or in a "
                         "wrong place")


def extract(archive: Path, destination: Path) -> Path:
    """Unpack the sdist; the folder holding its ``setup.py``."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, filter="data")
        else:  # pragma: no cover (Python < 3.11.4)
            tar.extractall(destination)  # noqa: S202 (the index's sdist of a pinned release)
    roots = [p for p in destination.iterdir() if (p / "setup.py").is_file()]
    if len(roots) != 1:
        raise BuildError(f"unexpected layout of {archive.name}: no single folder with a setup.py")
    return roots[0]


def build(cache: Path, *, horovod: str = HOROVOD_VERSION, jobs: int | None = None,
          rebuild: bool = False, progress: Progress | None = None) -> Path:
    """The cached wheel of ``horovod`` for this interpreter and its torch, built first unless
    cached (or when ``rebuild``); returns its path."""
    progress = progress or Progress()
    target = cache_directory(cache, horovod)
    wheel = cached_wheel(target)
    if wheel and not rebuild:
        try:
            check_wheel(wheel)
        except (BuildError, OSError, zipfile.BadZipFile) as error:
            progress(f"the cached wheel is not usable, building it again: {error}")
        else:
            progress(f"using the cached wheel {wheel}")
            return wheel
    compiler = find_compiler()  # before anything is downloaded
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    sources = source_root(work)
    try:
        constraint = torch_constraint(work)
        progress(f"building Horovod {horovod} against torch {torch_version()} "
                 f"({python_tag()}, {platform_tag()}) in {work}")
        cmake = find_cmake(constraint, progress)
        needed = missing_modules(BUILD_REQUIREMENTS)
        # Horovod's setup.py asks for its runtime requirements while building (setup_requires):
        # installed first, setuptools does not fetch them itself
        progress(f"installing the build's requirements: {', '.join(needed + list(RUNTIME_REQUIREMENTS))}")
        pip("install", "-c", str(constraint), *needed, *RUNTIME_REQUIREMENTS)

        progress(f"downloading the source distribution of horovod=={horovod}")
        pip("download", f"horovod=={horovod}", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", "-d", str(work / "sdist"))
        archives = sorted((work / "sdist").glob("horovod-*.tar.gz"))
        if len(archives) != 1:
            raise BuildError(f"pip download gave no single horovod-*.tar.gz in {work / 'sdist'}")
        source = extract(archives[0], sources)

        for path in patch_cmake(source):
            progress(f"patched {path.relative_to(source)}: C++ standard 14 -> 17")

        env = {**os.environ, **BUILD_ENVIRONMENT, "HOROVOD_CMAKE": cmake, "CXX": compiler}
        if "MAKEFLAGS" not in os.environ:  # Horovod's default is -j8 whatever the machine
            env["MAKEFLAGS"] = f"-j{jobs or os.cpu_count() or 1}"
        progress(f"compiling with {compiler}, {cmake}, MAKEFLAGS={env.get('MAKEFLAGS')} "
                 "(minutes: 3.5 to 6 measured on two cores)")
        pip("wheel", "--no-build-isolation", "--no-deps", "-v", "-c", str(constraint),
            "-w", str(work / "wheel"), str(source), env=env)
        built = cached_wheel(work / "wheel")
        if built is None:
            raise BuildError(f"pip wheel finished but left no single horovod wheel in {work / 'wheel'}")
        check_wheel(built)
        info = {"horovod": horovod, "torch": torch_version(), "python": python_tag(),
                "platform": platform_tag(), "wheel": built.name,
                "built_s": round(time.monotonic() - progress.start)}
        (work / "wheel" / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")

        if target.exists():  # a stale or concurrent result: replace it
            stale = target.with_name(target.name + f".stale-{os.getpid()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(work / "wheel", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sources, ignore_errors=True)
    wheel = cached_wheel(target)
    assert wheel is not None
    progress(f"built and cached {wheel}")
    return wheel


def install(wheel: Path, progress: Progress | None = None) -> None:
    """Install ``wheel`` into this interpreter without its dependencies, then its pure-Python
    runtime requirements with torch held at the installed version; check that it imports."""
    progress = progress or Progress()
    with tempfile.TemporaryDirectory(prefix="dalle-build-horovod-") as tmp:
        constraint = torch_constraint(Path(tmp))
        requirements = [r for r in wheel_requirements(wheel) if not r.lower().startswith("torch")]
        progress(f"installing Horovod's runtime requirements: {', '.join(requirements)}")
        pip("install", "-c", str(constraint), *requirements)
        progress(f"installing {wheel.name}")
        pip("install", "--no-deps", "--force-reinstall", str(wheel))
    code = "import horovod, horovod.torch; print(horovod.__version__)"
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if check.returncode != 0:
        raise BuildError(f"horovod was installed but 'import horovod.torch' fails:\n{check.stderr}")
    progress(f"installed: import horovod.torch works (horovod {check.stdout.strip()})")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build (or reuse) the wheel, install it with ``--install``."""
    parser = argparse.ArgumentParser(
        prog="dalle-build-horovod",
        description=f"Build Horovod {HOROVOD_VERSION} (torch and gloo, C++17) for this interpreter's "
        "torch, cache the wheel, and optionally install it.",
    )
    parser.add_argument("--install", action="store_true", help="install the wheel into this interpreter")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of cached wheels "
                        "(default: ${DALLE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/dalle}/wheels)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: CPU count)")
    parser.add_argument("--rebuild", action="store_true", help="build even when a cached wheel fits")
    parser.add_argument("--print-path", action="store_true",
                        help="print where the wheel is or would be cached, and exit")
    args = parser.parse_args(argv)
    cache = (args.cache or default_cache()).expanduser().resolve()
    try:
        if args.print_path:
            print(cache_directory(cache))
            return 0
        progress = Progress()
        wheel = build(cache, jobs=args.jobs, rebuild=args.rebuild, progress=progress)
        if args.install:
            install(wheel, progress)
    except BuildError as error:
        print(f"dalle-build-horovod: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
