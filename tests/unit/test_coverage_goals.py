"""The coverage goals of the test command (tests/coverage_goals.py, issue 11): a module under
its goal, a package's weak module or a runtime module that was not measured at all fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import coverage_goals
from tests.coverage_goals import Figure, figures, render

ROOT = Path(__file__).resolve().parents[2]


def _summary(statements: int, covered: int) -> dict[str, object]:
    return {"summary": {"num_statements": statements, "covered_lines": covered}}


def _report(files: dict[str, tuple[int, int]]) -> dict[str, object]:
    statements = sum(s for s, _ in files.values())
    covered = sum(c for _, c in files.values())
    return {
        "files": {path: _summary(s, c) for path, (s, c) in files.items()},
        "totals": {"num_statements": statements, "covered_lines": covered},
    }


RUNTIME = {"launcher": ("sdexec/exec/launcher.py",), "jobexec": ("sdexec/jobexec/*.py",)}


def test_every_goal_met() -> None:
    report = _report({
        "sdexec/exec/launcher.py": (100, 95),
        "sdexec/jobexec/policy.py": (50, 45),
        "sdexec/jobexec/__init__.py": (0, 0),  # an empty module is fully covered
        "sdexec/config/table.py": (10, 10),
    })  # fmt: skip
    figs = figures(report, RUNTIME)
    assert [(f.name, f.path) for f in figs] == [
        ("total", "total"),
        ("launcher", "sdexec/exec/launcher.py"),
        ("jobexec", "sdexec/jobexec/__init__.py"),
        ("jobexec", "sdexec/jobexec/policy.py"),
    ]
    assert all(f.met for f in figs)
    assert figs[0].percent == pytest.approx(100 * 150 / 160)
    assert render(figs).endswith("coverage goals: all met")


def test_one_weak_module_of_a_package_misses_the_goal() -> None:
    report = _report({
        "sdexec/exec/launcher.py": (1000, 990),
        "sdexec/jobexec/policy.py": (100, 100),
        "sdexec/jobexec/records.py": (100, 79),  # the package is 89.5% on the whole
    })  # fmt: skip
    missed = [f for f in figures(report, RUNTIME) if not f.met]
    assert [(f.path, f.percent) for f in missed] == [("sdexec/jobexec/records.py", 79.0)]
    assert "1 missed (sdexec/jobexec/records.py)" in render(missed)


def test_total_under_its_goal_misses() -> None:
    report = _report({"sdexec/exec/launcher.py": (100, 85), "sdexec/jobexec/a.py": (100, 85)})
    total = figures(report, RUNTIME)[0]
    assert total.percent == 85.0 and not total.met


def test_a_runtime_module_not_measured_misses() -> None:
    """A module moved without RUNTIME being updated must not pass unmeasured."""
    figs = figures(_report({"sdexec/launcher.py": (10, 10)}), RUNTIME)
    unmeasured = [f for f in figs if f.percent is None]
    assert [f.name for f in unmeasured] == ["launcher", "jobexec"]
    assert not any(f.met for f in unmeasured)
    assert "not measured" in render(figs)


def test_the_goals_are_the_issues() -> None:
    assert coverage_goals.TOTAL_GOAL == 90.0 and coverage_goals.MODULE_GOAL == 80.0
    for name in ("launcher", "job", "bus", "server", "client", "cmd_run", "rexec", "jobexec"):
        assert name in coverage_goals.RUNTIME


def _goals(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.coverage_goals", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_no_data_is_an_error_not_a_pass(tmp_path: Path) -> None:
    p = _goals("--data", str(tmp_path))
    assert p.returncode != 0 and "no data" in p.stderr


def test_bad_data_dir_is_a_usage_error(tmp_path: Path) -> None:
    p = _goals("--data", str(tmp_path / "missing"))
    assert p.returncode == 2 and "--data:" in p.stderr and "is not a directory" in p.stderr


def test_figure_met_needs_a_figure() -> None:
    assert not Figure("x", "p", None, 80.0).met
    assert Figure("x", "p", 80.0, 80.0).met


def test_a_real_poorly_covered_run_fails_the_goals(tmp_path: Path) -> None:
    """End to end: a Python measured through COVERAGE_PROCESS_START (as tests/run measures the
    CLI, the server and the shells) writes data that are combined, shown and held to the goals."""
    data = tmp_path / "data"
    data.mkdir()
    env = {"COVERAGE_PROCESS_START": str(ROOT / "pyproject.toml"), "COVERAGE_FILE": f"{data}/t"}
    subprocess.run(
        [sys.executable, "-c", "import sdexec.cli.client"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )
    assert list(data.iterdir()), "the measured Python wrote no data"
    p = _goals("--data", str(data), "--json")
    assert p.returncode == 1, p.stderr
    figs = {f["path"]: f for f in json.loads(p.stdout)}
    assert not figs["total"]["met"] and 0 < figs["total"]["percent"] < 90
    client = next(f for f in figs.values() if f["name"] == "client")
    assert 0 < client["percent"] < 80  # imported, not run: its definitions only
    shown = _goals("--data", str(data), "--no-enforce")
    assert shown.returncode == 0 and "MISSED" in shown.stdout and "TOTAL" in shown.stdout
