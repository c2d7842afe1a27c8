"""Shared pieces of the fault-injection tests: a batch of jobs run in-process, and meters.

Kept apart from the tests so each test reads as "what fault, what must still hold".
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from sdexec.config import ExecConfig
from sdexec.job import BaseJob
from sdexec.launcher import Job, JobSpec, Launcher

from .conftest import sdexec_units

FD_SLACK = 2


def expected_code(i: int) -> int:
    """Distinct per job and never 0, so a status delivered to the wrong job is caught."""
    return 10 + i % 200


def num_fds() -> int:
    gc.collect()  # transports dropped but not yet collected are not leaks
    return psutil.Process().num_fds()


def fd_table() -> dict[int, str]:
    """What each open fd is, for the message when a count differs."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


@dataclass
class BatchResult:
    codes: dict[str, int | None]
    errors: dict[str, str]
    finished_calls: Counter[str]
    statuses_seen: dict[str, set[int]]
    fds_before: int
    fds_after: int
    fd_diff: dict[int, str]
    elapsed: float
    reconnects: int
    start_failures: list[str] = field(default_factory=list)

    def lost(self, expected: dict[str, int]) -> list[str]:
        """Jobs whose status is missing, wrong, or was reported more or less than once."""
        bad = []
        for jobid, want in expected.items():
            got = self.codes.get(jobid)
            if (
                got != want
                or self.finished_calls[jobid] != 1
                or len(self.statuses_seen.get(jobid, set())) != 1
            ):
                bad.append(
                    f"{jobid}: want {want}, got {got} (finished reported "
                    f"{self.finished_calls[jobid]}x, statuses {self.statuses_seen.get(jobid)}, "
                    f"error {self.errors.get(jobid)})"
                )
        return bad


@contextmanager
def count_finished() -> Iterator[Counter[str]]:
    """Count Job.set_finished per job: "the exit status reported exactly once" made checkable."""
    calls: Counter[str] = Counter()
    original = Job.set_finished

    def counting(self: BaseJob, wait_status: int) -> None:
        calls[self.jobid] += 1
        original(self, wait_status)

    Job.set_finished = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Job.set_finished = original  # type: ignore[method-assign]


async def run_batch(
    cfg: ExecConfig,
    scripts: dict[str, str],
    fault: Callable[[], Awaitable[None]] | None = None,
    *,
    fault_after: float = 0.0,
    timeout: float = 60.0,
) -> BatchResult:
    """Start every job at once on one Launcher, inject ``fault`` while they run, collect all."""
    statuses: dict[str, set[int]] = {}

    def on_update(job: BaseJob) -> None:
        if job.wait_status is not None:
            statuses.setdefault(job.jobid, set()).add(job.wait_status)

    fds_before = num_fds()
    table_before = fd_table()
    t0 = time.monotonic()
    with count_finished() as calls:
        launcher = Launcher(cfg, on_update=on_update)
        await launcher.connect()
        try:
            specs = [
                JobSpec(jobid=jobid, argv=["sh", "-c", script]) for jobid, script in scripts.items()
            ]
            started = await asyncio.gather(
                *(launcher.start(s) for s in specs), return_exceptions=True
            )
            jobs = [j for j in started if isinstance(j, Job)]
            failures = [f"{s.jobid}: {r!r}" for s, r in zip(specs, started) if not isinstance(r, Job)]
            if fault is not None:
                await asyncio.sleep(fault_after)
                await fault()
            done = await asyncio.wait_for(
                asyncio.gather(*(j.wait() for j in jobs), return_exceptions=True), timeout
            )
            codes: dict[str, int | None] = {}
            for j, rc in zip(jobs, done):
                codes[j.jobid] = rc if isinstance(rc, int) or rc is None else None
            errors = {j.jobid: j.error for j in jobs if j.error}
            reconnects = launcher.manager.reconnects
        finally:
            await launcher.close()
    elapsed = time.monotonic() - t0
    del jobs, started, launcher
    return BatchResult(
        codes=codes,
        errors=errors,
        finished_calls=calls,
        statuses_seen=statuses,
        fds_before=fds_before,
        fds_after=num_fds(),
        fd_diff={k: v for k, v in fd_table().items() if table_before.get(k) != v},
        elapsed=elapsed,
        reconnects=reconnects,
        start_failures=failures,
    )


async def systemctl(*args: str, timeout: float = 60) -> None:
    """Run systemctl without blocking the event loop the launcher lives on."""
    proc = await asyncio.create_subprocess_exec("systemctl", *args)
    rc = await asyncio.wait_for(proc.wait(), timeout)
    assert rc == 0, f"systemctl {' '.join(args)} failed with {rc}"


def units_of(prefix: str) -> list[str]:
    return [u for u in sdexec_units() if prefix in u]


class PeakRSS:
    """Sample a process's RSS from a thread (the event loop may be too busy to sample itself)."""

    def __init__(self, pid: int | None = None, interval: float = 0.01) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def processes_matching(cmdline: list[str]) -> list[int]:
    """PIDs whose argv is exactly ``cmdline`` (zombies excluded: they hold nothing)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["cmdline"] == cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def stop_unit_quietly(unit: str) -> None:
    subprocess.run(["systemctl", "stop", unit], check=False, capture_output=True)
    subprocess.run(["systemctl", "reset-failed", unit], check=False, capture_output=True)
