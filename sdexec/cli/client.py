"""The ``sdexec`` program's first stop: hand ``sdexec run`` to the node's sdexec server.

A job's start should cost what systemd-run's does. In-process, ``sdexec run`` pays for
Python, asyncio, dbus-fast, SQLite and a bus connection on every job; with the server
(``sdexec serve``, socket-activated by ``units/sdexec.socket``) this client only imports
stdlib modules it needs anyway, passes its own stdin/stdout/stderr to the server over the
socket (the unit gets them as they are: no relay, like ``systemd-run --pipe``), forwards
Ctrl-C/SIGTERM/SIGHUP as a cancel, and exits with what the server says. Anything else, or no
server, runs in-process as before (``sdexec.cli.main``).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from types import FrameType

from sdexec.protocol.endpoint import socket_path

TYPE_CHECKING = False  # typing costs a job's start ~1 ms: annotations only
if TYPE_CHECKING:
    from typing import Any

_IN_PROCESS = frozenset({"-c", "--config", "-h", "--help", "--dry-run"})


def wants_server(argv: Sequence[str]) -> bool:
    """``run`` and ``attach`` without their own config (the server has the node's) or --help.

    Every spelling of a config option (``-c PATH``, ``-cPATH``, ``--config=PATH``) runs
    in-process; the server refuses any it still gets rather than ignore it.
    """
    if not argv or argv[0] not in ("run", "attach") or os.environ.get("SDEXEC_NO_SERVER"):
        return False
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in _IN_PROCESS or arg.startswith(("--config=", "-c")):
            return False
    return True


CONNECT_PATIENCE = 30.0
"""How long a client waits for room in the server's listen queue (EAGAIN) before 125."""
_NO_SERVER = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR})


class ServerUnreachable(Exception):
    """A server is there but cannot take us (queue full for too long, not ours to use): 125."""


def _connect(path: str, patience: float | None = None) -> socket.socket | None:
    """A connection to the server, or None when there is none (the caller runs in-process).

    Only "no server" (no socket, nobody listening) falls back to in-process: a server whose
    listen queue is full (EAGAIN: a burst of clients) is waited for, with back-off, up to
    ``patience`` seconds; anything else is ServerUnreachable. Running in-process behind a
    busy server's back would double the load it cannot take, and a non-root user cannot
    run in-process at all.
    """
    patience = CONNECT_PATIENCE if patience is None else patience
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            sock.connect(path)  # AF_UNIX: done at once, or EAGAIN when the queue is full
        except OSError as e:
            sock.close()
            if e.errno in _NO_SERVER:
                return None
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                raise ServerUnreachable(
                    f"cannot reach the sdexec server at {path}: {e.strerror}"
                ) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnreachable(
                    f"the sdexec server at {path} is busy (its listen queue stayed full for "
                    f"{patience:g}s); retry later"
                ) from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
            continue
        sock.setblocking(True)
        return sock


def _options(argv: Sequence[str]) -> Sequence[str]:
    """``run``'s own options: what comes before the job's ``--``."""
    return argv[1 : list(argv).index("--")] if "--" in argv else argv[1:]


def _pmi_fd() -> int | None:
    """``PMI_FD`` (srun --mpi=pmi2 gives each task one) if it names an open socket."""
    text = os.environ.get("PMI_FD", "")
    if not text.isdigit():
        return None
    try:
        import stat

        return int(text) if stat.S_ISSOCK(os.fstat(int(text)).st_mode) else None
    except OSError:
        return None


class _Lost(Exception):
    """The connection to the server ended before its answer."""


