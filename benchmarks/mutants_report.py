"""The table of mutation testing results: per mutated module, mutants, killed, equivalent and
surviving, read from the results mutmut caches in ``packages/<package>/mutants/``.

Surviving mutants listed as equivalent in ``benchmarks/mutants.md`` (rows ``| `name` | reason |``
under its "Equivalent mutants" heading) are counted apart; the score is the share of the other
mutants that the tests kill (a time-out counts as killed: the mutant hung a test). ``--write``
puts the table into ``benchmarks/mutants.md`` between its two marker lines; without it the
table is printed. Every surviving mutant not listed as equivalent is printed by name, for
``mutmut show NAME`` in its package's folder.

Run by ``nox -s mutants`` after mutmut; needs mutmut installed (it reads mutmut's exit codes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "mutants.md"
BEGIN, END = "<!-- mutants-table:begin -->", "<!-- mutants-table:end -->"
EQUIVALENT_HEADING = "## Equivalent mutants"
EQUIVALENT_ROW = re.compile(r"^\|\s*`([\w.]+__mutmut_\d+)`\s*\|")


@dataclass
class ModuleResult:
    """Counts of one mutated module, and the names of its unexplained survivors."""

    module: str
    mutants: int = 0
    killed: int = 0
    equivalent: int = 0
    not_run: int = 0
    survivors: list[str] = field(default_factory=list)

    @property
    def score(self) -> str:
        """Killed share of the mutants that ran and are not equivalent ("-" when none ran)."""
        judged = self.mutants - self.equivalent - self.not_run
        return f"{self.killed / judged:.1%}" if judged else "-"


def equivalent_mutants(report: Path) -> set[str]:
    """Names listed in the table under ``report``'s "Equivalent mutants" heading."""
    if not report.is_file():
        return set()
    names, inside = set(), False
    for line in report.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == EQUIVALENT_HEADING
        elif inside and (match := EQUIVALENT_ROW.match(line)):
            names.add(match.group(1))
    return names


def module_results(package: Path, equivalent: set[str]) -> list[ModuleResult]:
    """One `ModuleResult` per ``.meta`` file mutmut left under ``package/mutants``."""
    results = []
    sources = package / "mutants" / "src"  # the packages' [tool.mutmut] source_paths
    for meta in sorted(sources.rglob("*.py.meta")):
        exit_codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        if not exit_codes:
            continue
        module = ".".join(meta.relative_to(sources).with_suffix("").with_suffix("").parts)
        result = ModuleResult(module, mutants=len(exit_codes))
        for name, code in sorted(exit_codes.items()):
            status = status_by_exit_code[code]
            if name in equivalent and status == "survived":
                result.equivalent += 1
            elif status in ("killed", "timeout", "caught by type check"):
                result.killed += 1
            elif status == "survived":
                result.survivors.append(name)
            else:  # not checked, no tests, skipped, suspicious, segfault
                result.not_run += 1
        results.append(result)
    return results


def table(results: list[ModuleResult]) -> str:
    """The markdown table of ``results`` with a total row."""
    rows = ["| module | mutants | killed | equivalent | survived | not run | killed of the rest |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    total = ModuleResult("**total**")
    for r in results:
        rows.append(f"| `{r.module}` | {r.mutants} | {r.killed} | {r.equivalent} | {len(r.survivors)} | "
                    f"{r.not_run} | {r.score} |")
        total.mutants += r.mutants
        total.killed += r.killed
        total.equivalent += r.equivalent
        total.not_run += r.not_run
        total.survivors += r.survivors
    rows.append(f"| {total.module} | {total.mutants} | {total.killed} | {total.equivalent} | "
                f"{len(total.survivors)} | {total.not_run} | {total.score} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"update the table in {REPORT.name}")
    args = parser.parse_args(argv)
    equivalent = equivalent_mutants(REPORT)
    results = [r for package in sorted((ROOT / "packages").iterdir())
               for r in module_results(package, equivalent)]
    if not results:
        print("no mutmut results under packages/*/mutants: run `nox -s mutants` first", file=sys.stderr)
        return 1
    text = (f"{table(results)}\n\nmutmut 3.8.1, `nox -s mutants`, results as of "
            f"{datetime.date.today().isoformat()}.")
    if args.write:
        report = REPORT.read_text()
        start, end = report.index(BEGIN) + len(BEGIN), report.index(END)
        REPORT.write_text(f"{report[:start]}\n{text}\n{report[end:]}")
        print(f"wrote the table into {REPORT}")
    else:
        print(text)
    for r in results:
        for name in r.survivors:
            print(f"survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
