"""Tests for sdexec.exec.clock: the fake clock and the generic timer driver."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from sdexec.exec import clock as clock_mod
from sdexec.exec.clock import Clock, FakeClock, MonotonicClock, drive


class Script:
    """A toy machine firing one action per scheduled deadline."""

    def __init__(self, deadlines: list[float], *, finish_when_empty: bool = True) -> None:
        self.pending = list(deadlines)
        self.finish_when_empty = finish_when_empty
        self.done = False
        self.expire_calls: list[float] = []

    def deadline(self) -> float | None:
        return self.pending[0] if self.pending else None

    def expire(self, now: float) -> list[str]:
        self.expire_calls.append(now)
        if not self.pending or now < self.pending[0]:
            return []
        d = self.pending.pop(0)
        if not self.pending and self.finish_when_empty:
            self.done = True
        return [f"fired@{d:g}"]


async def settle(rounds: int = 20) -> None:
    """Let every ready task run (the driver needs a few loop turns to react to a wake)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Recorder:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, list[str]]] = []

    async def __call__(self, actions: list[str]) -> None:
        self.calls.append((self.clock.now(), actions))


# --- MonotonicClock -------------------------------------------------------------------------


def test_monotonic_clock_now_does_not_go_back() -> None:
    c = MonotonicClock()
    a = c.now()
    b = c.now()
    assert b >= a


async def test_monotonic_clock_past_deadline_does_not_sleep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("asyncio.sleep", fake_sleep)
    c = MonotonicClock()
    await c.sleep_until(c.now() - 10)
    assert slept == []


