"""Fault injection (issue 6): systemd and the bus misbehave, jobs misbehave; statuses survive.

Every test checks the same three things whatever the fault: each job's own exit status is
reported exactly once and is the right one, no sdexec unit is left loaded, and the launcher
holds no more file descriptors afterwards than before (in-process tests).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from sdexec.config import load_config
from sdexec.launcher import PIPE, JobSpec, Launcher

from .conftest import SDEXEC
from .faults_helpers import (
    FD_SLACK,
    PeakRSS,
    expected_code,
    num_fds,
    processes_matching,
    run_batch,
    stop_unit_quietly,
    systemctl,
    units_of,
)

Config = Callable[..., str]

N_JOBS = 50
MB = 1_000_000
BIG = 100 * MB


def _staggered(prefix: str) -> tuple[dict[str, str], dict[str, int]]:
    """50 jobs whose exits are spread over 1-3 s, so some end before, during and after a fault."""
    scripts, expected = {}, {}
    for i in range(N_JOBS):
        jobid = f"{prefix}-{i}"
        scripts[jobid] = f"sleep {1 + 2 * i / N_JOBS:.2f}; exit {expected_code(i)}"
        expected[jobid] = expected_code(i)
    return scripts, expected


# --- 1. systemd re-executes or reloads while 50 jobs run -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("action", ["daemon-reexec", "daemon-reload"])
async def test_50_jobs_survive_systemd(config: Config, action: str) -> None:
    prefix = f"flt-{action.removeprefix('daemon-')}"
    scripts, expected = _staggered(prefix)

    async def fault() -> None:
        await systemctl(action)

    res = await run_batch(load_config(config()), scripts, fault, fault_after=0.3)
    assert not res.start_failures, res.start_failures
    assert res.lost(expected) == [], f"{action}: statuses lost or wrong"
    assert not units_of(prefix)
    assert abs(res.fds_after - res.fds_before) <= FD_SLACK, (res.fds_before, res.fds_after, res.fd_diff)
    print(f"{action}: {N_JOBS} jobs, 0 lost, {res.elapsed:.1f}s, reconnects={res.reconnects}")
