"""``sdexec run``'s output relay: every byte to a slow non-blocking fd; EPIPE reaches the job.

Issue 10 item 5: a non-blocking stdout got 65,536 of 200,000 bytes (the rest of a chunk was
dropped on BlockingIOError). Issue 9 M9: after EPIPE the relay discarded output forever, so
``sdexec run -- yes | head`` never ended.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import threading

from sdexec.cli.cmd_run import _relay
from sdexec.exec.channel import DEVNULL, PIPE, Channels


def _slow_drain(fd: int, out: bytearray) -> threading.Thread:
    """A reader that takes small bites until EOF, so the writer keeps finding the pipe full."""

    def run() -> None:
        while chunk := os.read(fd, 512):
            out.extend(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_every_byte_reaches_a_slow_non_blocking_fd() -> None:
    data = bytes(i % 251 for i in range(200_000))
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # smaller than a relay chunk: writes fall short
    os.set_blocking(w, False)
    got = bytearray()
    drain = _slow_drain(r, got)

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await asyncio.wait_for(_relay(reader, w), 60)

    try:
        asyncio.run(main())
    finally:
        os.close(w)
    drain.join(60)
    os.close(r)
    assert len(got) == len(data)
    assert bytes(got) == data


def test_two_relays_share_a_slow_fd_without_losing_bytes() -> None:
    """Several shells relay to the same fd: one writer at a time, nothing lost."""
    parts = [bytes([65 + k]) * 100_000 for k in range(2)]
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    got = bytearray()
    drain = _slow_drain(r, got)

    async def main() -> None:
        lock = asyncio.Lock()
        readers = []
        for part in parts:
            reader = asyncio.StreamReader()
            reader.feed_data(part)
            reader.feed_eof()
            readers.append(reader)
        await asyncio.wait_for(asyncio.gather(*(_relay(rd, w, lock) for rd in readers)), 60)

    try:
        asyncio.run(main())
    finally:
        os.close(w)
    drain.join(60)
    os.close(r)
    assert sorted(got) == sorted(parts[0] + parts[1])


def test_a_closed_reader_of_ours_reaches_the_job_as_sigpipe() -> None:
    """Our stdout's reader goes away: the job's own next write fails, it dies of SIGPIPE."""
    r, w = os.pipe()
    os.set_blocking(w, False)  # a full pipe must not block the loop before `head` exits

    async def main() -> int:
        channels = Channels.create(DEVNULL, PIPE, DEVNULL)
        _stdin, out, _err = await channels.open_streams()
        try:
            # `yes` writing into the job's end, as a unit's main process would
            job = await asyncio.create_subprocess_exec(
                "yes", stdin=subprocess.DEVNULL, stdout=channels.remote[1]
            )
            channels.close_remote()
            relay = asyncio.ensure_future(_relay(out, w))
            loop = asyncio.get_running_loop()
            head = await loop.run_in_executor(None, os.read, r, 10)
            assert head == b"y\ny\ny\ny\ny\n"
            os.close(r)  # `head -c 10` exits
            await asyncio.wait_for(relay, 20)
            return await asyncio.wait_for(job.wait(), 60)
        finally:
            channels.close()

    try:
        rc = asyncio.run(main())
    finally:
        os.close(w)
    assert rc == -signal.SIGPIPE
