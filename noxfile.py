"""Sessions: one test session per package (each in an environment holding only that package and
its declared dependencies), lint, demo and bench. Torch is installed first, pinned, so that no
package pulls a different build."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
CONSTRAINTS = str(ROOT / ".ci" / "constraints.txt")
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
MUTMUT = "mutmut==3.8.1"
#: runs a package's tests in as many processes as the machine has cores
XDIST = "pytest-xdist==3.8.0"

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def install(session: nox.Session, *args: str) -> None:
    """Install with torch pinned: torch first, everything else under the constraint."""
    session.install(TORCH)
    session.install("-c", CONSTRAINTS, *args)


def pyproject(package: str) -> dict:
    """The parsed pyproject.toml of packages/<package>."""
    return tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())


def sibling_dependencies(package: str, extras: tuple[str, ...] = ()) -> list[str]:
    """Names of the in-repo packages that <package> depends on (and those its ``extras`` name,
    e.g. a backend plugin's tests need dalle-train), transitively, dependencies first (they are
    not on PyPI, so pip is given their folders)."""
    project = pyproject(package)["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    found: list[str] = []
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        if name in PACKAGES and name != package and name not in found:
            found += [dep for dep in sibling_dependencies(name) if dep not in found] + [name]
    return found


def extra_install_steps(package: str, when: str) -> list[list[str]]:
    """Argument lists from [tool.dalle.install] in a package's pyproject, for dependencies that
    cannot be declared: `before`/`after` are pip arguments (a build needing
    --no-build-isolation, a wheel whose metadata pulls a package with no CPU build, installed
    with --no-deps); `run` are commands run in the environment once the package is installed
    (a script of the package that builds, caches and installs its engine)."""
    return pyproject(package).get("tool", {}).get("dalle", {}).get("install", {}).get(when, [])


#: packages with a ``[tool.mutmut]`` table: the ``mutants`` session runs for them
MUTATED = [name for name in PACKAGES if "mutmut" in pyproject(name).get("tool", {})]


def install_package(session: nox.Session, package: str, *extra: str) -> None:
    """Install ``package`` with its test extra, its in-repo dependencies and ``extra``
    requirements, torch pinned, with the package's own extra install steps."""
    session.install(TORCH)
    for step in extra_install_steps(package, "before"):
        session.install("-c", CONSTRAINTS, *step)
    siblings = [str(ROOT / "packages" / name) for name in sibling_dependencies(package, ("test",))]
    install(session, *siblings, f"{ROOT / 'packages' / package}[test]", *extra)
    for step in extra_install_steps(package, "after"):
        session.install("-c", CONSTRAINTS, *step)
    for command in extra_install_steps(package, "run"):
        session.run(*command)


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """Run one package's tests in an environment with only it and its dependencies, spread over
    the machine's cores by pytest-xdist (``-- -n 0`` runs them in one process)."""
    install_package(session, package, XDIST)
    session.run("python", "-m", "pytest", str(ROOT / "packages" / package / "tests"), "-n", "auto",
                *session.posargs)


@nox.session
@nox.parametrize("package", MUTATED)
def mutants(session: nox.Session, package: str) -> None:
    """Mutation testing with mutmut of the modules in a package's ``[tool.mutmut] only_mutate``
    (those that carry the READMEs' promises), then the table of killed and surviving mutants.

    Not part of the default sessions (it takes long). Results are cached in
    ``packages/<package>/mutants/``: a rerun without arguments only runs mutants not decided yet
    (new, or of functions that changed). Mutant names or patterns run those again, e.g. one
    module after adding tests: ``nox -s "mutants(package='dalle-core')" -- "dalle_core.sampling*"``.
    See benchmarks/mutants.md.
    """
    install_package(session, package, MUTMUT)
    with session.chdir(ROOT / "packages" / package):
        session.run("mutmut", "run", *session.posargs)
    session.run("python", str(ROOT / "benchmarks" / "mutants_report.py"), "--write")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the built-in dataset: `dalle-train demo` trains a VAE, a DALLE and a CLIP
    on coloured shapes, generates images and writes them as PNGs (pass flags after --)."""
    install(session, *(str(ROOT / "packages" / name) for name in ("dalle-core", "dalle-train")))
    session.run("dalle-train", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks against plain references; writes benchmarks/README.md."""
    install(session, str(ROOT / "packages" / "dalle-core"))
    session.run("python", str(ROOT / "benchmarks" / "bench_core.py"), *session.posargs)
