"""The ``sdexec`` program's first stop: hand ``sdexec run`` to the node's sdexec server.

A job's start should cost what systemd-run's does. In-process, ``sdexec run`` pays for
Python, asyncio, dbus-fast, SQLite and a bus connection on every job; with the server
(``sdexec serve``, socket-activated by ``units/sdexec.socket``) this client passes its own
stdin/stdout/stderr to the server over the socket (the unit gets them as they are: no relay,
like ``systemd-run --pipe``), forwards Ctrl-C/SIGTERM/SIGHUP as a cancel, and exits with what
the server says. Anything else, or no server, runs in-process as before (``sdexec.cli``).

Every module this one imports is paid by every job's start, and the server's answer comes
~8 ms after the request: the client's own cost is most of what a user waits for
(bench/cli_latency.py). So it imports only what the interpreter has loaded anyway (``os``,
``sys``, ``time``, ``stat``) and C modules that cost nothing to import: ``_socket`` and
``_signal`` instead of ``socket`` and ``signal`` (their enums cost ~5 ms), and ``_json``'s
string quoting and scanner instead of ``json`` (which imports ``re``: another ~5 ms). An
interpreter without them (``_json`` is private) falls back to the public modules.
"""

import _signal  # type: ignore[import-not-found]  # no stub: signal's C half, no enums
import _socket
import errno
import os
import sys
import time

from sdexec.protocol.endpoint import socket_path

TYPE_CHECKING = False  # typing (and even __future__) cost a job's start: annotations only
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType
    from typing import Any, NoReturn

_IN_PROCESS = frozenset({"-c", "--config", "-h", "--help", "--dry-run"})


def wants_server(argv: "Sequence[str]") -> bool:
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


# --- JSON without the json module ---------------------------------------------------------

try:  # the C halves of the json module, without its Python half (which imports re)
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - another interpreter: the public module
    _quote = None  # type: ignore[assignment]
    _make_scanner = None  # type: ignore[assignment,misc]


def dumps(obj: object) -> str:
    """``json.dumps(obj)``, byte for byte, for what a request holds (dicts with string keys,
    lists, strings, booleans, integers, None); anything else is a TypeError as there."""
    if _quote is None:  # pragma: no cover
        import json

        return json.dumps(obj)
    out: list[str] = []
    _encode(obj, out)
    return "".join(out)


def _encode(obj: object, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(_quote(obj))
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            if not first:
                out.append(", ")
            first = False
            out.append(_quote(key))
            out.append(": ")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(", ")
            _encode(value, out)
        out.append("]")
    else:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class _ScanContext:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
    parse_constant = parse_constant.__getitem__  # type: ignore[assignment]
    memo: "dict[Any, Any]" = {}


_scan = _make_scanner(_ScanContext()) if _make_scanner is not None else None  # type: ignore[arg-type]


def loads(data: bytes) -> object:
    """``json.loads(data)`` for one line of the server's (UTF-8); ValueError if it is not
    exactly one JSON value."""
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(data)
    text = data.decode("utf-8", "surrogatepass").strip(" \t\n\r")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return value


# --- the connection -----------------------------------------------------------------------

CONNECT_PATIENCE = 30.0
"""How long a client waits for room in the server's listen queue (EAGAIN) before 125."""
_NO_SERVER = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR})


class ServerUnreachable(Exception):
    """A server is there but cannot take us (queue full for too long, not ours to use): 125."""


def _connect(path: str, patience: float | None = None) -> "_socket.socket | None":
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
        sock = _socket.socket(
            _socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK
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


def _options(argv: "Sequence[str]") -> "Sequence[str]":
    """``run``'s own options: what comes before the job's ``--``."""
    return argv[1 : list(argv).index("--")] if "--" in argv else argv[1:]


def _pmi_fd() -> int | None:
    """``PMI_FD`` (srun --mpi=pmi2 gives each task one) if it names an open socket."""
    text = os.environ.get("PMI_FD", "")
    if not text.isdigit():
        return None
    try:
        import stat  # loaded by os already

        return int(text) if stat.S_ISSOCK(os.fstat(int(text)).st_mode) else None
    except OSError:
        return None


def _send_with_fds(sock: "_socket.socket", data: bytes, fds: "Sequence[int]") -> None:
    """``socket.send_fds``: the request and our descriptors (SCM_RIGHTS) in one message.

    A blocking stream socket's sendmsg sends all of ``data`` (the descriptors go with its
    first byte), as ``socket.send_fds`` relies on too.
    """
    rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)  # C ints
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


