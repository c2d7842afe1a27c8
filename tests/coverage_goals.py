"""The coverage goals the test command enforces (issue 11), and the report that shows them.

``tests/run`` measures the unit tests (host) and the podman node's integration suite (the CLI,
the socket-activated server and the job shells included) into ``.cache/coverage``; this combines
those data files, prints coverage's table, then each goal with its figure, and exits 1 when one
is missed. ``--json`` prints the figures alone, for scripts.

The runtime modules are what runs a job: a name maps to the files it stands for (a glob names
a package: each of its modules must meet the goal on its own, so a well-covered module cannot
hide a poorly covered one). Update RUNTIME when modules move.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TOTAL_GOAL = 90.0
MODULE_GOAL = 80.0

RUNTIME: dict[str, tuple[str, ...]] = {
    "launcher": ("sdexec/exec/launcher.py",),
    "job": ("sdexec/exec/job.py",),
    "bus": ("sdexec/systemd/bus.py",),
    "server": ("sdexec/server/server.py",),
    "client": ("sdexec/cli/client.py",),
    "cmd_run": ("sdexec/cli/cmd_run.py",),
    "rexec": ("sdexec/exec/rexec.py",),
    "jobexec": ("sdexec/jobexec/*.py",),  # a package: every module of it
}
"""name -> the files it covers, relative to the checkout (globs allowed)."""

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Figure:
    """One goal's measured figure: ``path`` is the file (or "total"), ``percent`` its lines."""

    name: str
    path: str
    percent: float | None  # None: no such file was measured (a goal missed, not skipped)
    goal: float

    @property
    def met(self) -> bool:
        return self.percent is not None and self.percent >= self.goal


def _percent(summary: Mapping[str, object]) -> float:
    """Covered lines over statements, in percent (an empty module, e.g. ``__init__``: 100)."""
    statements = summary.get("num_statements", 0)
    covered = summary.get("covered_lines", 0)
    assert isinstance(statements, int) and isinstance(covered, int)
    return 100.0 if statements == 0 else 100.0 * covered / statements


def figures(
    report: Mapping[str, object],
    runtime: Mapping[str, Sequence[str]] = RUNTIME,
    total_goal: float = TOTAL_GOAL,
    module_goal: float = MODULE_GOAL,
) -> list[Figure]:
    """The total and every runtime module's figure from a ``coverage json`` report.

    A name whose patterns match no measured file yields one Figure with ``percent`` None: a
    module renamed without updating RUNTIME must fail the goal, not pass it unmeasured.
    """
    files = report.get("files", {})
    totals = report.get("totals", {})
    assert isinstance(files, dict) and isinstance(totals, dict)
    out = [Figure("total", "total", _percent(totals), total_goal)]
    for name, patterns in runtime.items():
        matched = sorted(
            path for path in files if any(fnmatch.fnmatchcase(path, p) for p in patterns)
        )
        if not matched:
            out.append(Figure(name, " ".join(patterns), None, module_goal))
        for path in matched:
            out.append(Figure(name, path, _percent(files[path]["summary"]), module_goal))
    return out


def render(figs: Sequence[Figure]) -> str:
    """The goals block tests/run ends with: one line a figure, then the verdict."""
    lines = []
    for f in figs:
        shown = "not measured" if f.percent is None else f"{f.percent:5.1f}%"
        mark = "ok" if f.met else "MISSED"
        lines.append(f"  {f.name:<9} {f.path:<34} {shown:>12}  (goal {f.goal:g}%)  {mark}")
    missed = [f for f in figs if not f.met]
    verdict = (
        "coverage goals: all met"
        if not missed
        else f"coverage goals: {len(missed)} missed ({', '.join(f.path for f in missed)})"
    )
    return "\n".join([*lines, verdict])


def combine_and_report(data_dir: Path, table: bool) -> dict[str, object]:
    """Combine ``data_dir``'s files (kept: a second report reads them again) into a JSON report."""
    import coverage

    data_files = sorted(str(p) for p in data_dir.iterdir() if p.is_file())
    if not data_files:
        raise SystemExit(f"coverage: no data in {data_dir} (run the tests under coverage first)")
    with tempfile.TemporaryDirectory() as tmp:
        cov = coverage.Coverage(
            data_file=str(Path(tmp) / "combined"), config_file=str(ROOT / "pyproject.toml")
        )
        cov.combine(data_files, keep=True)
        cov.save()
        cov.load()
        if table:
            cov.report(ignore_errors=True, file=sys.stdout)
        out = Path(tmp) / "report.json"
        cov.json_report(outfile=str(out), ignore_errors=True)
        report: dict[str, object] = json.loads(out.read_text())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/coverage report", description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT / ".cache" / "coverage")
    parser.add_argument("--json", action="store_true", help="the figures as JSON, no table")
    parser.add_argument(
        "--no-enforce", action="store_true", help="print the goals but exit 0 (a partial run)"
    )
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data: {args.data} is not a directory")
    figs = figures(combine_and_report(args.data, table=not args.json))
    if args.json:
        json.dump(
            [{"name": f.name, "path": f.path, "percent": f.percent, "goal": f.goal, "met": f.met}
             for f in figs],
            sys.stdout,
            indent=1,
        )  # fmt: skip
        sys.stdout.write("\n")
    else:
        print(render(figs))
    return 0 if args.no_enforce or all(f.met for f in figs) else 1


if __name__ == "__main__":
    sys.exit(main())
