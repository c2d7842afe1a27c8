"""The cross-node start barrier over the resource manager's PMI (PMI-1 wire protocol).

Under Slurm (``srun --mpi=pmi2``; the pmi2 plugin speaks PMI-1 too) every task gets a
connected socket in ``PMI_FD`` and its place in ``PMI_RANK`` / ``PMI_SIZE``. The protocol is
one line of ``key=value`` words per message, each answered before the next is sent (the
server reads one message per read(2))::

    -> cmd=init pmi_version=1 pmi_subversion=1
    <- cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1
    -> cmd=barrier_in
    <- cmd=barrier_out rc=0          (once every task of the step has sent barrier_in)
    -> cmd=finalize
    <- cmd=finalize_ack rc=0

The job's shells on this node meet at the local barrier (:class:`ClusterBarrierServer`, the
local server with one more step); once all have entered, the node enters the PMI barrier,
and only when that completes are the shells told to go. ``barrier-timeout`` runs from the
first local entry (this node cannot see when the first node entered): on expiry this node's
shells fail with "start barrier failed" and the node is drained; the resource manager ends
the other nodes' tasks (Slurm: ``KillOnBadExit=1`` or ``srun -K``), since a PMI barrier
entered cannot be left.

The parsing is pure; the client speaks on an asyncio stream, so nothing blocks a server's loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from sdexec.errors import LaunchError
from sdexec.exec.barrier import BarrierError, BarrierTimeout, LocalBarrierServer
from sdexec.exec.clock import Clock

log = logging.getLogger(__name__)

__all__ = [
    "ClusterBarrierServer",
    "PmiClient",
    "PmiEndpoint",
    "PmiError",
    "format_command",
    "parse_message",
]

#: Slurm's PMI-1 server reads at most 1024 bytes per message (MAX_READLINE)
MAX_LINE = 1024


class PmiError(BarrierError):
    """The PMI server refused, answered nonsense, or went away."""


def format_command(cmd: str, **fields: str | int) -> bytes:
    """One PMI-1 request line; a value with a space or ``=`` cannot be carried and is refused."""
    words = [f"cmd={cmd}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in " =\n"):
            raise ValueError(
                f"PMI value for {key!r} must be non-empty, without space, = or newline"
            )
        words.append(f"{key}={text}")
    line = " ".join(words) + "\n"
    if len(line) > MAX_LINE:
        raise ValueError(f"PMI request longer than {MAX_LINE} bytes")
    return line.encode()


def parse_message(line: bytes) -> dict[str, str]:
    """A PMI-1 line as a dict (``cmd`` included); PmiError if it is not ``key=value`` words."""
    if not line.endswith(b"\n"):
        raise PmiError("PMI: the connection closed without a complete answer")
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise PmiError(f"PMI: answer is not ASCII text: {line[:64]!r}") from None
    out: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise PmiError(f"PMI: malformed answer {text[:64]!r} (expected key=value words)")
        out[key] = value
    if "cmd" not in out:
        raise PmiError(f"PMI: answer without cmd= {text[:64]!r}")
    return out


def check_answer(msg: Mapping[str, str], expected: str) -> None:
    """The answer must be ``expected`` with rc=0 (an absent rc counts as 0, as PMI-1 allows)."""
    if msg["cmd"] != expected:
        raise PmiError(f"PMI: expected cmd={expected}, got cmd={msg['cmd'][:32]}")
    rc = msg.get("rc", "0")
    if rc != "0":
        detail = msg.get("msg", "").replace("_", " ")
        raise PmiError(
            f"PMI: {expected} failed (rc={rc[:16]}{': ' + detail[:200] if detail else ''})"
        )


@dataclass(frozen=True)
class PmiEndpoint:
    """This task's place in the job's PMI: rank and size from the environment, and the fd."""

    rank: int
    size: int
    fd: int | None = None  # None until the process holding the fd fills it in

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> PmiEndpoint | None:
        """None unless ``PMI_RANK``/``PMI_SIZE`` are sane (0 <= rank < size)."""
        try:
            rank = int(env.get("PMI_RANK", ""))
            size = int(env.get("PMI_SIZE", ""))
        except ValueError:
            return None
        if not 0 <= rank < size:
            return None
        return cls(rank, size)


def env_fd(env: Mapping[str, str]) -> int | None:
    """``PMI_FD`` of this process, if it names an open socket (a stale variable is ignored)."""
    text = env.get("PMI_FD", "")
    if not text.isdigit():
        return None
    fd = int(text)
    try:
        return fd if stat.S_ISSOCK(os.fstat(fd).st_mode) else None
    except OSError:
        return None


class PmiClient:
    """PMI-1 on a connected stream socket; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, fd: int) -> PmiClient:
        """Speak on a duplicate of ``fd`` (the caller keeps and closes its own)."""
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise PmiError(f"PMI: fd {fd} is not a socket")
            sock = socket.socket(fileno=os.dup(fd))
        except OSError as e:
            raise PmiError(f"PMI: fd {fd}: {e.strerror or e}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise PmiError(f"PMI: fd {fd} is not a unix stream socket")
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        return cls(reader, writer)

    async def request(self, line: bytes, expected: str) -> dict[str, str]:
        try:
            self.writer.write(line)
            await self.writer.drain()
            answer = await self.reader.readline()
        except (OSError, ValueError, asyncio.LimitOverrunError) as e:
            raise PmiError(f"PMI: {e}") from None
        msg = parse_message(answer)
        check_answer(msg, expected)
        return msg

    async def init(self) -> None:
        await self.request(
            format_command("init", pmi_version=1, pmi_subversion=1), "response_to_init"
        )

    async def barrier(self) -> None:
        await self.request(format_command("barrier_in"), "barrier_out")

    async def finalize(self) -> None:
        await self.request(format_command("finalize"), "finalize_ack")

    def close(self) -> None:
        self.writer.close()


async def pmi_barrier(fd: int) -> None:
    """Init, barrier, finalize: returns once every task of the step has reached it."""
    client = await PmiClient.open(fd)
    try:
        await client.init()
        await client.barrier()
        try:
            await client.finalize()
        except PmiError as e:  # the barrier is what counts
            log.debug("PMI finalize: %s", e)
    finally:
        client.close()


class ClusterBarrierTimeout(BarrierTimeout):
    """Every local shell entered, the other nodes did not within barrier-timeout."""

    def __init__(self, size: int, timeout: float) -> None:
        super().__init__([], timeout)
        self.reason = (
            f"timed out after {timeout:g}s waiting for the job's other nodes (PMI size {size})"
        )
        self.args = (f"start barrier {self.reason}",)


class ClusterBarrierServer(LocalBarrierServer):
    """The local barrier, completed only once the PMI barrier across nodes completes too."""

    def __init__(
        self,
        path: str,
        size: int,
        timeout: float,
        clock: Clock,
        pmi: PmiEndpoint,
        owner_uid: int | None = None,
        first_rank: int = 0,
    ) -> None:
        super().__init__(path, size, timeout, clock, owner_uid=owner_uid, first_rank=first_rank)
        if pmi.fd is None:
            raise ValueError("ClusterBarrierServer needs the PMI fd")
        self.pmi = pmi
        self._fd: int | None = None  # our own copy: the caller may close its fd once started
        self._cross: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.pmi.fd is not None
        try:
            if not stat.S_ISSOCK(os.fstat(self.pmi.fd).st_mode):
                # refused before any shell starts: not a barrier failure (no drain)
                raise LaunchError(f"PMI: the PMI fd ({self.pmi.fd}) is not a socket")
            self._fd = os.dup(self.pmi.fd)
        except OSError as e:
            raise LaunchError(f"PMI: fd {self.pmi.fd}: {e.strerror or e}") from None
        try:
            await super().start()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _decide_go(self) -> None:
        # every local shell entered: now the other nodes
        if self._outcome is not None or self._cross is not None:
            return
        log.debug("barrier %s: local shells in; entering the PMI barrier", self.path)
        self._cross = asyncio.ensure_future(self._across())

    async def _across(self) -> None:
        assert self._fd is not None
        try:
            await pmi_barrier(self._fd)
        except BarrierError as e:
            log.warning("start barrier across nodes: %s", e)
            self._decide_fail(e, str(e))
            return
        log.debug("barrier %s: PMI barrier complete (%d tasks)", self.path, self.pmi.size)
        LocalBarrierServer._decide_go(self)

    async def _expire(self, deadline: float) -> None:
        await self.clock.sleep_until(deadline)
        if self._outcome is None:
            exc: BarrierTimeout
            if self.waiting:
                exc = BarrierTimeout(self.waiting, self.timeout)
            else:
                exc = ClusterBarrierTimeout(self.pmi.size, self.timeout)
            log.warning("%s", exc)
            self._decide_fail(exc, exc.reason)

    async def close(self) -> None:
        await super().close()
        if self._cross is not None:
            self._cross.cancel()
            await asyncio.gather(self._cross, return_exceptions=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
