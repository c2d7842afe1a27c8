"""Tests for sdexec.exec.stoptimer: every transition of the sdexec stop timer."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Any, cast

import pytest

from sdexec.exec.clock import FakeClock, drive
from sdexec.exec.stoptimer import Abandon, KillUnit, StopAction, StopTimer, StopTimerPolicy

SIGUSR1 = int(signal.SIGUSR1)
SIGKILL = int(signal.SIGKILL)


def make(
    timeout: float = 30.0, sig: int = SIGUSR1, start: float = 0.0
) -> tuple[StopTimer, FakeClock]:
    clock = FakeClock(start)
    return StopTimer(StopTimerPolicy(timeout=timeout, signal=sig), clock), clock


# --- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeCfg:
    sdexec_stop_timer_sec: float = 30.0
    sdexec_stop_timer_signal: int = SIGUSR1
    sdexec_stop_timer_signal_set: bool = False


@pytest.mark.parametrize(
    ("via_imp", "sig", "is_set", "expected"),
    [
        (True, SIGUSR1, False, SIGUSR1),  # the IMP turns SIGUSR1 into SIGKILL itself
        (False, SIGUSR1, False, SIGKILL),  # default signal, no IMP: send the real thing
        (False, SIGUSR1, True, SIGUSR1),  # admin asked for SIGUSR1 explicitly
        (False, int(signal.SIGTERM), True, int(signal.SIGTERM)),
        (True, int(signal.SIGTERM), True, int(signal.SIGTERM)),
    ],
)
def test_policy_from_config_signal(via_imp: bool, sig: int, is_set: bool, expected: int) -> None:
    cfg = FakeCfg(
        sdexec_stop_timer_sec=12, sdexec_stop_timer_signal=sig, sdexec_stop_timer_signal_set=is_set
    )
    policy = StopTimerPolicy.from_config(cast(Any, cfg), via_imp=via_imp)
    assert policy == StopTimerPolicy(timeout=12.0, signal=expected)
    assert isinstance(policy.timeout, float)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        StopTimerPolicy(timeout=-1, signal=SIGUSR1)
    with pytest.raises(ValueError):
        StopTimerPolicy(timeout=1, signal=0)


# --- transitions ----------------------------------------------------------------------------


def test_idle_until_deactivating() -> None:
    t, _ = make()
    assert (t.state, t.done, t.deadline()) == ("idle", False, None)
    for state in ("activating", "active", "reloading", "maintenance"):
        t.on_unit_state(state)
        assert t.state == "idle"
        assert t.deadline() is None
    assert t.expire(1e9) == []
    assert t.state == "idle"


@pytest.mark.parametrize("final", ["inactive", "failed"])
def test_idle_to_done_when_unit_goes_away(final: str) -> None:
    t, _ = make()
    t.on_unit_state(final)
    assert (t.state, t.done, t.deadline()) == ("done", True, None)
    t.on_unit_state("deactivating")  # a late event must not arm a finished timer
    assert t.state == "done"
    assert t.deadline() is None


def test_deactivating_arms_at_now_plus_timeout() -> None:
    t, _ = make(timeout=30, start=100.0)
    t.on_unit_state("deactivating")
    assert t.state == "armed"
    assert t.armed_at == 100.0
    assert t.deadline() == 130.0
    assert not t.done


def test_expire_before_deadline_is_noop() -> None:
    t, _ = make()
    t.on_unit_state("deactivating")
    assert t.expire(29.999) == []
    assert (t.state, t.deadline()) == ("armed", 30.0)


def test_first_expiry_kills_and_rearms_second_abandons() -> None:
    t, clock = make()
    t.on_unit_state("deactivating")
    clock.set(30.0)
    assert t.expire(30.0) == [KillUnit(SIGUSR1)]
    assert t.signalled_at == 30.0
    assert (t.state, t.deadline(), t.done) == ("signalled", 60.0, False)
    assert t.expire(59.0) == []
    actions = t.expire(60.0)
    assert actions == [
        Abandon("processes did not respond to signal 10 (SIGUSR1) after 60s; unit abandoned")
    ]
    assert (t.state, t.done, t.deadline()) == ("abandoned", True, None)
    assert t.expire(1e9) == []
    t.on_unit_state("inactive")  # the unit going away afterwards changes nothing
    assert t.state == "abandoned"


def test_late_expiry_rearms_from_the_signal_and_reports_total_wait() -> None:
    t, _ = make(timeout=10, sig=SIGKILL, start=5.0)
    t.on_unit_state("deactivating")  # deadline 15
    assert t.expire(18.0) == [KillUnit(SIGKILL)]
    assert t.deadline() == 28.0  # the signal gets its full timeout
    [abandon] = t.expire(28.25)
    assert isinstance(abandon, Abandon)
    assert abandon.reason == (
        "processes did not respond to signal 9 (SIGKILL) after 23.2s; unit abandoned"
    )


def test_deactivating_again_does_not_rearm() -> None:
    t, clock = make()
    t.on_unit_state("deactivating")
    clock.set(20.0)
    t.on_unit_state("deactivating")
    assert t.deadline() == 30.0
    assert t.armed_at == 0.0


def test_back_to_active_while_armed_keeps_timer() -> None:
    t, clock = make()
    t.on_unit_state("deactivating")
    clock.set(10.0)
    t.on_unit_state("active")  # e.g. after a reload: the unit has not gone away
    assert (t.state, t.deadline()) == ("armed", 30.0)
    clock.set(20.0)
    t.on_unit_state("deactivating")  # deactivating again: still the original deadline
    assert (t.state, t.deadline()) == ("armed", 30.0)
    assert t.expire(30.0) == [KillUnit(SIGUSR1)]


def test_deactivating_after_signalled_keeps_deadline() -> None:
    t, clock = make()
    t.on_unit_state("deactivating")
    t.expire(30.0)
    clock.set(45.0)
    t.on_unit_state("active")
    t.on_unit_state("deactivating")
    assert (t.state, t.deadline()) == ("signalled", 60.0)


@pytest.mark.parametrize("final", ["inactive", "failed"])
def test_armed_to_done(final: str) -> None:
    t, _ = make()
    t.on_unit_state("deactivating")
    t.on_unit_state(final)
    assert (t.state, t.done, t.deadline()) == ("done", True, None)
    assert t.expire(1e9) == []


@pytest.mark.parametrize("final", ["inactive", "failed"])
def test_signalled_to_done(final: str) -> None:
    t, _ = make()
    t.on_unit_state("deactivating")
    t.expire(30.0)
    t.on_unit_state(final)
    assert (t.state, t.done, t.deadline()) == ("done", True, None)
    assert t.expire(1e9) == []


def test_zero_timeout_fires_at_once() -> None:
    t, _ = make(timeout=0)
    t.on_unit_state("deactivating")
    assert t.expire(0.0) == [KillUnit(SIGUSR1)]
    [abandon] = t.expire(0.0)
    assert isinstance(abandon, Abandon)
    assert "after 0s;" in abandon.reason


def test_reason_with_fractional_timeout() -> None:
    t, _ = make(timeout=0.25, sig=int(signal.SIGTERM))
    t.on_unit_state("deactivating")
    t.expire(0.25)
    [abandon] = t.expire(0.5)
    assert isinstance(abandon, Abandon)
    assert abandon.reason == (
        "processes did not respond to signal 15 (SIGTERM) after 0.5s; unit abandoned"
    )


# --- with the driver ------------------------------------------------------------------------


async def test_driven_timer_kills_then_abandons() -> None:
    t, clock = make(start=1000.0)
    seen: list[tuple[float, list[StopAction]]] = []

    async def on_actions(actions: list[StopAction]) -> None:
        seen.append((clock.now(), actions))

    t.on_unit_state("deactivating")
    await asyncio.wait_for(drive(t, clock, on_actions, asyncio.Event()), 1)
    assert seen == [
        (1030.0, [KillUnit(SIGUSR1)]),
        (
            1060.0,
            [Abandon("processes did not respond to signal 10 (SIGUSR1) after 60s; unit abandoned")],
        ),
    ]


async def test_driven_timer_stops_when_unit_goes_inactive_after_kill() -> None:
    t, clock = make()
    wake = asyncio.Event()
    seen: list[list[StopAction]] = []

    async def on_actions(actions: list[StopAction]) -> None:
        seen.append(actions)
        # the kill worked: systemd reports the unit inactive
        t.on_unit_state("inactive")
        wake.set()

    t.on_unit_state("deactivating")
    await asyncio.wait_for(drive(t, clock, on_actions, wake), 1)
    assert seen == [[KillUnit(SIGUSR1)]]
    assert t.state == "done"
    assert clock.now() == 30.0


async def test_driver_started_before_deactivating_waits_for_wake() -> None:
    t, clock = make()
    wake = asyncio.Event()
    seen: list[list[StopAction]] = []

    async def on_actions(actions: list[StopAction]) -> None:
        seen.append(actions)

    task = asyncio.ensure_future(drive(t, clock, on_actions, wake))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done() and seen == []
    clock.set(7.0)
    t.on_unit_state("deactivating")
    wake.set()
    await asyncio.wait_for(task, 1)
    assert [type(a[0]) for a in seen] == [KillUnit, Abandon]
    assert clock.now() == 67.0
