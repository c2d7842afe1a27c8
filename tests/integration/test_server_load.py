"""The node's server (socket-activated ``sdexec.service``) under load and faults (issue 9).

What must hold whatever happens: the server keeps serving (never exits), every client gets
its own job's status exactly once (a client reports once: its exit), a resource shortage is
a 125 to retry and never a usage error (2), and afterwards no unit, no record and no extra
descriptor of the server is left.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sdexec.systemd.cgroup import is_unified

from .conftest import SDEXEC
from .faults_helpers import JobCase, staggered, systemctl
from .load_helpers import (
    SOCKET,
    client,
    client_env,
    ensure_server,
    fds_of,
    records_of,
    run_clients,
    server_pid,
    settled_fds,
    units_left,
)

# The server under load is a property of sdexec, not of the cgroup hierarchy: it is shown in the
# podman node. In the pure-v2 VM (qemu TCG, 15-25x slower) thousands of clients would measure
# qemu; the VM is there for what only cgroup v2 enforces.
pytestmark = pytest.mark.skipif(
    is_unified(), reason="load tests run in the podman node (the qemu VM would time TCG)"
)

Config = Callable[..., str]
IDLE_CLIENTS = Path(__file__).with_name("idle_clients.py")
GUEST = "guest"  # uid 1500 in the node (containers/Containerfile)


def _report(name: str, **figures: object) -> None:
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


@pytest.fixture(autouse=True)
def server() -> None:
    if not os.path.exists(SOCKET):
        pytest.fail("sdexec.socket is not listening in the node (containers/node up installs it)")
    subprocess.run(["systemctl", "reset-failed", "sdexec.service"], check=False)


def _quick(prefix: str, n: int) -> list[JobCase]:
    """Jobs that print their id and exit with their own code at once."""
    cases = []
    for i in range(n):
        jobid = f"{prefix}-{i}"
        code = i % 200
        cases.append(JobCase(jobid, f"echo {jobid}; exit {code}", code, f"{jobid}\n".encode()))
    return cases


# --- H2: one user's idle connections ---------------------------------------------------------


@pytest.mark.slow
async def test_2000_idle_connections_of_one_user_do_not_stop_root(tmp_path: Path) -> None:
    """mallory keeps 2000 connections open (each one the server closes is opened again) while
    root runs 100 jobs: root's statuses are all exact, the server never exits, mallory gets
    "busy" (per-user cap) and "request-timeout" answers, and the server's fds come back."""
    pid = ensure_server()
    fds_before = fds_of(pid)
    guest = await asyncio.create_subprocess_exec(
        "runuser", "-u", GUEST, "--", "python3", "-c", IDLE_CLIENTS.read_text(), SOCKET, "2000",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd="/",
    )  # fmt: skip
    assert guest.stdin is not None and guest.stdout is not None
    first = json.loads(await asyncio.wait_for(guest.stdout.readline(), 120))
    fds_loaded = fds_of(pid)
    cases = _quick("ld-idle", 100)
    try:
        res = await run_clients(cases)
        # mallory's admitted connections are closed by the request timeout (10 s)
        timed_out = json.loads(await asyncio.wait_for(guest.stdout.readline(), 120))
        assert timed_out == {"first_timeout": True}, timed_out
    finally:
        guest.stdin.close()
        last = json.loads(await asyncio.wait_for(guest.stdout.readline(), 60))
        await guest.wait()
    answers = last["answers"]
    fds_after = await settled_fds(pid, fds_before)
    wrong = res.wrong(cases)
    _report(
        "2000 idle guest connections + 100 root jobs", guest_connected=first["connected"],
        guest_answers=answers, guest_connect_errors=last["connect_errors"],
        root_codes_ok=100 - len(wrong), root_wall=f"{res.elapsed:.1f}s",
        server_fds=f"{fds_before}->{fds_loaded} (loaded)->{fds_after}",
    )  # fmt: skip
    assert first["connected"] == 2000, first
    assert wrong == [], wrong
    assert server_pid() == pid, "the server exited under the load"
    assert answers.get("busy", 0) > 0 and answers.get("timeout", 0) > 0, answers
    assert set(answers) <= {"busy", "timeout"}, answers
    assert fds_loaded <= fds_before + 256 + 16, "the per-user cap did not bound the server's fds"
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert records_of("ld-idle") == [] and units_left("ld-idle") == []


# --- H3: 500 clients at once -----------------------------------------------------------------


