"""Pieces of the server load and fault tests: many ``sdexec run`` clients at once, meters.

The clients are real processes of the installed ``sdexec`` going through the node's
socket-activated ``sdexec.service``; what each prints and exits with is all a test reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .conftest import SDEXEC, sdexec_units
from .faults_helpers import JobCase, stop_unit_quietly

SOCKET = "/run/sdexec/sdexec.sock"


_NOT_PASSED = (
    "SDEXEC_CONFIG", "SDEXEC_NO_SERVER", "COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG",
)  # fmt: skip


def client_env() -> dict[str, str]:
    """The environment of a client that goes through the server (no --config, no opt-out).

    Unmeasured (tests/run measures coverage): hundreds of clients and their job shells each
    importing coverage would be load of the test's own making, and these tests are about the
    server's behaviour under load (the server itself stays measured); the clients' and the
    shells' code is measured by the other tests."""
    return {k: v for k, v in os.environ.items() if k not in _NOT_PASSED}


def server_pid() -> int:
    out = subprocess.run(
        ["systemctl", "show", "-P", "MainPID", "sdexec.service"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.strip() or 0)


def ensure_server() -> int:
    """The server's pid, starting it through its socket (one job) if it is not running."""
    if server_pid() == 0:
        p = subprocess.run(
            [*SDEXEC, "run", "--", "true"], env=client_env(), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
    pid = server_pid()
    assert pid != 0, "sdexec.service did not start"
    return pid


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, target: int, within: float = 30.0) -> int:
    """The server's fd count once it is back to ``target`` (closes under way done), or as it
    is after ``within`` seconds (then the test's comparison fails and shows it)."""
    deadline = time.monotonic() + within
    while (n := fds_of(pid)) > target and time.monotonic() < deadline:  # noqa: ASYNC110 (no event for it)
        await asyncio.sleep(0.1)
    return n


@dataclass
class ClientResult:
    rc: int | None  # None: still running at the limit (killed)
    out: bytes
    err: str


@dataclass
class Clients:
    results: dict[str, ClientResult]
    elapsed: float
    faults: int = 0
    errors: list[str] = field(default_factory=list)

    def wrong(self, cases: list[JobCase]) -> list[str]:
        """Clients whose status or output is not their job's own (each client reports once)."""
        bad = []
        for case in cases:
            r = self.results[case.jobid]
            if r.rc != case.code or r.out != case.stdout or "Traceback" in r.err:
                bad.append(f"{case.jobid}: want {case.code} {case.stdout!r}, got {r.rc} {r.out!r}"
                           f" {r.err.strip()[-300:]!r}")  # fmt: skip
        return bad

    def codes(self) -> dict[int | None, int]:
        out: dict[int | None, int] = {}
        for r in self.results.values():
            out[r.rc] = out.get(r.rc, 0) + 1
        return out


async def client(argv: list[str], limit: float, env: dict[str, str] | None = None) -> ClientResult:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env or client_env(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        try:  # a unit left running may still hold the client's stdout: bounded too
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        except TimeoutError:
            out, err = b"", b"(killed; its stdout stayed open: held by a unit?)"
        return ClientResult(None, out, err.decode(errors="replace"))
    return ClientResult(proc.returncode, out, err.decode(errors="replace"))


async def run_clients(
    cases: list[JobCase],
    fault: Callable[[], Awaitable[int]] | None = None,
    *,
    fault_after: float = 0.0,
    limit: float = 180.0,
) -> Clients:
    """One ``sdexec run --job ID -- sh -c SCRIPT`` client per case, all at once; ``fault``
    (returning how many faults it injected) runs ``fault_after`` s after the first starts."""
    t0 = time.monotonic()
    tasks = {
        c.jobid: asyncio.ensure_future(
            client([*SDEXEC, "run", "--job", c.jobid, "--", "sh", "-c", c.script], limit)
        )
        for c in cases
    }
    faults = 0
    if fault is not None:
        await asyncio.sleep(fault_after)
        faults = await fault()
    await asyncio.gather(*tasks.values())
    return Clients({k: t.result() for k, t in tasks.items()}, time.monotonic() - t0, faults)


def records_of(prefix: str, config: str | None = None) -> list[str]:
    """Job records left in the state db (the node's, or ``config``'s) and orphan units, for
    jobs named PREFIX*."""
    p = subprocess.run(
        [*SDEXEC, "jobs", "--json", *(["--config", config] if config else [])],
        capture_output=True, text=True, timeout=60, check=True, env=client_env(),
    )  # fmt: skip
    return [
        str(j)
        for j in json.loads(p.stdout)
        if str(j.get("jobid") or "").startswith(prefix) or f"-{prefix}" in str(j.get("unit"))
    ]


def units_left(prefix: str) -> list[str]:
    """Units of jobs named PREFIX* still loaded; stopped and reset so the next test is clean."""
    left = [u for u in sdexec_units() if f"-{prefix}" in u]
    for unit in left:
        stop_unit_quietly(unit)
    return left
