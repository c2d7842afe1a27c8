"""The client's connect (sdexec/cli/client.py): in-process only when there is no server; a full
listen queue is waited out, then 125 "busy" (real unix sockets, no server needed)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sdexec.cli import client
from sdexec.cli.client import ServerUnreachable, _connect


def test_no_socket_means_no_server(tmp_path: Path) -> None:
    assert _connect(str(tmp_path / "none.sock")) is None
    assert _connect(str(tmp_path / "no-dir" / "none.sock")) is None


def test_nobody_listening_means_no_server(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(path)  # bound, never listening: ECONNREFUSED, as after the server died
        assert _connect(path) is None


def _full_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its queue filled (connect now gets EAGAIN)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return listener, queued
        queued.append(s)


def test_a_full_queue_is_waited_out_then_busy(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listener, queued = _full_listener(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerUnreachable, match=r"busy .*listen queue.*retry later"):
            _connect(path, patience=0.3)
        assert time.monotonic() - t0 >= 0.3
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_a_queue_that_drains_lets_the_client_in(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listener, queued = _full_listener(path)
    try:
        first = queued.pop(0)  # a real server would accept it: here the queue is freed
        listener.accept()[0].close()
        first.close()
        sock = _connect(path, patience=5)
        assert sock is not None and sock.getblocking()
        sock.close()
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_busy_server_is_125_not_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "s.sock")
    listener, queued = _full_listener(path)
    monkeypatch.setenv("SDEXEC_SOCKET", path)
    monkeypatch.setattr(client, "CONNECT_PATIENCE", 0.2)
    try:
        assert client.run_via_server(["run", "--", "true"]) == 125
    finally:
        for s in queued:
            s.close()
        listener.close()
    err = capsys.readouterr().err
    assert err.startswith("sdexec: the sdexec server at ") and "busy" in err
    assert err.count("\n") == 1
