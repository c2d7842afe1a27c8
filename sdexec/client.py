"""The ``sdexec`` program's first stop: hand ``sdexec run`` to the node's sdexec server.

A job's start should cost what systemd-run's does. In-process, ``sdexec run`` pays for
Python, asyncio, dbus-fast, SQLite and a bus connection on every job; with the server
(``sdexec serve``, socket-activated by ``units/sdexec.socket``) this client only imports
stdlib modules it needs anyway, passes its own stdin/stdout/stderr to the server over the
socket (the unit gets them as they are: no relay, like ``systemd-run --pipe``), forwards
Ctrl-C/SIGTERM/SIGHUP as a cancel, and exits with what the server says. Anything else, or no
server, runs in-process as before (``sdexec.cli``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

SYSTEM_SOCKET = "/run/sdexec/sdexec.sock"
_IN_PROCESS = frozenset({"-c", "--config", "-h", "--help", "--dry-run"})


def socket_path(user: bool) -> str:
    """The server's socket: $SDEXEC_SOCKET, else the system's, else the user's runtime dir."""
    explicit = os.environ.get("SDEXEC_SOCKET")
    if explicit:
        return explicit
    if not user:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return os.path.join(runtime, "sdexec", "sdexec.sock")


def wants_server(argv: Sequence[str]) -> bool:
    """Only ``run`` without its own config (the server has the node's) and without --help."""
    if not argv or argv[0] != "run" or os.environ.get("SDEXEC_NO_SERVER"):
        return False
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in _IN_PROCESS or arg.startswith("--config="):
            return False
    return True


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:  # no server (or not ours to use): run in-process
        sock.close()
        return None
    return sock


def _options(argv: Sequence[str]) -> Sequence[str]:
    """``run``'s own options: what comes before the job's ``--``."""
    return argv[1 : list(argv).index("--")] if "--" in argv else argv[1:]


def run_via_server(argv: Sequence[str]) -> int | None:
    """The exit code, or None when there is no server (the caller runs in-process)."""
    sock = _connect(socket_path("--user" in _options(argv)))
    if sock is None:
        return None
    with sock:
        request = {"op": "run", "argv": list(argv[1:]), "env": dict(os.environ), "cwd": os.getcwd()}
        data = json.dumps(request).encode() + b"\n"
        socket.send_fds(sock, [data], [0, 1, 2])

        def cancel(signum: int, _frame: FrameType | None) -> None:
            try:
                sock.sendall(json.dumps({"op": "cancel", "signal": signum}).encode() + b"\n")
            except OSError:
                pass

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, cancel)
        started: str | None = None
        for line in sock.makefile("rb"):
            msg = json.loads(line)
            if "started" in msg:
                started = str(msg["started"])
            for text in msg.get("stderr", ()):
                sys.stderr.write(text + "\n")
            if "exit" in msg:
                sys.stderr.flush()
                return int(msg["exit"])
    if started is None:
        sys.stderr.write("sdexec: the sdexec server closed the connection before the job started\n")
        return 125
    # The server went away (restarted?) while the job runs: the next one (socket activation
    # starts it) takes the job over; ask it for the end.
    sys.stderr.write(f"sdexec: lost the sdexec server; following job {started} again\n")
    return _reattach(argv, started)


def _reattach(argv: Sequence[str], jobid: str) -> int:
    options = _options(argv)
    path = socket_path("--user" in options)
    for delay in (0.1, 0.2, 0.5, 1, 2, 5, 10):
        sock = _connect(path)
        if sock is None:
            time.sleep(delay)
            continue
        with sock:
            request = {"op": "attach", "jobid": jobid, "json": "--json" in options}
            sock.sendall(json.dumps(request).encode() + b"\n")
            for line in sock.makefile("rb"):
                msg = json.loads(line)
                for text in msg.get("stderr", ()):
                    sys.stderr.write(text + "\n")
                if "exit" in msg:
                    return int(msg["exit"])
    sys.stderr.write(f"sdexec: no sdexec server to follow job {jobid}; see 'sdexec attach'\n")
    return 125


def entry() -> None:
    """The ``sdexec`` program."""
    argv = sys.argv[1:]
    if wants_server(argv):
        code = run_via_server(argv)
        if code is not None:
            sys.exit(code)
    from .cli import entry as cli_entry

    cli_entry()
