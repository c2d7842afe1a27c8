"""Connection admission (sdexec/server/admission.py) and the server's low-level receive and
accept path (sdexec/server/server.py) with real sockets: caps, the request timeout, MSG_CTRUNC
at EMFILE."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sdexec.config.table import ExecConfig, SiteConfig
from sdexec.errors import LaunchError, RefusedError, UsageError
from sdexec.server.admission import Admission, Limits, raise_fd_limit
from sdexec.server.server import Server, _recv_with_fds

ROOT, ME, MALLORY, EVE = 0, 1000, 1500, 1501


def _lines(value: object) -> list[str]:
    """The stderr lines of a reply, typed (a reply is JSON: anything until checked)."""
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), value
    return value


def test_per_user_cap_applies_to_others_only() -> None:
    a = Admission(Limits(total=10, per_user=2), exempt=frozenset({ROOT, ME}))
    assert [a.admit(MALLORY), a.admit(MALLORY)] == [None, None]
    refusal = a.admit(MALLORY)
    assert refusal is not None and "busy for uid 1500" in refusal and "retry" in refusal
    assert "max-connections-per-user" in refusal
    assert a.admit(EVE) is None  # another user is not held to mallory's count
    assert all(a.admit(ROOT) is None for _ in range(3))  # root: the total only
    assert a.admit(ME) is None
    assert (a.total, a.refused) == (7, 1)


def test_total_cap_refuses_everyone_then_frees() -> None:
    a = Admission(Limits(total=2, per_user=2), exempt=frozenset({ROOT}))
    assert a.admit(ROOT) is None and a.admit(MALLORY) is None
    refusal = a.admit(ROOT)
    assert refusal is not None and "max-connections allows" in refusal
    a.release(MALLORY)
    assert a.admit(ROOT) is None
    assert dict(a.by_uid) == {ROOT: 2}


def test_release_of_nothing_is_a_bug() -> None:
    a = Admission(Limits(total=2, per_user=2), exempt=frozenset())
    with pytest.raises(ValueError):
        a.release(MALLORY)


def test_fd_limit_soft_raised_to_hard() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert raise_fd_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- the receive: fds and MSG_CTRUNC ---------------------------------------------------------


@contextmanager
def fd_table_full() -> Iterator[None]:
    """Every descriptor this process may open is in use (EMFILE), as at the server's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))  # a few to fill, not 1M
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fds_dropped_at_emfile_are_reported_truncated() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        socket.send_fds(theirs, [b'{"op": "run"}\n'], [0, 1, 2])
        fds: list[int] = []
        with fd_table_full():
            data, truncated = _recv_with_fds(ours, fds)
        assert (data, truncated, fds) == (b'{"op": "run"}\n', True, [])


def test_fds_received_close_on_exec() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        socket.send_fds(theirs, [b"x"], [0, 1, 2])
        fds: list[int] = []
        assert _recv_with_fds(ours, fds) == (b"x", False)
        try:
            assert len(fds) == 3 and not any(os.get_inheritable(fd) for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)


# --- the server: timeout, shortage, caps at accept --------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    cfg = ExecConfig(
        sdexec=SiteConfig(
            state_dir=str(tmp_path / "state"), request_timeout=0.2, max_connections=2,
            max_connections_per_user=1,
        )
    )  # fmt: skip
    srv = Server(cfg)
    yield srv
    assert srv.db is not None
    srv.db.close()


async def _reply(sock: socket.socket) -> dict[str, object]:
    """The server's one-line answer, read without blocking the loop the server runs on."""
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(10):
        while b"\n" not in data:
            more = await asyncio.get_running_loop().sock_recv(sock, 4096)
            assert more, f"closed without a line: {data!r}"
            data += more
    return dict(json.loads(data.partition(b"\n")[0]))


