"""Stdio channels: socketpairs whose far ends are handed to systemd as file descriptors.

The unit writes into its end; we read ours through asyncio streams. Relaying (rather than
handing systemd the caller's own descriptors) lets the launcher know when output ends, bound
the wait for EOF when leftover processes keep a descriptor open (Flux #6656), and serve
library callers that want the bytes.
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
    local: dict[str, socket.socket] = field(default_factory=dict)
    _owned_remote: list[int] = field(default_factory=list)
    # our writers on the read-only channels: kept so their transports live as long as the job
    _keep: list[asyncio.StreamWriter] = field(default_factory=list)
    _transports: list[asyncio.BaseTransport] = field(default_factory=list)

    @classmethod
    def create(cls, stdin: int, stdout: int, stderr: int) -> Channels:
        ch = cls()
        try:
            for name, spec in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
                if spec == PIPE:
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    theirs.shutdown(socket.SHUT_WR if name == "stdin" else socket.SHUT_RD)
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
        for sock in self.local.values():
            sock.close()
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
        if "stdin" in self.local:
            _r, writer = await asyncio.open_unix_connection(sock=self.local.pop("stdin"))
            self._keep.append(writer)
        out = await self._reader("stdout")
        err = await self._reader("stderr")
        return writer, out, err

    async def _reader(self, name: str) -> EofReader | None:
        sock = self.local.pop(name, None)
        if sock is None:
            return None
        reader = EofReader(limit=STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: protocol, sock
        )
        self._transports.append(transport)
        return reader


class EofReader(asyncio.StreamReader):
    """A StreamReader that says when the far end closed, whether or not anyone reads.

    The launcher waits for EOF (bounded) before calling a job done, and must not poll for it.
    """

    def __init__(self, limit: int = STREAM_LIMIT) -> None:
        super().__init__(limit=limit)
        self.eof = asyncio.Event()

    def feed_eof(self) -> None:
        super().feed_eof()
        self.eof.set()
