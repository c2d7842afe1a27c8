"""The start barrier: no shell of a job runs its command until every shell has finished setup.

A resource manager serves the barrier across nodes; here is the interface and the local
implementation for several shells on one node, over a unix socket. Wire protocol (one line
each way): the client sends ``enter RANK``, the server answers ``go`` once all ranks have
entered, or ``fail REASON`` (timeout, bad rank, server closing).

The shell imports this module for :func:`enter_barrier_sync`, so asyncio is imported lazily.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from sdexec.errors import LaunchError, SdexecError
from sdexec.exec.aio import first_completed

if TYPE_CHECKING:
    import asyncio

    from sdexec.exec.clock import Clock

__all__ = [
    "BarrierClient",
    "BarrierError",
    "BarrierTimeout",
    "LocalBarrierServer",
    "UnixBarrierClient",
    "enter_barrier_sync",
    "format_ranks",
]

log = logging.getLogger(__name__)

_MAX_LINE = 4096


def format_ranks(ranks: Sequence[int]) -> str:
    """Ranks as an idset ("0,2-4"), the way Flux names a set of ranks in its messages."""
    out: list[str] = []
    ordered = sorted(set(ranks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


class BarrierError(SdexecError):
    """The barrier did not complete: the job's command must not start."""


class BarrierTimeout(BarrierError):
    """Not every rank entered within barrier-timeout; ``waiting`` names the missing ranks."""

    def __init__(self, waiting: Sequence[int], timeout: float) -> None:
        self.waiting = sorted(waiting)
        self.timeout = timeout
        self.reason = (
            f"timed out after {timeout:g}s waiting for rank(s) {format_ranks(self.waiting)}"
        )
        super().__init__(f"start barrier {self.reason}")


class BarrierClient(Protocol):
    """What a shell needs from a barrier, whoever serves it."""

    async def enter(self, rank: int) -> None: ...


class LocalBarrierServer:
    """The barrier for ``size`` shells on this node.

    ``timeout`` runs from the first entry (as in Flux: a job slow to be scheduled on some node
    is not the barrier's problem until one shell is ready); 0 or inf disables it. The socket is
    0600; ``owner_uid`` hands it to the job's owner so a guest's shells can connect. The
    shells' ranks are ``first_rank .. first_rank+size-1``: a node other than a job's first
    runs ranks that do not start at 0.
    """

    def __init__(
        self,
        path: str,
        size: int,
        timeout: float,
        clock: Clock,
        owner_uid: int | None = None,
        first_rank: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"barrier size must be >= 1, not {size}")
        if not timeout >= 0:  # also rejects NaN
            raise ValueError(f"barrier timeout must be >= 0, not {timeout}")
        self.path = path
        self.size = size
        self.timeout = timeout
        self.clock = clock
        self.owner_uid = owner_uid
        if first_rank < 0:
            raise ValueError(f"barrier first rank must be >= 0, not {first_rank}")
        self.ranks = range(first_rank, first_rank + size)
        self.first_entry: float | None = None
        self._entered: set[int] = set()
        self._outcome: str | None = None  # "go" or "fail REASON" once decided
        self._decided: asyncio.Event | None = None
        self._result: asyncio.Future[None] | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def entered(self) -> list[int]:
        return sorted(self._entered)

    @property
    def waiting(self) -> list[int]:
        """Ranks that have not entered (what a node drain would name)."""
        return [r for r in self.ranks if r not in self._entered]

    @property
    def done(self) -> bool:
        return self._outcome is not None

    async def start(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._decided = asyncio.Event()
        self._result = loop.create_future()
        # nobody may be awaiting wait(): do not let asyncio report the exception as lost
        self._result.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # permissions are settled before listen(): no client can connect earlier
            os.chmod(self.path, 0o600)
            if self.owner_uid is not None:
                os.chown(self.path, self.owner_uid, -1)
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, limit=_MAX_LINE, backlog=max(self.size, 16)
            )
        except OSError as e:
            sock.close()
            raise LaunchError(f"start barrier socket {self.path}: {e.strerror or e}") from None
        log.debug("barrier %s listening for %d rank(s)", self.path, self.size)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise LaunchError(f"start barrier socket {self.path}: exists and is not a socket")
        os.unlink(self.path)

    async def wait(self) -> None:
        """Return once every rank entered; raise BarrierTimeout (or BarrierError if closed)."""
        import asyncio

        if self._result is None:
            raise RuntimeError("LocalBarrierServer.wait() before start()")
        await asyncio.shield(self._result)

    async def close(self) -> None:
        import asyncio

        reason = f"closed before rank(s) {format_ranks(self.waiting)} entered"
        self._decide_fail(BarrierError(f"start barrier {reason}"), reason)
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        # handlers now see the outcome, answer their client and return
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=1.0)
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- decisions -------------------------------------------------------------------------

    def _decide_go(self) -> None:
        assert self._decided is not None and self._result is not None
        if self._outcome is not None:
            return
        self._outcome = "go"
        self._decided.set()
        self._result.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        log.debug("barrier %s complete", self.path)

    def _decide_fail(self, exc: BarrierError, reason: str) -> None:
        if self._outcome is not None or self._decided is None or self._result is None:
            return
        self._outcome = f"fail {reason}"
        self._decided.set()
        self._result.set_exception(exc)

    async def _expire(self, deadline: float) -> None:
        await self.clock.sleep_until(deadline)
        if self._outcome is None:
            exc = BarrierTimeout(self.waiting, self.timeout)
            log.warning("%s", exc)
            self._decide_fail(exc, exc.reason)

    # -- connections -----------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that breaks the protocol or vanishes gets no answer
        finally:
            self._handlers.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _reply(self, writer: asyncio.StreamWriter, line: str) -> None:
        writer.write(line.encode() + b"\n")
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        assert self._decided is not None
        raw = await reader.readline()
        words = raw.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "enter" or not words[1].isdigit():
            await self._reply(writer, f"fail bad request {raw[:64]!r}: expected 'enter RANK'")
            return
        rank = int(words[1])
        if rank not in self.ranks:
            expected = format_ranks(list(self.ranks))
            await self._reply(writer, f"fail rank {rank} out of range (ranks {expected})")
            return
        if self._outcome is not None and self._outcome != "go":
            await self._reply(writer, self._outcome)  # a late rank learns why it is too late
            return
        if rank in self._entered:  # once complete, every rank has entered
            await self._reply(writer, f"fail rank {rank} already entered")
            return
        self._entered.add(rank)
        log.debug("barrier %s: rank %d entered", self.path, rank)
        if self.first_entry is None:
            self.first_entry = self.clock.now()
            if 0 < self.timeout < math.inf:
                self._timer = asyncio.ensure_future(self._expire(self.first_entry + self.timeout))
        if len(self._entered) == self.size:
            self._decide_go()
        if self._outcome is None:
            # a client that goes away (its shell died) no longer counts as entered
            await first_completed(reader.read(1), self._decided.wait())
            if self._outcome is None:
                self._entered.discard(rank)
                log.info("barrier %s: rank %d left before the barrier completed", self.path, rank)
                return
        assert self._outcome is not None
        await self._reply(writer, self._outcome)


