"""PMI-1 wire protocol: the pure parsing, and the client against a fake PMI server on a
socketpair (the real one is Slurm's, in tests/cluster)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from sdexec.exec.barrier import BarrierError, UnixBarrierClient
from sdexec.exec.clock import MonotonicClock
from sdexec.exec.pmi import (
    ClusterBarrierServer,
    PmiEndpoint,
    PmiError,
    check_answer,
    env_fd,
    format_command,
    parse_message,
    pmi_barrier,
)


def test_format_command() -> None:
    assert format_command("init", pmi_version=1, pmi_subversion=1) == (
        b"cmd=init pmi_version=1 pmi_subversion=1\n"
    )
    assert format_command("barrier_in") == b"cmd=barrier_in\n"
    for bad in ("a b", "a=b", "", "x\n"):
        with pytest.raises(ValueError):
            format_command("put", value=bad)


def test_parse_message() -> None:
    assert parse_message(b"cmd=barrier_out rc=0\n") == {"cmd": "barrier_out", "rc": "0"}
    assert parse_message(b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n") == {
        "cmd": "response_to_init", "rc": "0", "pmi_version": "1", "pmi_subversion": "1",
    }  # fmt: skip
    for bad in (b"cmd=barrier_out", b"", b"rc=0\n", b"junk\n", b"cmd=x \xff\n", b"=v\n"):
        with pytest.raises(PmiError):
            parse_message(bad)


def test_check_answer() -> None:
    check_answer({"cmd": "barrier_out", "rc": "0"}, "barrier_out")
    check_answer({"cmd": "barrier_out"}, "barrier_out")  # PMI-1.1 may omit rc
    with pytest.raises(PmiError, match="expected cmd=barrier_out"):
        check_answer({"cmd": "finalize_ack", "rc": "0"}, "barrier_out")
    with pytest.raises(PmiError, match="rc=1: failed to send temp kvs"):
        check_answer(
            {"cmd": "barrier_out", "rc": "1", "msg": "failed_to_send_temp_kvs"}, "barrier_out"
        )


def test_endpoint_from_environment() -> None:
    assert PmiEndpoint.from_environment({"PMI_RANK": "1", "PMI_SIZE": "2"}) == PmiEndpoint(1, 2)
    for env in ({}, {"PMI_RANK": "2", "PMI_SIZE": "2"}, {"PMI_RANK": "x", "PMI_SIZE": "2"},
                {"PMI_RANK": "-1", "PMI_SIZE": "2"}, {"PMI_RANK": "0"}):  # fmt: skip
        assert PmiEndpoint.from_environment(env) is None


def test_env_fd_only_for_an_open_socket(tmp_path: object) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        assert env_fd({"PMI_FD": str(a.fileno())}) == a.fileno()
        assert env_fd({"PMI_FD": str(r)}) is None  # not a socket
        assert env_fd({"PMI_FD": "999999"}) is None  # not open
        assert env_fd({"PMI_FD": "x"}) is None and env_fd({}) is None
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


class FakePmi:
    """A PMI-1 server on one end of a socketpair: answers each message like Slurm's, with the
    barrier released by the test (or answered with an error)."""

    def __init__(self, barrier_rc: int = 0) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.barrier_rc = barrier_rc
        self.release = threading.Event()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self._answer()
        except OSError:  # the client went away (timeout tests)
            pass

    def _answer(self) -> None:
        f = self.ours.makefile("rwb", buffering=0)
        for raw in f:
            msg = parse_message(raw)
            self.seen.append(msg["cmd"])
            if msg["cmd"] == "init":
                f.write(b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n")
            elif msg["cmd"] == "barrier_in":
                self.release.wait(30)
                f.write(f"cmd=barrier_out rc={self.barrier_rc}\n".encode())
            elif msg["cmd"] == "finalize":
                f.write(b"cmd=finalize_ack rc=0\n")
                return

    def close(self) -> None:
        self.release.set()
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def fake() -> Iterator[FakePmi]:
    f = FakePmi()
    yield f
    f.close()


async def test_pmi_barrier_sequence(fake: FakePmi) -> None:
    fake.release.set()
    await pmi_barrier(fake.theirs.fileno())
    assert fake.seen == ["init", "barrier_in", "finalize"]


async def test_pmi_barrier_error_is_a_barrier_error() -> None:
    f = FakePmi(barrier_rc=1)
    try:
        f.release.set()
        with pytest.raises(BarrierError, match="barrier_out failed"):
            await pmi_barrier(f.theirs.fileno())
    finally:
        f.close()


async def test_pmi_peer_gone() -> None:
    a, b = socket.socketpair()
    b.close()
    try:
        with pytest.raises(PmiError):
            await pmi_barrier(a.fileno())
    finally:
        a.close()


async def test_cluster_barrier_waits_for_the_other_nodes(fake: FakePmi, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "b.sock")
    server = ClusterBarrierServer(
        path, 1, 30, MonotonicClock(), PmiEndpoint(0, 2, fake.theirs.fileno()), first_rank=3
    )
    await server.start()
    try:
        entering = asyncio.ensure_future(UnixBarrierClient(path).enter(3))
        await asyncio.sleep(0.2)
        assert not entering.done()  # the local shell is in, the other node is not
        fake.release.set()
        await asyncio.wait_for(entering, 10)
        await asyncio.wait_for(server.wait(), 10)
    finally:
        await server.close()
    assert fake.seen == ["init", "barrier_in", "finalize"]


async def test_cluster_barrier_timeout_names_the_other_nodes(
    fake: FakePmi, tmp_path: object
) -> None:
    path = os.path.join(str(tmp_path), "b.sock")
    server = ClusterBarrierServer(
        path, 1, 0.3, MonotonicClock(), PmiEndpoint(0, 2, fake.theirs.fileno())
    )
    await server.start()
    try:
        with pytest.raises(BarrierError, match=r"start barrier failed: .*other nodes"):
            await asyncio.wait_for(UnixBarrierClient(path).enter(0), 10)
        with pytest.raises(BarrierError, match="waiting for the job's other nodes"):
            await server.wait()
    finally:
        await server.close()


async def test_cluster_barrier_refuses_a_pmi_fd_that_is_no_socket(tmp_path: object) -> None:
    from sdexec.errors import LaunchError

    r, w = os.pipe()
    try:
        path = os.path.join(str(tmp_path), "b.sock")
        server = ClusterBarrierServer(path, 1, 30, MonotonicClock(), PmiEndpoint(0, 2, r))
        with pytest.raises(LaunchError, match="not a socket"):
            await server.start()
        assert not os.listdir(str(tmp_path))  # nothing left behind
    finally:
        os.close(r)
        os.close(w)
