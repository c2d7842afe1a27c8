"""Every wait of Manager.call is bounded: a termination sequence or a drain that calls systemd
gets an error in bounded time instead of stalling on a bus that is not coming back.

Pure logic of the call path, so no systemd: a Manager that never connected (what a dropped,
never-restored bus looks like to a caller) and one whose bus never answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdexec.errors import LaunchError
from sdexec.systemd import bus as busmod
from sdexec.systemd.bus import Manager


async def test_call_without_a_connection_fails_after_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(busmod, "RETRY_FOR", 0.2)
    manager = Manager()  # never connected: _connected is not set, as while reconnecting
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(LaunchError, match=r"KillUnit: not connected to systemd .*0\.2s"):
        await manager.call("KillUnit", "ssi", ["x.service", "all", 15], retry=True)
    assert loop.time() - t0 < 10  # bounded (the point), not a timing assertion on its value


async def test_call_comes_through_when_the_connection_returns_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deadline bounds the wait; it does not cut a reconnect that comes in time."""
    manager = Manager()

    async def answer(*_args: Any) -> list[Any]:
        return ["ok"]

    monkeypatch.setattr(manager, "_call_on", answer)
    monkeypatch.setattr(manager, "_bus", object())
    call = asyncio.ensure_future(manager.call("GetAll", "s", [""], retry=True))
    await asyncio.sleep(0)  # the call is now waiting for the connection
    assert not call.done()
    manager._connected.set()
    assert await call == ["ok"]


class _SilentBus:
    """A bus that takes a call and never answers (PID 1 stuck, a half-dead connection)."""

    connected = True

    async def call(self, _msg: object) -> None:
        await asyncio.Event().wait()


async def test_a_call_never_answered_fails_after_call_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(busmod, "CALL_TIMEOUT", 0.1)
    manager = Manager()
    with pytest.raises(LaunchError, match=r"StopUnit: no reply from systemd in 0\.1s"):
        await manager._call_on(_SilentBus(), "StopUnit", "ss", ["x.service", "fail"])  # type: ignore[arg-type]