def _answers(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """The server's messages, one JSON object a line; _Lost when the connection ends first
    (a server killed or restarted resets it: that is no reason for a traceback)."""
    try:
        for line in sock.makefile("rb"):
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                yield msg
    except OSError:
        pass
    raise _Lost


def _say(msg: dict[str, Any]) -> int | None:
    for text in msg.get("stderr", ()):
        sys.stderr.write(f"{text}\n")
    if "exit" in msg:
        sys.stderr.flush()
        return int(msg["exit"])
    return None


def run_via_server(argv: Sequence[str]) -> int | None:
    """The exit code, or None when there is no server (the caller runs in-process)."""
    if argv[0] == "attach":
        return attach_via_server(argv)
    try:
        sock = _connect(socket_path("--user" in _options(argv)))
    except ServerUnreachable as e:
        sys.stderr.write(f"sdexec: {e}\n")
        return 125
    if sock is None:
        return None
    accepted: str | None = None
    send_error: OSError | None = None
    with sock:
        request: dict[str, object] = {
            "op": "run", "argv": list(argv[1:]), "env": dict(os.environ), "cwd": os.getcwd()
        }  # fmt: skip
        fds = [0, 1, 2]
        pmi = _pmi_fd()
        if pmi is not None:  # the resource manager's PMI: the server holds the start barrier
            fds.append(pmi)
            request["pmi_fd"] = True
        data = json.dumps(request).encode() + b"\n"
        try:
            socket.send_fds(sock, [data], fds)
        except OSError as e:
            # refused at accept (busy) and closed before our request: its one-line answer
            # may still be there to read
            send_error = e

        def cancel(signum: int, _frame: FrameType | None) -> None:
            try:
                sock.sendall(json.dumps({"op": "cancel", "signal": signum}).encode() + b"\n")
            except OSError:
                pass

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, cancel)
        try:
            for msg in _answers(sock):
                if "accepted" in msg:
                    accepted = str(msg["accepted"])
                code = _say(msg)
                if code is not None:
                    return code
        except _Lost:
            pass
    if send_error is not None:
        # the request never reached a server (killed, or refusing at accept): nothing ran
        sys.stderr.write(
            f"sdexec: could not hand the job to the sdexec server ({send_error}); "
            "the job did not run\n"
        )
        return 125
    if accepted is None:
        # The server answers "accepted" before it starts anything: without it, nothing ran.
        sys.stderr.write(
            "sdexec: the sdexec server closed the connection before it accepted the job "
            "(the job did not run)\n"
        )
        return 125
    # The server went away (restarted?) while the job runs: the next one (socket activation
    # starts it) takes the job over; ask it for the end.
    sys.stderr.write(f"sdexec: lost the sdexec server; following job {accepted} again\n")
    return _reattach(socket_path("--user" in _options(argv)), accepted, "--json" in _options(argv))


def _attach_options(argv: Sequence[str]) -> tuple[str, bool, bool, bool] | None:
    """``attach --job ID [--json] [-v] [--user]``; None for anything else (in-process parses
    it)."""
    jobid, json_out, user, verbose = None, False, False, False
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "--job" and args:
            jobid = args.pop(0)
        elif arg.startswith("--job="):
            jobid = arg.removeprefix("--job=")
        elif arg == "--json":
            json_out = True
        elif arg in ("-v", "--verbose"):
            verbose = True  # the server ends with the one-line summary per shell
        elif arg == "--user":
            user = True
        else:
            return None
    return (jobid, json_out, user, verbose) if jobid is not None else None


def attach_via_server(argv: Sequence[str]) -> int | None:
    """``sdexec attach`` through the server, which may be the one still running the job."""
    options = _attach_options(argv)
    if options is None:
        return None
    jobid, json_out, user, verbose = options
    path = socket_path(user)
    if _connect_quiet(path) is False:
        return None
    return _reattach(path, jobid, json_out, verbose)


def _connect_quiet(path: str) -> bool:
    try:
        sock = _connect(path)
    except ServerUnreachable:
        return True  # there is a server: _reattach waits for it

    if sock is None:
        return False
    sock.close()
    return True


def _reattach(path: str, jobid: str, json_out: bool, verbose: bool = False) -> int:
    for delay in (0.1, 0.2, 0.5, 1, 2, 5, 10):
        try:
            sock = _connect(path)
        except ServerUnreachable:
            sock = None
        if sock is None:
            time.sleep(delay)
            continue
        with sock:
            request = {"op": "attach", "jobid": jobid, "json": json_out}
            if verbose:
                request["verbose"] = True
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
                for msg in _answers(sock):
                    code = _say(msg)
                    if code is not None:
                        return code
            except (_Lost, OSError):
                time.sleep(delay)  # that server went away too: the next one takes over
                continue
    sys.stderr.write(f"sdexec: no sdexec server to follow job {jobid}; see 'sdexec attach'\n")
    return 125


def entry() -> None:
    """The ``sdexec`` program."""
    argv = sys.argv[1:]
    if wants_server(argv):
        code = run_via_server(argv)
        if code is not None:
            sys.exit(code)
    from sdexec.cli.main import entry as cli_entry

    cli_entry()
