"""The client's side of the server protocol (sdexec/cli/client.py), against a scripted server.

The real server is exercised by the node's integration tests; what they cannot provoke at
will is here: answers that are not JSON objects, a server that hangs up before or after it
accepted the job (the client follows the job again through the next server, retrying one that
goes away too), a signal forwarded as a cancel, an unreachable socket, ``attach``'s options.
The client runs as a real ``python -m sdexec`` process on a real unix socket; the server is a
thread of this test that plays a script, one function a connection.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdexec.cli import client
from sdexec.protocol import endpoint

TIMEOUT = 60.0  # what a broken client would hit; a working one takes milliseconds


class Conn:
    """One accepted connection: the client's lines in, the script's lines out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 8)
            for fd in fds:
                os.close(fd)  # the client's stdio: a real server would give them to the unit
            self.fds.extend(fds)
            if not data:
                raise EOFError("the client hung up")
            self.buf += data
        raw, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def send(self, *msgs: object) -> None:
        self.sock.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in msgs))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)


Script = Callable[[Conn], None]


class ScriptedServer:
    """Accepts one connection per script, plays it, records the client's requests."""

    def __init__(self, path: Path, scripts: list[Script]) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(TIMEOUT)
        self.scripts = scripts
        self.requests: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            for script in self.scripts:
                sock, _ = self.listener.accept()
                sock.settimeout(TIMEOUT)
                with sock:
                    script(Conn(sock))
        except BaseException as e:  # reported by join(): a thread's failure must fail the test
            self.errors.append(e)

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the script did not run to its end"
        assert not self.errors, self.errors
        self.listener.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "sdexec.sock"


