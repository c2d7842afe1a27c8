"""Integration tests run inside the systemd node (containers/node): real systemd, real D-Bus.

They refuse to run anywhere else rather than silently skipping: a green run must mean systemd
was really exercised.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
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


REFERENCE_RUN = 0.12
"""Seconds of the quickest ``sdexec run -- true`` (in-process: Python start, bus, one unit)
on the podman node of this project's machines. A node where it takes longer (qemu TCG:
~15x) gets its elapsed-time bounds' overheads scaled by the ratio; never below 1."""


@pytest.fixture(scope="session")
def slow(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The node's measured slowness factor (best of 3, so a moment of load does not count).

    Bounds keep their meaning: ``elapsed < 4 + 2 * slow`` is "the 4 s the test is about, plus
    the 2 s of overhead a fast node needs, as slow as this node is".
    """
    d = tmp_path_factory.mktemp("slowness")
    cfg = d / "exec.toml"
    cfg.write_text(f'[exec]\nservice = "sdexec"\n[sdexec]\nstate-dir = "{d / "state"}"\n')
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        p = run_sdexec("run", "--config", str(cfg), "--", "true", timeout=300)
        best = min(best, time.monotonic() - t0)
        assert p.returncode == 0, p.stderr
    factor = max(1.0, best / REFERENCE_RUN)
    print(f"\nnode slowness: sdexec run -- true in {best:.2f}s, factor {factor:.1f}")
    return factor


def wait_unit(unit: str, states: tuple[str, ...], timeout: float = 120) -> str:
    """Wait until ``unit``'s ActiveState/SubState is one of ``states`` (an event, not a delay)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["systemctl", "show", unit, "--property=ActiveState", "--property=SubState"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        for state in (props.get("SubState", ""), props.get("ActiveState", "")):
            if state in states:
                return state
        assert time.monotonic() < deadline, f"{unit} is {props}, not one of {states}"
        time.sleep(0.05)
