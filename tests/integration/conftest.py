"""Integration tests run inside the systemd node (containers/node): real systemd, real D-Bus.

They refuse to run anywhere else rather than silently skipping: a green run must mean systemd
was really exercised.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "?"


def pytest_configure(config: pytest.Config) -> None:
    if _pid1() != "systemd":
        raise pytest.UsageError(
            "integration tests need systemd as PID 1: run them with `tests/run` "
            "(or `containers/node exec python -m pytest tests/integration`)"
        )


def pytest_report_header(config: pytest.Config) -> str:
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=False)
    return f"systemd node: PID 1 = {_pid1()}, {out.stdout.splitlines()[0] if out.stdout else '?'}"


SDEXEC = [sys.executable, "-m", "sdexec"]


def sdexec_units() -> list[str]:
    out = subprocess.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend", "shell-*", "imp-shell-*"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    return d


@pytest.fixture
def config(tmp_path: Path, state_dir: Path) -> Iterator[object]:
    """A factory writing a config file: config('kill-timeout = "0.5s"', sdexec='...')."""

    def make(exec_body: str = "", *, sdexec: str = "", service: str = "sdexec") -> str:
        path = tmp_path / f"exec-{len(list(tmp_path.glob('exec-*.toml')))}.toml"
        path.write_text(
            "[exec]\n"
            f'service = "{service}"\n'
            + textwrap.dedent(exec_body)
            + "\n[sdexec]\n"
            + f'state-dir = "{state_dir}"\n'
            + textwrap.dedent(sdexec)
        )
        return str(path)

    yield make


@pytest.fixture(autouse=True)
def no_units_left() -> Iterator[None]:
    """Every test must leave no sdexec unit loaded (the acceptance of every issue)."""
    before = set(sdexec_units())
    yield
    left = set(sdexec_units()) - before
    for unit in left:
        subprocess.run(["systemctl", "stop", unit], check=False)
        subprocess.run(["systemctl", "reset-failed", unit], check=False)
    assert not left, f"units left behind: {sorted(left)}"


def main_pid(unit: str) -> int:
    """The unit's main process (0 when it has none)."""
    out = subprocess.run(
        ["systemctl", "show", "-P", "MainPID", unit], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip() or 0)


def run_sdexec(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*SDEXEC, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def start_until_ready(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``sdexec ARGS`` in the background, returned once the job printed its "ready" line."""
    proc = subprocess.Popen(
        [*SDEXEC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"the job did not start: {line!r} {proc.communicate()}")
    return proc
