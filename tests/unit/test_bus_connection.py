"""Which connection to systemd the bus layer makes (sdexec/systemd/bus.py): through dbus-daemon,
or direct on systemd's private socket, which only root on the system manager may use."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from sdexec.errors import LaunchError
from sdexec.systemd import bus


@pytest.fixture
def private_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "private"
    path.touch()
    monkeypatch.setattr(bus, "SYSTEMD_PRIVATE", str(path))
    monkeypatch.delenv(bus.CONNECTION_ENV, raising=False)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="direct needs root")
def test_auto_is_direct_for_root_on_the_system_manager(private_socket: Path) -> None:
    assert bus.connection_mode(user=False, asked="auto") == "direct"
    assert bus.connection_mode(user=False, asked="direct") == "direct"


def test_auto_is_the_bus_for_a_user_manager(private_socket: Path) -> None:
    assert bus.connection_mode(user=True, asked="auto") == "bus"
    with pytest.raises(LaunchError, match="needs root, the system manager"):
        bus.connection_mode(user=True, asked="direct")


def test_auto_is_the_bus_without_systemds_socket(private_socket: Path) -> None:
    private_socket.unlink()
    assert bus.connection_mode(user=False, asked="auto") == "bus"
    with pytest.raises(LaunchError, match="private"):
        bus.connection_mode(user=False, asked="direct")


def test_the_environment_picks_it_and_a_bad_value_is_one_line(
    private_socket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(bus.CONNECTION_ENV, "bus")
    assert bus.connection_mode(user=False) == "bus"
    monkeypatch.setenv(bus.CONNECTION_ENV, "dbus")
    with pytest.raises(LaunchError, match=r"SDEXEC_SYSTEMD_CONNECTION: 'dbus' is not one of"):
        bus.connection_mode(user=False)


def test_the_default_is_auto_so_a_user_manager_gets_the_bus(private_socket: Path) -> None:
    assert bus.DEFAULT_CONNECTION == "auto"
    assert bus.connection_mode(user=True) == "bus"
    assert bus.Manager().connection == "auto"


def test_unread_counts_what_the_peer_has_not_read() -> None:
    """What the direct connect waits on before its Hello (systemd must have read BEGIN)."""
    a, b = socket.socketpair()
    with a, b:
        assert bus._unread(a.fileno()) == 0
        a.sendall(b"BEGIN\r\n")
        assert bus._unread(a.fileno()) > 0
        assert b.recv(64) == b"BEGIN\r\n"
        assert bus._unread(a.fileno()) == 0
