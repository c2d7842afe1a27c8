"""The library examples of docs/library.md run, against the node's systemd (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def test_stream() -> None:
    p = run_example("stream.py")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[:3] == ["got: line 1", "got: line 2", "got: line 3"], lines
    assert "unit shell-0-example-stream.service" in lines[3] and lines[3].endswith("returncode 0")


def test_cancel() -> None:
    p = run_example("cancel.py")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["b'ready\\n'", "b'terminated\\n'", "returncode 42"]


def test_adopt() -> None:
    p = run_example("adopt.py")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "first launcher: detached None",
        "adopted: shell-0-example-adopt.service returncode 7",
    ]


@pytest.mark.parametrize("name", ["jobexec.py"])
def test_jobexec(name: str) -> None:
    p = run_example(name)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert sorted(lines[:2]) == ["rank 0 of 2", "rank 1 of 2"], lines
    assert lines[2] == "exit 0 service sdexec"
    assert lines[3].startswith("refused:") and "service-override" in lines[3]


def test_accounting() -> None:
    p = run_example("accounting.py")
    assert p.returncode == 0, p.stderr
    peak, cpu, report = p.stdout.splitlines()
    words = peak.split()
    assert words[:3] == ["memory", "peak", "MiB"] and int(words[3]) >= 200, peak
    assert words[4] == "from" and words[5] in ("cgroup", "systemd", "rusage"), peak
    assert cpu.startswith("cpu seconds ") and json.loads(report)["cpu_time"] > 0, cpu