async def test_monotonic_clock_sleeps_the_remaining_time(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(clock_mod, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    monkeypatch.setattr("asyncio.sleep", fake_sleep)
    await MonotonicClock().sleep_until(1002.5)
    assert slept == [2.5]


# --- FakeClock ------------------------------------------------------------------------------


def test_fake_clock_advance_and_set() -> None:
    c = FakeClock(10.0)
    assert c.now() == 10.0
    c.advance(2.5)
    assert c.now() == 12.5
    c.set(20.0)
    assert c.now() == 20.0
    with pytest.raises(ValueError):
        c.advance(-1)
    with pytest.raises(ValueError):
        c.set(19.0)
    assert c.now() == 20.0


async def test_fake_clock_sleep_jumps_to_deadline() -> None:
    c = FakeClock()
    await c.sleep_until(42.0)
    assert c.now() == 42.0
    await c.sleep_until(5.0)  # a past deadline never moves time back
    assert c.now() == 42.0
    assert c.sleeps == [42.0, 5.0]


async def test_fake_clock_manual_mode_waits_for_advance() -> None:
    c = FakeClock(auto_advance=False)
    task = asyncio.ensure_future(c.sleep_until(10.0))
    await settle()
    assert not task.done()
    c.advance(9.0)
    await asyncio.sleep(0)
    assert not task.done()
    c.advance(1.0)
    await asyncio.wait_for(task, 1)
    assert c.now() == 10.0


async def test_fake_clock_manual_mode_past_deadline_returns() -> None:
    c = FakeClock(5.0, auto_advance=False)
    await asyncio.wait_for(c.sleep_until(3.0), 1)
    assert c.now() == 5.0


async def test_fake_clock_manual_mode_cancelled_sleeper_is_forgotten() -> None:
    c = FakeClock(auto_advance=False)
    task = asyncio.ensure_future(c.sleep_until(10.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c._waiters == []
    c.advance(20)  # must not touch the cancelled future


# --- drive ----------------------------------------------------------------------------------


async def test_drive_runs_every_deadline_in_order_at_its_time() -> None:
    c = FakeClock()
    m = Script([5.0, 10.0, 30.0])
    rec = Recorder(c)
    await asyncio.wait_for(drive(m, c, rec, asyncio.Event()), 1)
    assert rec.calls == [(5.0, ["fired@5"]), (10.0, ["fired@10"]), (30.0, ["fired@30"])]
    assert m.done


async def test_drive_returns_at_once_when_done() -> None:
    c = FakeClock()
    m = Script([5.0])
    m.done = True
    rec = Recorder(c)
    await asyncio.wait_for(drive(m, c, rec, asyncio.Event()), 1)
    assert rec.calls == []
    assert c.now() == 0.0


async def test_drive_fires_an_overdue_deadline_without_sleeping() -> None:
    c = FakeClock(100.0)
    m = Script([5.0])
    rec = Recorder(c)
    await asyncio.wait_for(drive(m, c, rec, asyncio.Event()), 1)
    assert rec.calls == [(100.0, ["fired@5"])]
    assert c.sleeps == []


async def test_drive_waits_for_wake_when_no_deadline() -> None:
    c = FakeClock()
    m = Script([], finish_when_empty=True)
    wake = asyncio.Event()
    rec = Recorder(c)
    task = asyncio.ensure_future(drive(m, c, rec, wake))
    await settle()
    assert not task.done()
    assert c.sleeps == []
    # an external event gives the machine a deadline
    m.pending.append(7.0)
    wake.set()
    await asyncio.wait_for(task, 1)
    assert rec.calls == [(7.0, ["fired@7"])]


async def test_drive_stops_when_machine_finished_externally() -> None:
    c = FakeClock()
    m = Script([], finish_when_empty=False)
    wake = asyncio.Event()
    task = asyncio.ensure_future(drive(m, c, Recorder(c), wake))
    await asyncio.sleep(0)
    m.done = True
    wake.set()
    await asyncio.wait_for(task, 1)


async def test_drive_wake_interrupts_sleep_and_rereads_deadline() -> None:
    c = FakeClock(auto_advance=False)
    m = Script([100.0])
    wake = asyncio.Event()
    rec = Recorder(c)
    task = asyncio.ensure_future(drive(m, c, rec, wake))
    await settle()
    assert c.sleeps == [100.0]
    # an external event moves the deadline earlier
    m.pending.insert(0, 20.0)
    wake.set()
    await settle()
    assert c.sleeps == [100.0, 20.0]
    assert rec.calls == []
    c.set(20.0)
    await settle()
    assert rec.calls == [(20.0, ["fired@20"])]
    c.set(100.0)
    await asyncio.wait_for(task, 1)
    assert rec.calls == [(20.0, ["fired@20"]), (100.0, ["fired@100"])]


async def test_drive_wake_with_no_change_does_not_fire_early() -> None:
    c = FakeClock(auto_advance=False)
    m = Script([50.0])
    wake = asyncio.Event()
    rec = Recorder(c)
    task = asyncio.ensure_future(drive(m, c, rec, wake))
    await asyncio.sleep(0)
    wake.set()
    await settle()
    assert rec.calls == []
    assert not wake.is_set()  # consumed by the driver
    c.set(50.0)
    await asyncio.wait_for(task, 1)
    assert rec.calls == [(50.0, ["fired@50"])]
    assert all(t >= 50.0 for t in m.expire_calls)


async def test_drive_on_actions_may_finish_the_machine() -> None:
    c = FakeClock()
    m = Script([1.0, 2.0, 3.0])
    seen: list[list[str]] = []

    async def on_actions(actions: list[str]) -> None:
        seen.append(actions)
        m.done = True  # e.g. the job exited while we were signalling it

    await asyncio.wait_for(drive(m, c, on_actions, asyncio.Event()), 1)
    assert seen == [["fired@1"]]
    assert c.now() == 1.0


async def test_drive_cancellation_leaves_no_pending_tasks() -> None:
    c = FakeClock(auto_advance=False)
    m = Script([100.0])
    task = asyncio.ensure_future(drive(m, c, Recorder(c), asyncio.Event()))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    assert c._waiters == []