async def test_a_request_that_never_comes_is_answered_125(server: Server) -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        await server.handle(ours)  # closes ours
        reply = await _reply(theirs)
    assert reply["exit"] == 125
    (line,) = _lines(reply["stderr"])
    assert "no complete request within 0.2s ([sdexec] request-timeout)" in line


async def test_half_a_request_times_out_and_its_fds_are_closed(server: Server) -> None:
    # The fds sent are copies of one pipe's read end and ours is closed once sent: if the
    # server kept any, a write to the pipe would still succeed. (Counting /proc/self/fd is
    # not a test of this: another test's socket collected meanwhile changes the count.)
    read_end, write_end = os.pipe()
    ours, theirs = socket.socketpair()
    with theirs:
        socket.send_fds(theirs, [b'{"op": "run", "argv": '], [read_end] * 3)
        os.close(read_end)
        ours.setblocking(False)  # as handle() makes every connection
        with pytest.raises(LaunchError, match="request-timeout"):
            await server._receive(ours)
        ours.close()
    try:
        with pytest.raises(BrokenPipeError):  # no received fd kept
            os.write(write_end, b"x")
    finally:
        os.close(write_end)


async def test_stdio_dropped_by_the_kernel_is_a_shortage_not_a_usage_error(
    server: Server,
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        socket.send_fds(theirs, [b'{"op": "run"}\n'], [0, 1, 2])
        ours.setblocking(False)
        with fd_table_full(), pytest.raises(LaunchError, match=r"short of file descriptors.*retry"):
            await server._receive(ours)


async def test_more_than_three_fds_is_a_usage_error(server: Server) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        socket.send_fds(theirs, [b'{"op": "run"}\n'], [0, 1, 2, 0, 1])
        ours.setblocking(False)
        with pytest.raises(UsageError, match="got more fds"):
            await server._receive(ours)


async def test_over_the_cap_is_refused_at_accept_with_busy(server: Server) -> None:
    """The server's own uid counts towards the total only; the total (2) refuses the third."""
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for ours, _theirs in pairs:
            ours.setblocking(False)
            server._admit(ours)
        reply = await _reply(pairs[2][1])
        assert reply["exit"] == 125
        assert "busy" in str(reply["stderr"]) and "retry" in str(reply["stderr"])
        assert server.admission.total == 2
        for _ours, theirs in pairs[:2]:  # the admitted ones time out (0.2 s) and are released
            assert "request-timeout" in str((await _reply(theirs))["stderr"])
        await asyncio.gather(*server._tasks)
        assert server.admission.total == 0
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


# --- a re-attaching client of a job found never started -------------------------------------


async def test_a_client_told_of_a_job_that_never_started_hears_so_once(server: Server) -> None:
    """After a kill -9 the new server finds the job's record but no unit: it never ran, and
    its record goes. Its client, already told the job id, comes back: it must hear "did not
    run" (a resource manager may run it again), not "no record" -- once, and only its owner."""
    uid = os.getuid()
    server._remember_unstarted("ns1", {uid}, "job ns1 was not started (its launcher stopped)")
    with pytest.raises(LaunchError, match=r"ns1 was not started .*; it did not run"):
        await server._attach({"op": "attach", "jobid": "ns1"}, uid)
    with pytest.raises(RefusedError, match="no record of job ns1"):  # told once
        await server._attach({"op": "attach", "jobid": "ns1"}, uid)


def test_another_user_learns_nothing_of_an_unstarted_job(server: Server) -> None:
    server._remember_unstarted("ns2", {4242}, "not started")
    assert server._unstarted("ns2", 4343) is None
    assert server._unstarted("ns2", 4242) == "not started"


def test_unstarted_jobs_are_bounded(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexec.server import server as srvmod

    monkeypatch.setattr(srvmod, "UNSTARTED_MAX", 3)
    for i in range(10):
        server._remember_unstarted(f"b{i}", {1}, "not started")
    assert list(server.unstarted) == ["b7", "b8", "b9"]