@pytest.mark.slow
async def test_500_concurrent_clients_run_or_get_125(tmp_path: Path) -> None:
    """500 ``sdexec run`` at once, each job held until all 500 are in: every client ran its
    job (0) or was told 125 to retry (and then its job never ran); none gets 2."""
    pid = ensure_server()
    fds_before = fds_of(pid)
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = tmp_path / "gate"
    gate.touch()
    n = 500
    t0 = time.monotonic()
    with gate.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # every job waits on it: 500 at once for real
        try:
            argvs = [
                [*SDEXEC, "run", "--job", f"ld-c500-{i}", "--", "sh", "-c",
                 f"touch {marks}/{i}; exec flock -s {gate} true"]
                for i in range(n)
            ]  # fmt: skip
            clients = [asyncio.ensure_future(client(argv, limit=900)) for argv in argvs]
            deadline = time.monotonic() + 600
            # every client has its job running (its mark) or has exited: then all are in
            while time.monotonic() < deadline:
                if len(os.listdir(marks)) + sum(c.done() for c in clients) >= n:
                    break
                await asyncio.sleep(0.2)
            together = len(os.listdir(marks))
            t_all_in = time.monotonic() - t0
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
        results = await asyncio.gather(*clients)
    elapsed = time.monotonic() - t0
    ran = {int(p.name) for p in marks.iterdir()}
    codes = Counter(r.rc for r in results)
    bad = [
        f"ld-c500-{i}: {r.rc} {r.err.strip()[-200:]!r}"
        for i, r in enumerate(results)
        if (r.rc, i in ran) not in ((0, True), (125, False))
    ]
    fds_after = await settled_fds(pid, fds_before)
    _report(
        "500 concurrent root clients", codes=dict(codes), jobs_running_together=together,
        all_in=f"{t_all_in:.1f}s", wall=f"{elapsed:.1f}s", server_fds=f"{fds_before}->{fds_after}",
    )  # fmt: skip
    assert bad == [], bad[:20]
    assert all("retry" in r.err for r in results if r.rc == 125), [
        r.err for r in results if r.rc == 125 and "retry" not in r.err
    ][:5]
    assert codes[0] > 0, "the server ran none of them"
    assert 2 not in codes
    assert server_pid() == pid, "the server exited under the load"
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert records_of("ld-c500") == [] and units_left("ld-c500") == []


# --- H5, reexec, H6: systemd, the bus or the server go away during 50 jobs -------------------


def _marked(prefix: str, marks: Path) -> list[JobCase]:
    """``staggered`` jobs that also leave a mark when they run (what a client cannot see)."""
    return [
        JobCase(c.jobid, f"touch {marks}/{c.jobid}; {c.script}", c.code, c.stdout)
        for c in staggered(prefix, 50, 0)
    ]


async def _faulted_run(
    prefix: str, fault_name: str, fault: object, fault_after: float, marks: Path,
    *, not_started_ok: bool = False,
) -> None:  # fmt: skip
    """50 jobs through the server, ``fault`` while they start. Each client must exit with its
    own job's status; with ``not_started_ok`` (the server itself killed) a client may instead
    get 125 "did not run / was not started" for a job the server had not started yet, and
    then that job must really never have run (a resource manager will run it again)."""
    pid = ensure_server()
    fds_before = fds_of(pid)
    os.mkdir(marks)
    cases = _marked(prefix, marks)
    res = await run_clients(cases, fault, fault_after=fault_after)  # type: ignore[arg-type]
    ran = set(os.listdir(marks))
    not_started = [
        c.jobid
        for c in cases
        if not_started_ok
        and res.results[c.jobid].rc == 125
        and ("not started" in res.results[c.jobid].err or "did not run" in res.results[c.jobid].err)
        and c.jobid not in ran
    ]
    wrong = [w for w in res.wrong(cases) if w.split(":")[0] not in not_started]
    wrong += [f"{c.jobid}: ran but was not reported" for c in cases
              if c.jobid in ran and res.results[c.jobid].rc != c.code]  # fmt: skip
    now = ensure_server()  # after a kill -9 the next one may not have been needed yet
    fds_after = await settled_fds(now, fds_before) if now == pid else fds_of(now)
    records, units = records_of(prefix), units_left(prefix)
    _report(
        f"{fault_name} during 50 jobs through the server", faults=res.faults,
        exact=50 - len(wrong) - len(not_started), not_started_125=len(not_started),
        wall=f"{res.elapsed:.1f}s", server=f"pid {pid}->{now}",
        server_fds=f"{fds_before}->{fds_after}", records_left=len(records),
        units_left=len(units),
    )  # fmt: skip
    assert wrong == [], wrong
    assert records == [] and units == []
    if now == pid:
        assert fds_after <= fds_before, (fds_before, fds_after)


