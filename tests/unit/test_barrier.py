"""The local start barrier: completion, timeout from the first entry, bad ranks, hang-ups."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.errors import LaunchError, SdexecError
from sdexec.exec.barrier import (
    BarrierError,
    BarrierTimeout,
    LocalBarrierServer,
    UnixBarrierClient,
    enter_barrier_sync,
    format_ranks,
)
from sdexec.exec.clock import FakeClock


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="sdb", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0, auto_advance=False)


@pytest.fixture
async def server3(sock_dir: str, clock: FakeClock) -> AsyncIterator[LocalBarrierServer]:
    srv = LocalBarrierServer(f"{sock_dir}/b.sock", 3, timeout=2.0, clock=clock)
    await srv.start()
    yield srv
    await srv.close()


async def until(cond: Callable[[], bool], what: str) -> None:
    """Let the loop run (socket I/O included) until cond holds; never sleeps on real time."""
    for _ in range(20000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def exists(path: str) -> bool:
    return os.path.exists(path)


def write_file(path: str) -> None:
    with open(path, "w") as f:
        f.write("data")


def enter(srv: LocalBarrierServer, rank: int) -> asyncio.Task[None]:
    return asyncio.ensure_future(UnixBarrierClient(srv.path).enter(rank))


async def test_all_ranks_enter_then_everyone_goes(server3: LocalBarrierServer) -> None:
    clients = [enter(server3, r) for r in (2, 0)]
    await until(lambda: server3.entered == [0, 2], "ranks 0 and 2 entered")
    assert not any(c.done() for c in clients)  # nobody goes before the last rank
    assert server3.waiting == [1]
    clients.append(enter(server3, 1))
    await asyncio.wait_for(server3.wait(), 10)
    await asyncio.wait_for(asyncio.gather(*clients), 10)
    assert server3.entered == [0, 1, 2]
    assert server3.done
    # a rank entering again after completion is a duplicate, not a second start
    with pytest.raises(BarrierError, match="rank 1 already entered"):
        await asyncio.wait_for(enter(server3, 1), 10)


async def test_timeout_names_the_missing_rank(
    server3: LocalBarrierServer, clock: FakeClock
) -> None:
    waiter = asyncio.ensure_future(server3.wait())
    clients = [enter(server3, r) for r in (0, 2)]
    await until(lambda: len(server3.entered) == 2, "two ranks entered")
    clock.advance(1.9)
    await until(lambda: clock.now() >= 101.9, "time moved")
    for _ in range(50):
        await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(0.1)
    with pytest.raises(BarrierTimeout) as info:
        await asyncio.wait_for(waiter, 10)
    assert info.value.waiting == [1]
    assert "rank(s) 1" in str(info.value)
    assert isinstance(info.value, SdexecError)
    results = await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 10)
    for r in results:
        assert isinstance(r, BarrierError)
        assert "timed out after 2s" in str(r)
    # a late rank is told the barrier failed, and it does not complete it
    with pytest.raises(BarrierError, match="timed out"):
        await asyncio.wait_for(enter(server3, 1), 10)


async def test_timeout_counts_from_the_first_entry(sock_dir: str, clock: FakeClock) -> None:
    srv = LocalBarrierServer(f"{sock_dir}/b.sock", 2, timeout=2.0, clock=clock)
    await srv.start()
    try:
        clock.advance(1000)  # a long time with nobody entered is not a timeout
        waiter = asyncio.ensure_future(srv.wait())
        first = enter(srv, 1)
        await until(lambda: srv.entered == [1], "rank 1 entered")
        assert srv.first_entry == 1100.0
        clock.advance(1.5)
        for _ in range(50):
            await asyncio.sleep(0)
        assert not waiter.done()
        await asyncio.wait_for(enter(srv, 0), 10)
        await asyncio.wait_for(asyncio.gather(waiter, first), 10)
    finally:
        await srv.close()


async def test_timeout_zero_waits_forever(sock_dir: str, clock: FakeClock) -> None:
    srv = LocalBarrierServer(f"{sock_dir}/b.sock", 3, timeout=0, clock=clock)
    await srv.start()
    try:
        waiter = asyncio.ensure_future(srv.wait())
        clients = [enter(srv, r) for r in (0, 1)]
        await until(lambda: len(srv.entered) == 2, "two ranks entered")
        clock.advance(3600)
        for _ in range(100):
            await asyncio.sleep(0)
        assert not waiter.done()
        assert not any(c.done() for c in clients)
        clients.append(enter(srv, 2))
        await asyncio.wait_for(asyncio.gather(waiter, *clients), 10)
    finally:
        await srv.close()


async def test_duplicate_rank_is_rejected(server3: LocalBarrierServer) -> None:
    first = enter(server3, 0)
    await until(lambda: server3.entered == [0], "rank 0 entered")
    with pytest.raises(BarrierError, match="rank 0 already entered"):
        await asyncio.wait_for(enter(server3, 0), 10)
    assert server3.entered == [0]
    assert not first.done()
    first.cancel()


@pytest.mark.parametrize("rank", [3, 100])
async def test_out_of_range_rank_is_rejected(server3: LocalBarrierServer, rank: int) -> None:
    with pytest.raises(BarrierError, match=f"rank {rank} out of range"):
        await asyncio.wait_for(enter(server3, rank), 10)
    assert server3.entered == []


async def test_ranks_with_an_offset(sock_dir: str, clock: FakeClock) -> None:
    """A node other than a job's first runs ranks 4..5, not 0..1 (issue 10)."""
    srv = LocalBarrierServer(f"{sock_dir}/b.sock", 2, timeout=2.0, clock=clock, first_rank=4)
    await srv.start()
    try:
        assert srv.waiting == [4, 5]
        with pytest.raises(BarrierError, match=r"rank 0 out of range \(ranks 4-5\)"):
            await asyncio.wait_for(enter(srv, 0), 10)
        with pytest.raises(BarrierError, match="rank 6 out of range"):
            await asyncio.wait_for(enter(srv, 6), 10)
        first = enter(srv, 5)
        await until(lambda: srv.entered == [5], "rank 5 entered")
        assert srv.waiting == [4]
        await asyncio.wait_for(asyncio.gather(first, enter(srv, 4)), 10)
        await asyncio.wait_for(srv.wait(), 10)
    finally:
        await srv.close()