class _Lost(Exception):
    """The connection to the server ended before its answer."""


def _answers(sock: "_socket.socket") -> "Iterator[dict[str, Any]]":
    """The server's messages, one JSON object a line; _Lost when the connection ends first
    (a server killed or restarted resets it: that is no reason for a traceback)."""
    buf = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                msg = _message(line)
                if msg is not None:
                    yield msg
    except OSError:
        pass
    else:
        msg = _message(buf) if buf else None  # a last line without its newline
        if msg is not None:
            yield msg
    raise _Lost


def _message(line: bytes) -> "dict[str, Any] | None":
    try:
        msg = loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _say(msg: "dict[str, Any]") -> int | None:
    for text in msg.get("stderr", ()):
        sys.stderr.write(f"{text}\n")
    if "exit" in msg:
        sys.stderr.flush()
        return int(msg["exit"])
    return None


def run_via_server(argv: "Sequence[str]") -> int | None:
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
    try:
        request: dict[str, object] = {
            "op": "run", "argv": list(argv[1:]), "env": dict(os.environ), "cwd": os.getcwd()
        }  # fmt: skip
        fds = [0, 1, 2]
        pmi = _pmi_fd()
        if pmi is not None:  # the resource manager's PMI: the server holds the start barrier
            fds.append(pmi)
            request["pmi_fd"] = True
        data = dumps(request).encode() + b"\n"
        try:
            _send_with_fds(sock, data, fds)
        except OSError as e:
            # refused at accept (busy) and closed before our request: its one-line answer
            # may still be there to read
            send_error = e

        def cancel(signum: int, _frame: "FrameType | None") -> None:
            try:
                sock.sendall(dumps({"op": "cancel", "signal": signum}).encode() + b"\n")
            except OSError:
                pass

        for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            _signal.signal(sig, cancel)
        try:
            for msg in _answers(sock):
                if "accepted" in msg:
                    accepted = str(msg["accepted"])
                code = _say(msg)
                if code is not None:
                    return code
        except _Lost:
            pass
    finally:
        sock.close()
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


def _attach_options(argv: "Sequence[str]") -> tuple[str, bool, bool, bool] | None:
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


def attach_via_server(argv: "Sequence[str]") -> int | None:
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
        try:
            request = {"op": "attach", "jobid": jobid, "json": json_out}
            if verbose:
                request["verbose"] = True
            try:
                sock.sendall(dumps(request).encode() + b"\n")
                for msg in _answers(sock):
                    code = _say(msg)
                    if code is not None:
                        return code
            except (_Lost, OSError):
                time.sleep(delay)  # that server went away too: the next one takes over
                continue
        finally:
            sock.close()
    sys.stderr.write(f"sdexec: no sdexec server to follow job {jobid}; see 'sdexec attach'\n")
    return 125


def entry() -> None:
    """The ``sdexec`` program."""
    argv = sys.argv[1:]
    if wants_server(argv):
        code = run_via_server(argv)
        if code is not None:
            _exit(code)
    from sdexec.cli.main import entry as cli_entry

    cli_entry()


def _exit(code: int) -> "NoReturn":
    """``sys.exit(code)`` without the interpreter's teardown (1-2 ms of every job through the
    server): nothing of ours needs it (the socket is closed, stdio is flushed here). When
    something registered an exit handler (coverage, under the tests) or a flush fails (its
    error and exit status are the interpreter's to give), the normal exit runs."""
    import atexit  # built in, already initialised

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    pending = getattr(atexit, "_ncallbacks", None)
    if pending is None or pending():
        sys.exit(code)
    os._exit(code)