class UnixBarrierClient:
    """Async client of a :class:`LocalBarrierServer` (the shell uses the blocking one)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def enter(self, rank: int) -> None:
        import asyncio

        if rank < 0:
            raise BarrierError(f"start barrier: rank {rank} must be >= 0")
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=_MAX_LINE)
        except OSError as e:
            raise BarrierError(f"start barrier {self.path}: {e.strerror or e}") from None
        try:
            writer.write(f"enter {rank}\n".encode())
            await writer.drain()
            raw = await reader.readline()
        except (OSError, ValueError) as e:
            raise BarrierError(f"start barrier {self.path}: {e}") from None
        finally:
            writer.close()
        _check_answer(self.path, raw)


def _check_answer(path: str, raw: bytes) -> None:
    if not raw.endswith(b"\n"):
        raise BarrierError(f"start barrier {path}: closed without an answer")
    line = raw.decode(errors="replace").strip()
    if line == "go":
        return
    if line == "fail" or line.startswith("fail "):
        raise BarrierError(f"start barrier failed: {line[5:] or 'no reason given'}")
    raise BarrierError(f"start barrier {path}: unexpected answer {line[:64]!r}")


def enter_barrier_sync(path: str, rank: int, timeout: float | None = None) -> None:
    """Block until the barrier at ``path`` completes; raise BarrierError if it fails.

    ``timeout`` bounds the client's own wait (None: the server's barrier-timeout decides).
    """
    if rank < 0:
        raise BarrierError(f"start barrier: rank {rank} must be >= 0")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(f"enter {rank}\n".encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    raise BarrierError(f"start barrier {path}: closed without an answer")
                buf += chunk
                if len(buf) > _MAX_LINE:
                    raise BarrierError(f"start barrier {path}: answer too long")
        except TimeoutError:
            raise BarrierError(f"start barrier {path}: no answer within {timeout}s") from None
        except OSError as e:
            raise BarrierError(f"start barrier {path}: {e.strerror or e}") from None
    _check_answer(path, buf)