async def test_timeout_names_the_offset_ranks(sock_dir: str, clock: FakeClock) -> None:
    srv = LocalBarrierServer(f"{sock_dir}/b.sock", 3, timeout=2.0, clock=clock, first_rank=8)
    await srv.start()
    try:
        waiter = asyncio.ensure_future(srv.wait())
        entered = enter(srv, 9)
        await until(lambda: srv.entered == [9], "rank 9 entered")
        clock.advance(2.0)
        with pytest.raises(BarrierTimeout) as info:
            await asyncio.wait_for(waiter, 10)
        assert info.value.waiting == [8, 10]
        with pytest.raises(BarrierError):
            await asyncio.wait_for(entered, 10)
    finally:
        await srv.close()


async def test_negative_rank_is_rejected_by_the_client(server3: LocalBarrierServer) -> None:
    with pytest.raises(BarrierError, match="must be >= 0"):
        await enter(server3, -1)


@pytest.mark.parametrize("request_line", [b"hello\n", b"enter\n", b"enter x\n", b"enter 1 2\n"])
async def test_malformed_request_gets_fail(
    server3: LocalBarrierServer, request_line: bytes
) -> None:
    reader, writer = await asyncio.open_unix_connection(server3.path)
    writer.write(request_line)
    answer = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert answer.startswith(b"fail bad request")
    assert server3.entered == []


