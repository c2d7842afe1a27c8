"""Fault injection (issue 6): systemd and the bus misbehave, jobs misbehave; statuses survive.

Every test checks the same three things whatever the fault: each job's own exit status is
reported exactly once and is the right one, no sdexec unit is left loaded, and the launcher
holds no more file descriptors afterwards than before (in-process tests).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import pytest

from sdexec.config import load_config

from .faults_helpers import (
    BatchResult,
    run_batch,
    staggered,
    systemctl,
    units_of,
)

Config = Callable[..., str]

N_JOBS = 50
N_CLEAN = 20
MB = 1_000_000
BIG = 100 * MB


def _report(name: str, res: BatchResult, lost: list[str], faults: int) -> None:
    print(
        f"\n{name}: {N_JOBS}+{N_CLEAN} jobs, {faults} faults, lost {len(lost)}, "
        f"hung {len(res.hung)}, units left {len(res.units_left)}, started in "
        f"{res.start_time:.2f}s, done in {res.elapsed:.1f}s, reconnects {res.reconnects}, "
        f"fds {res.fds_before}->{res.fds_after}"
    )


# --- 1. systemd re-executes or reloads while 50 jobs run -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("action", ["daemon-reexec", "daemon-reload"])
async def test_50_jobs_survive_systemd(config: Config, action: str) -> None:
    """The fault is repeated back to back across the whole window in which the jobs exit."""
    prefix = f"flt-{action.removeprefix('daemon-')}"
    cases = staggered(prefix, N_JOBS, N_CLEAN)
    faults = 0

    async def fault() -> None:
        nonlocal faults
        t_end = time.monotonic() + 2.6
        while time.monotonic() < t_end:
            await systemctl(action)
            faults += 1
            await asyncio.sleep(0.05)

    res = await run_batch(load_config(config()), cases, fault, fault_after=0.2, timeout=6)
    lost = res.lost(cases)
    _report(action, res, lost, faults)
    assert not res.start_failures, res.start_failures
    assert lost == [], f"{action}: statuses lost or wrong"
    assert res.hung == []
    assert res.units_left == []
    assert res.fds_ok(), (res.fds_before, res.fds_after, res.fd_diff)


# --- 2. the bus daemon restarts while jobs run -----------------------------------------------


BUS_WATCH_DIES = (
    "bus.py Manager._watch: dbus-fast's wait_for_disconnect() raises (EOFError) when the "
    "bus goes away, so the watch task dies and never reconnects; and a call in flight when "
    "the bus goes away (StopUnit, ResetFailedUnit) raises LaunchError and is not retried, so "
    "its job hangs or its unit is left"
)


@pytest.mark.slow
@pytest.mark.xfail(reason=BUS_WATCH_DIES, strict=True)
async def test_jobs_survive_dbus_restart(config: Config) -> None:
    """``systemctl restart dbus``, three times while the jobs exit: the launcher must reconnect.

    systemd 252 survives this (it reconnects to the new dbus-daemon within a second, checked
    below), so the question is whether our launcher comes back and reads what happened
    meanwhile (bus.py ``_watch``, then ``Launcher.resync``).
    """
    prefix = "flt-dbus"
    cases = staggered(prefix, N_JOBS, N_CLEAN)
    faults = 0

    async def fault() -> None:
        nonlocal faults
        for _ in range(3):
            await systemctl("restart", "dbus")
            faults += 1
            await asyncio.sleep(0.6)

    res = await run_batch(load_config(config()), cases, fault, fault_after=0.3, timeout=6)
    lost = res.lost(cases)
    _report("dbus restart", res, lost, faults)
    systemd_back = subprocess.run(
        ["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
         "org.freedesktop.systemd1.Manager", "GetUnit", "s", "dbus.service"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert systemd_back.returncode == 0, f"systemd did not come back on the bus: {systemd_back}"
    assert not res.start_failures, res.start_failures
    assert res.reconnects >= faults, "the launcher did not reconnect after each restart"
    assert lost == [], "dbus restart: statuses lost or wrong"
    assert res.hung == []
    assert res.units_left == []
    assert res.fds_ok(), (res.fds_before, res.fds_after, res.fd_diff)
