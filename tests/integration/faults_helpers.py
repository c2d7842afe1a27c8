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

from sdexec.config.table import ExecConfig
from sdexec.exec.job import BaseJob
from sdexec.exec.launcher import Job, JobSpec, Launcher
from sdexec.systemd.unitname import unit_name

from .conftest import sdexec_units

FD_SLACK = 2


def staggered(prefix: str, n: int, clean: int, spread: float = 2.0) -> list[JobCase]:
    """``n`` jobs with distinct exit codes (``i % 200``) plus ``clean`` ones exiting 0.

    Exits are spread over 1 to 1 + ``spread`` s, so some end before, during and after a fault;
    each job prints its id, so a status or output routed to the wrong job is caught. Exit 0
    leaves the unit active (RemainAfterExit) for the launcher to stop; another exit makes it
    failed for the launcher to reset: both paths are exercised.
    """
    cases = []
    for i in range(n + clean):
        jobid = f"{prefix}-{i}"
        code = i % 200 if i < n else 0
        delay = 1 + spread * (i % n if i < n else (i - n) * n / clean) / n
        cases.append(
            JobCase(
                jobid, f"echo {jobid}; sleep {delay:.2f}; exit {code}", code, f"{jobid}\n".encode()
            )
        )
    return cases


def num_fds() -> int:
    gc.collect()  # transports dropped but not yet collected are not leaks
    return psutil.Process().num_fds()


async def settle_fds(target: int, within: float = 1.0) -> int:
    """The fd count once closes already under way are done (the bus socket closes on the next
    loop turns after ``close()``), or as it is after ``within`` seconds."""
    deadline = time.monotonic() + within
    while (n := num_fds()) > target and time.monotonic() < deadline:  # noqa: ASYNC110 (no event for it)
        await asyncio.sleep(0.02)
    return n


def fd_table() -> dict[int, str]:
    """What each open fd is, for the message when a count differs."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class JobCase:
    """One job of a batch: what it runs and what must come back (status and stdout)."""

    jobid: str
    script: str
    code: int
    stdout: bytes = b""


@dataclass
class BatchResult:
    codes: dict[str, int | None]
    outputs: dict[str, bytes]
    errors: dict[str, str]
    finished_calls: Counter[str]
    statuses_seen: dict[str, set[int]]
    hung: list[str]
    units_left: list[str]
    fds_before: int
    fds_after: int
    fd_diff: dict[int, str]
    elapsed: float
    start_time: float
    reconnects: int
    start_failures: list[str] = field(default_factory=list)

    def lost(self, cases: list[JobCase]) -> list[str]:
        """Jobs whose status or output is missing or wrong, or was reported other than once."""
        bad = []
        for case in cases:
            got = self.codes.get(case.jobid)
            out = self.outputs.get(case.jobid)
            seen = self.statuses_seen.get(case.jobid, set())
            calls = self.finished_calls[case.jobid]
            if got != case.code or out != case.stdout or calls != 1 or len(seen) != 1:
                bad.append(
                    f"{case.jobid}: want {case.code} {case.stdout!r}, got {got} {out!r} "
                    f"(finished reported {calls}x, statuses {seen}, "
                    f"error {self.errors.get(case.jobid)})"
                )
        return bad

    def fds_ok(self) -> bool:
        return abs(self.fds_after - self.fds_before) <= FD_SLACK


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


async def _read_all(job: Job) -> bytes:
    assert job.stdout is not None
    return await job.stdout.read()


async def run_batch(
    cfg: ExecConfig,
    cases: list[JobCase],
    fault: Callable[[], Awaitable[None]] | None = None,
    *,
    fault_after: float = 0.0,
    limit: float = 30.0,
) -> BatchResult:
    """Start every job at once on one Launcher, inject ``fault`` while they run, collect all.

    Never raises for what the jobs or the launcher did: a job not ended ``limit`` s after the
    fault is listed in ``hung``, a unit left behind in ``units_left`` (both cleaned up here,
    so a failing test does not spill into the next one).
    """
    statuses: dict[str, set[int]] = {}

    def on_update(job: BaseJob) -> None:
        if job.wait_status is not None:
            statuses.setdefault(job.jobid, set()).add(job.wait_status)

    fds_before = num_fds()
    table_before = fd_table()
    t0 = time.monotonic()
    codes: dict[str, int | None] = {}
    outputs: dict[str, bytes] = {}
    hung: list[str] = []
    with count_finished() as calls:
        launcher = Launcher(cfg, on_update=on_update)
        await launcher.connect()
        try:
            specs = [JobSpec(jobid=c.jobid, argv=["sh", "-c", c.script]) for c in cases]
            started = await asyncio.gather(
                *(launcher.start(s) for s in specs), return_exceptions=True
            )
            start_time = time.monotonic() - t0
            jobs = [j for j in started if isinstance(j, Job)]
            failures = [
                f"{s.jobid}: {r!r}"
                for s, r in zip(specs, started, strict=True)
                if not isinstance(r, Job)
            ]
            readers = {j.jobid: asyncio.ensure_future(_read_all(j)) for j in jobs}
            waits = {j.jobid: asyncio.ensure_future(j.wait()) for j in jobs}
            if fault is not None:
                await asyncio.sleep(fault_after)
                await fault()
            await asyncio.wait([*waits.values(), *readers.values()], timeout=limit)
            for jobid, w in waits.items():
                if w.done() and readers[jobid].done():
                    codes[jobid] = w.result()
                    outputs[jobid] = readers[jobid].result()
                else:
                    hung.append(jobid)
                    w.cancel()
                    readers[jobid].cancel()
            errors = {j.jobid: j.error for j in jobs if j.error}
            reconnects = launcher.manager.reconnects
        finally:
            await launcher.close()
    elapsed = time.monotonic() - t0
    units_left = [u for u in sdexec_units() if any(unit_name(c.jobid) == u for c in cases)]
    for unit in units_left:
        stop_unit_quietly(unit)
    # A finished Job keeps its stdio sockets until it is dropped (test_finished_job_holds_no_fd);
    # here the jobs are dropped so that the count shows what the launcher itself keeps.
    del jobs, started, launcher, readers, waits
    await settle_fds(fds_before)
    return BatchResult(
        codes=codes,
        outputs=outputs,
        errors=errors,
        finished_calls=calls,
        statuses_seen=statuses,
        hung=hung,
        units_left=units_left,
        fds_before=fds_before,
        fds_after=num_fds(),
        fd_diff={k: v for k, v in fd_table().items() if table_before.get(k) != v},
        elapsed=elapsed,
        start_time=start_time,
        reconnects=reconnects,
        start_failures=failures,
    )


async def run_tool(*argv: str, check: bool = True) -> int:
    """Run a command without blocking the event loop the launcher lives on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rc = await asyncio.wait_for(proc.wait(), 60)
    assert rc == 0 or not check, f"{' '.join(argv)} failed with {rc}"
    return rc


async def systemctl(*args: str, check: bool = True) -> int:
    return await run_tool("systemctl", *args, check=check)


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