async def test_a_client_that_hangs_up_no_longer_counts(server3: LocalBarrierServer) -> None:
    _, writer = await asyncio.open_unix_connection(server3.path)
    writer.write(b"enter 1\n")
    await writer.drain()
    await until(lambda: server3.entered == [1], "rank 1 entered")
    writer.close()
    await until(lambda: server3.entered == [], "rank 1 left")
    # the rank may enter again (its shell restarted)
    clients = [enter(server3, r) for r in (0, 1, 2)]
    await asyncio.wait_for(asyncio.gather(server3.wait(), *clients), 10)


async def test_close_fails_waiting_clients_and_unlinks(server3: LocalBarrierServer) -> None:
    waiter = asyncio.ensure_future(server3.wait())
    client = enter(server3, 0)
    await until(lambda: server3.entered == [0], "rank 0 entered")
    await server3.close()
    with pytest.raises(BarrierError, match=r"closed before rank\(s\) 1-2 entered"):
        await asyncio.wait_for(client, 10)
    with pytest.raises(BarrierError, match="closed"):
        await waiter
    assert not exists(server3.path)


async def test_socket_is_private_to_its_owner(server3: LocalBarrierServer) -> None:
    st_ = os.stat(server3.path)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o600


async def test_owner_uid_gets_the_socket(sock_dir: str, clock: FakeClock) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    srv = LocalBarrierServer(f"{sock_dir}/b.sock", 1, 0, clock, owner_uid=65534)
    await srv.start()
    try:
        assert os.stat(srv.path).st_uid == 65534
    finally:
        await srv.close()


async def test_stale_socket_is_replaced_but_not_a_file(sock_dir: str, clock: FakeClock) -> None:
    path = f"{sock_dir}/b.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    srv = LocalBarrierServer(path, 1, 0, clock)
    await srv.start()
    await asyncio.wait_for(UnixBarrierClient(path).enter(0), 10)
    await srv.wait()
    await srv.close()

    other = f"{sock_dir}/file"
    write_file(other)
    with pytest.raises(LaunchError, match="not a socket"):
        await LocalBarrierServer(other, 1, 0, clock).start()
    assert exists(other)


async def test_sync_client_blocks_until_go(server3: LocalBarrierServer) -> None:
    threads = [
        asyncio.ensure_future(asyncio.to_thread(enter_barrier_sync, server3.path, r))
        for r in (0, 1)
    ]
    await until(lambda: server3.entered == [0, 1], "two sync clients entered")
    assert not any(t.done() for t in threads)
    await asyncio.wait_for(enter(server3, 2), 10)
    await asyncio.wait_for(asyncio.gather(*threads), 10)


async def test_sync_client_reports_failure(server3: LocalBarrierServer) -> None:
    with pytest.raises(BarrierError, match="out of range"):
        await asyncio.wait_for(asyncio.to_thread(enter_barrier_sync, server3.path, 7), 10)


def test_sync_client_without_server(sock_dir: str) -> None:
    with pytest.raises(BarrierError, match="No such file"):
        enter_barrier_sync(f"{sock_dir}/none.sock", 0)


def test_sync_client_timeout(sock_dir: str) -> None:
    # a server that accepts but never answers
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(f"{sock_dir}/mute.sock")
        s.listen(1)
        with pytest.raises(BarrierError, match=r"no answer within 0\.01s"):
            enter_barrier_sync(f"{sock_dir}/mute.sock", 0, timeout=0.01)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        LocalBarrierServer("/x", 0, 1, FakeClock())
    with pytest.raises(ValueError):
        LocalBarrierServer("/x", 1, -1, FakeClock())
    with pytest.raises(ValueError):
        LocalBarrierServer("/x", 1, float("nan"), FakeClock())


def test_format_ranks_examples() -> None:
    assert format_ranks([]) == ""
    assert format_ranks([3]) == "3"
    assert format_ranks([4, 0, 2, 3, 7, 8]) == "0,2-4,7-8"


@given(st.sets(st.integers(0, 200)))
def test_format_ranks_round_trips(ranks: set[int]) -> None:
    parsed: set[int] = set()
    text = format_ranks(list(ranks))
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        parsed.update(range(int(lo), int(hi or lo) + 1))
    assert parsed == ranks
