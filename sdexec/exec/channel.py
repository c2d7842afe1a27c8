"""Stdio channels: pipes (output) and a socketpair (input) whose far ends go to systemd.

The unit writes into its end; we read ours through asyncio streams. Relaying (rather than
handing systemd the caller's own descriptors) lets the launcher know when output ends, bound
the wait for EOF when leftover processes keep a descriptor open (Flux #6656), and serve
library callers that want the bytes. Output goes through pipes, not sockets: once we close
our reading end (our own reader went away), the job's next write fails with EPIPE *and*
SIGPIPE as in a shell pipeline, even a write blocked on a full buffer (a blocked writer on
a socket gets ECONNRESET or EPIPE without the signal).
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

PIPE = -1
DEVNULL = -3
STREAM_LIMIT = 1 << 20


@dataclass
class Channels:
    """The fds passed to the unit (``remote``) and our ends (``local``), closed exactly once."""

    remote: list[int] = field(default_factory=list)
    local: dict[str, socket.socket | int] = field(default_factory=dict)  # int: a pipe's end
    _owned_remote: list[int] = field(default_factory=list)
    # our writers on the read-only channels: kept so their transports live as long as the job
    _keep: list[asyncio.StreamWriter] = field(default_factory=list)
    _transports: list[asyncio.BaseTransport] = field(default_factory=list)

    @classmethod
    def create(cls, stdin: int, stdout: int, stderr: int) -> Channels:
        ch = cls()
        try:
            for name, spec in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
                if spec == PIPE and name != "stdin":
                    ours_fd, fd = os.pipe2(os.O_CLOEXEC)
                    ch.local[name] = ours_fd
                    ch._owned_remote.append(fd)
                    ch.remote.append(fd)
                elif spec == PIPE:
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    theirs.shutdown(socket.SHUT_WR)
                    ch.local[name] = ours
                    fd = theirs.detach()
                    ch._owned_remote.append(fd)
                    ch.remote.append(fd)
                elif spec == DEVNULL:
                    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                    ch._owned_remote.append(fd)
                    ch.remote.append(fd)
                else:
                    ch.remote.append(spec)  # the caller's own fd: passed, never closed here
        except BaseException:
            ch.close()
            raise
        return ch

    def close_remote(self) -> None:
        """After systemd received the fds it holds its own copies: drop ours, or EOF never comes."""
        for fd in self._owned_remote:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned_remote.clear()

    def close(self) -> None:
        self.close_remote()
        for end in self.local.values():
            if isinstance(end, int):
                os.close(end)
            else:
                end.close()
        self.local.clear()
        for w in self._keep:
            w.close()
        self._keep.clear()
        for t in self._transports:
            t.close()
        self._transports.clear()

    async def open_streams(
        self,
    ) -> tuple[asyncio.StreamWriter | None, EofReader | None, EofReader | None]:
        writer = None
        stdin = self.local.pop("stdin", None)
        if isinstance(stdin, socket.socket):
            _r, writer = await asyncio.open_unix_connection(sock=stdin)
            self._keep.append(writer)
        out = await self._reader("stdout")
        err = await self._reader("stderr")
        return writer, out, err

    async def _reader(self, name: str) -> EofReader | None:
        fd = self.local.pop(name, None)
        if not isinstance(fd, int):
            return None
        reader = EofReader(limit=STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        pipe = os.fdopen(fd, "rb", buffering=0)  # the transport closes it
        try:
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: protocol, pipe
            )
        except BaseException:
            pipe.close()
            raise
        self._transports.append(transport)
        reader.transport = transport
        return reader


class EofReader(asyncio.StreamReader):
    """A StreamReader that says when the far end closed, whether or not anyone reads.

    The launcher waits for EOF (bounded) before calling a job done, and must not poll for it.
    """

    def __init__(self, limit: int = STREAM_LIMIT) -> None:
        super().__init__(limit=limit)
        self.eof = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None  # set by whoever connects it

    def close(self) -> None:
        """Stop reading: the pipe is closed (not ``feed_eof``, so late data cannot hit a
        reader that was told it ended); what was received stays readable."""
        if self.transport is not None:
            self.transport.close()

    def feed_eof(self) -> None:
        super().feed_eof()
        self.eof.set()
