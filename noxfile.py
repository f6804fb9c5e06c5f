"""Sessions: one test session per package (each in an environment holding only that package and
its declared dependencies), lint, demo and bench. Torch is installed first, pinned, so that no
package pulls a different build."""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
CONSTRAINTS = str(ROOT / ".ci" / "constraints.txt")
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())

nox.options.sessions = ["lint", "tests", "demo_smoke"]
nox.options.reuse_existing_virtualenvs = True


def install(session: nox.Session, *args: str) -> None:
    """Install with torch pinned: torch first, everything else under the constraint."""
    session.install(TORCH)
    session.install("-c", CONSTRAINTS, *args)


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """Run one package's tests in an environment with only it and its dependencies."""
    install(session, f"{ROOT / 'packages' / package}[test]")
    session.run("python", "-m", "pytest", str(ROOT / "packages" / package / "tests"), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job on the built-in dataset: train small models, generate, write images."""
    install(session, str(ROOT / "packages" / "dalle-core"), "pillow", "tqdm")
    session.run("python", str(ROOT / "scripts" / "demo.py"), *session.posargs)


@nox.session
def demo_smoke(session: nox.Session) -> None:
    """The demo in its quick mode, as a test (scripts/tests)."""
    install(session, str(ROOT / "packages" / "dalle-core"), "pillow", "tqdm", "pytest")
    session.run("python", "-m", "pytest", str(ROOT / "scripts" / "tests"), *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks against plain references; writes benchmarks/README.md."""
    install(session, str(ROOT / "packages" / "dalle-core"))
    session.run("python", str(ROOT / "benchmarks" / "bench_core.py"), *session.posargs)