def _client_env(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SDEXEC_NO_SERVER", "SDEXEC_CONFIG")}
    env["SDEXEC_SOCKET"] = str(path)
    return env


def _sdexec(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sdexec", *args],
        env=_client_env(path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


# --- run ------------------------------------------------------------------------------------


def test_answers_that_are_not_json_objects_are_skipped(sock_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def script(c: Conn) -> None:
        seen.append(c.line())
        c.send_raw(b"not json\n[1, 2]\n\n")
        c.send({"accepted": "p1"}, {"stderr": ["from the server"], "exit": 7})

    server = ScriptedServer(sock_path, [script])
    code, err = _finish(_sdexec(sock_path, "run", "--job", "p1", "--", "true"))
    server.join()
    assert code == 7 and err == "from the server\n", err
    (req,) = seen
    assert req["op"] == "run" and req["argv"] == ["--job", "p1", "--", "true"]
    assert req["cwd"] == os.getcwd() and req["env"]["SDEXEC_SOCKET"] == str(sock_path)
    assert "pmi_fd" not in req


def test_hang_up_before_accepting_means_the_job_did_not_run(sock_path: Path) -> None:
    def read_and_hang_up(c: Conn) -> None:
        c.line()

    server = ScriptedServer(sock_path, [read_and_hang_up])
    code, err = _finish(_sdexec(sock_path, "run", "--", "true"))
    server.join()
    assert code == 125
    assert "closed the connection before it accepted the job (the job did not run)" in err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("json_out", [False, True])
def test_hang_up_after_accepting_follows_the_job_again(sock_path: Path, json_out: bool) -> None:
    """A restarted server: the next one (socket activation) is asked for the job's end; one
    that goes away before answering is retried."""
    attaches: list[dict[str, Any]] = []

    def accept_then_vanish(c: Conn) -> None:
        c.line()
        c.send({"accepted": "p2"})

    def vanish_again(c: Conn) -> None:
        attaches.append(c.line())

    def answer(c: Conn) -> None:
        attaches.append(c.line())
        c.send({"stderr": ["the end"], "exit": 9})

    server = ScriptedServer(sock_path, [accept_then_vanish, vanish_again, answer])
    args = ["--json"] if json_out else []
    code, err = _finish(_sdexec(sock_path, "run", *args, "--", "true"))
    server.join()
    assert code == 9, err
    assert err == "sdexec: lost the sdexec server; following job p2 again\nthe end\n"
    assert attaches == [{"op": "attach", "jobid": "p2", "json": json_out}] * 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_are_forwarded_as_a_cancel(sock_path: Path, sig: signal.Signals) -> None:
    cancels: list[dict[str, Any]] = []

    def script(c: Conn) -> None:
        c.line()
        c.send({"accepted": "p3"}, {"stderr": ["running"]})
        cancels.append(c.line())
        c.send({"exit": 128 + int(sig)})

    server = ScriptedServer(sock_path, [script])
    proc = _sdexec(sock_path, "run", "--", "sleep", "300")
    assert proc.stderr is not None
    # printed once the client is reading answers: its handlers are in place
    assert proc.stderr.readline() == "running\n"
    proc.send_signal(sig)
    code, err = _finish(proc)
    server.join()
    assert code == 128 + sig, err
    assert cancels == [{"op": "cancel", "signal": int(sig)}]


def test_an_unreachable_server_is_125_not_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A socket path the kernel cannot follow is not "no server": running in-process behind a
    server's back is for a node without one."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    monkeypatch.setenv("SDEXEC_SOCKET", str(loop))
    assert client.run_via_server(["run", "--", "true"]) == 125
    err = capsys.readouterr().err
    assert (
        err
        == f"sdexec: cannot reach the sdexec server at {loop}: Too many levels of symbolic links\n"
    )


def test_no_server_runs_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEXEC_SOCKET", str(tmp_path / "none.sock"))
    assert client.run_via_server(["run", "--", "true"]) is None
    assert client.run_via_server(["attach", "--job", "x"]) is None


# --- attach ----------------------------------------------------------------------------------


def test_attach_through_the_server(sock_path: Path) -> None:
    attaches: list[dict[str, Any]] = []

    def probe(c: Conn) -> None:
        pass  # the client's look for a server: it connects and hangs up

    def answer(c: Conn) -> None:
        attaches.append(c.line())
        c.send({"stderr": ["job a1 exited 3"], "exit": 3})

    server = ScriptedServer(sock_path, [probe, answer])
    code, err = _finish(_sdexec(sock_path, "attach", "--job=a1", "--json", "--user"))
    server.join()
    assert (code, err) == (3, "job a1 exited 3\n")
    assert attaches == [{"op": "attach", "jobid": "a1", "json": True}]


def test_attach_options() -> None:
    assert client._attach_options(["attach", "--job", "j1"]) == ("j1", False, False, False)
    assert client._attach_options(["attach", "--json", "--job=j2", "--user"]) == (
        "j2",
        True,
        True,
        False,
    )
    assert client._attach_options(["attach", "-v", "--job", "j3"]) == ("j3", False, False, True)
    # anything else is the in-process parser's to explain
    assert client._attach_options(["attach", "--json"]) is None
    assert client._attach_options(["attach", "--job"]) is None
    assert client._attach_options(["attach", "--job", "j3", "--verbose"]) == (
        "j3",
        False,
        False,
        True,
    )
    assert client._attach_options(["attach", "--job", "j3", "--quiet"]) is None


def test_following_a_job_with_no_server_gives_up_after_backing_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # the client's back-off
    assert client._reattach(str(tmp_path / "none.sock"), "j4", False) == 125
    assert slept == [0.1, 0.2, 0.5, 1, 2, 5, 10]
    err = capsys.readouterr().err
    assert err == "sdexec: no sdexec server to follow job j4; see 'sdexec attach'\n"


# --- what decides server or in-process -----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["run", "--", "true"], True),
        (["attach", "--job", "1"], True),
        (["run", "--", "-c", "x"], True),  # the job's own arguments are not ours
        (["run", "-c", "/etc/x.toml", "--", "true"], False),
        (["run", "-c/etc/x.toml", "--", "true"], False),
        (["run", "--config=/etc/x.toml", "--", "true"], False),
        (["run", "--dry-run", "--", "true"], False),
        (["run", "--help"], False),
        (["jobs"], False),
        ([], False),
    ],
)
def test_wants_server(argv: list[str], wanted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDEXEC_NO_SERVER", raising=False)
    assert client.wants_server(argv) is wanted


def test_no_server_variable_keeps_everything_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEXEC_NO_SERVER", "1")
    assert not client.wants_server(["run", "--", "true"])


def test_socket_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDEXEC_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    assert endpoint.socket_path(False) == endpoint.SYSTEM_SOCKET
    assert endpoint.socket_path(True) == "/run/user/4242/sdexec/sdexec.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert endpoint.socket_path(True) == f"/run/user/{os.getuid()}/sdexec/sdexec.sock"
    monkeypatch.setenv("SDEXEC_SOCKET", "/tmp/elsewhere.sock")
    assert endpoint.socket_path(True) == endpoint.socket_path(False) == "/tmp/elsewhere.sock"


# --- PMI_FD ----------------------------------------------------------------------------------


@pytest.fixture
def pmi_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    yield lambda value: monkeypatch.setenv("PMI_FD", value)


def test_pmi_fd_must_name_an_open_socket(
    tmp_path: Path, pmi_env: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PMI_FD", raising=False)
    assert client._pmi_fd() is None
    a, b = socket.socketpair()
    with a, b, open(tmp_path / "f", "w") as f:
        pmi_env(str(a.fileno()))
        assert client._pmi_fd() == a.fileno()
        pmi_env(str(f.fileno()))
        assert client._pmi_fd() is None  # a file is no PMI
        pmi_env("x3")
        assert client._pmi_fd() is None
        closed = os.dup(a.fileno())
        os.close(closed)
        pmi_env(str(closed))
        assert client._pmi_fd() is None


def test_a_pmi_socket_goes_to_the_server_with_the_request(sock_path: Path) -> None:
    """srun --mpi=pmi2's PMI_FD: the server holds the start barrier, so it needs the fd."""
    got: list[tuple[dict[str, Any], int]] = []

    def script(c: Conn) -> None:
        got.append((c.line(), len(c.fds)))
        c.send({"accepted": "p5"}, {"exit": 0})

    server = ScriptedServer(sock_path, [script])
    a, b = socket.socketpair()
    with a, b:
        env = {**_client_env(sock_path), "PMI_FD": str(a.fileno())}
        p = subprocess.run(
            [sys.executable, "-m", "sdexec", "run", "--", "true"], env=env, pass_fds=[a.fileno()],
            capture_output=True, text=True, timeout=TIMEOUT, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    server.join()
    assert p.returncode == 0, p.stderr
    ((req, nfds),) = got
    assert req["pmi_fd"] is True and nfds == 4  # stdin, stdout, stderr and the PMI socket


def test_a_request_that_could_not_be_sent_did_not_run(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server killed between our connect and our request (a full node's restart): the
    message says nothing ran, as a resource manager must know to run the job again."""

    def hang_up(c: Conn) -> None:
        pass

    def broken_pipe(*_args: object) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    server = ScriptedServer(sock_path, [hang_up])
    monkeypatch.setenv("SDEXEC_SOCKET", str(sock_path))
    # the one way to lose that race every time: the client's send fails as the kernel's would
    monkeypatch.setattr(client, "_send_with_fds", broken_pipe)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = client.run_via_server(["run", "--", "true"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    server.join()
    assert code == 125
    err = capsys.readouterr().err
    assert err == (
        "sdexec: could not hand the job to the sdexec server ([Errno 32] Broken pipe); "
        "the job did not run\n"
    )