@pytest.mark.slow
async def test_dbus_restart_during_50_jobs_through_the_server(tmp_path: Path) -> None:
    async def fault() -> int:
        n = 0
        for _ in range(2):
            await systemctl("reset-failed", "dbus.service", "dbus.socket", check=False)
            await systemctl("restart", "dbus")
            n += 1
            await asyncio.sleep(0.5)
        return n

    try:
        await _faulted_run("ld-dbus", "systemctl restart dbus", fault, 0.3, tmp_path / "m")
    finally:
        await systemctl("reset-failed", "dbus.service", "dbus.socket", check=False)
        await systemctl("start", "dbus.socket", "dbus.service", check=False)


@pytest.mark.slow
async def test_daemon_reexec_during_50_jobs_through_the_server(tmp_path: Path) -> None:
    async def fault() -> int:
        n = 0
        t_end = time.monotonic() + 2.5
        while time.monotonic() < t_end:
            await systemctl("daemon-reexec")
            n += 1
        return n

    await _faulted_run("ld-reexec", "systemctl daemon-reexec", fault, 0.3, tmp_path / "m")


@pytest.mark.slow
async def test_server_killed_during_50_jobs(tmp_path: Path) -> None:
    """kill -9 of the server 0.2 s into 50 starts: socket activation starts a new one, which
    re-adopts every job; each client follows its job there (H6), or learns that it did not
    start (and it did not)."""

    async def fault() -> int:
        await systemctl("kill", "-s", "KILL", "sdexec.service")
        return 1

    await _faulted_run(
        "ld-kill", "systemctl kill -s KILL sdexec.service", fault, 0.2, tmp_path / "m",
        not_started_ok=True,
    )  # fmt: skip


# --- H2/H3 at the limit: a server with few descriptors ---------------------------------------


@pytest.mark.slow
async def test_fd_shortage_is_125_to_retry_never_2(tmp_path: Path, config: Config) -> None:
    """A server held to 64 descriptors, 100 clients whose jobs hold their connection: accept()
    hits EMFILE (the loop backs off and goes on) and recvmsg() drops a client's stdio
    (MSG_CTRUNC: 125 "retry"). Every client runs (0) or gets 125; none 2; the server stays."""
    sock = tmp_path / "s.sock"
    cfg = config()
    log = (tmp_path / "server.log").open("w+")
    server = await asyncio.create_subprocess_exec(
        *SDEXEC, "-v", "serve", "--config", cfg, "--socket", str(sock),
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:  # noqa: ASYNC110 (no event)
            await asyncio.sleep(0.05)
        env = {**client_env(), "SDEXEC_SOCKET": str(sock)}
        n = 100
        argvs = [[*SDEXEC, "run", "--job", f"ld-fd-{i}", "--", "sleep", "3"] for i in range(n)]
        t0 = time.monotonic()
        results = await asyncio.gather(*(client(a, limit=300, env=env) for a in argvs))
        elapsed = time.monotonic() - t0
        after = await client([*SDEXEC, "run", "--", "true"], limit=60, env=env)
        alive = server.returncode is None
    finally:
        server.terminate()
        await server.wait()
    log.seek(0)
    text = log.read()
    codes = Counter(r.rc for r in results)
    shortage = sum("short of file descriptors" in r.err for r in results)
    accept_errors = text.count("accept: [Errno 24]")
    _report(
        "server at 64 fds, 100 clients", codes=dict(codes), ctrunc_125=shortage,
        accept_emfile_log_lines=accept_errors, wall=f"{elapsed:.1f}s",
    )  # fmt: skip
    assert alive and after.rc == 0, (after, text[-2000:])
    assert set(codes) <= {0, 125}, [r for r in results if r.rc not in (0, 125)][:5]
    assert all("retry" in r.err for r in results if r.rc == 125), results
    assert accept_errors + shortage > 0, "the limit was never reached: the test proves nothing"
    assert "Traceback" not in text, text[-3000:]
    assert records_of("ld-fd", cfg) == [] and units_left("ld-fd") == []
