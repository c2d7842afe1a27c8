"""Time as an injectable dependency, and the one async loop that drives timer state machines.

The stop timer and the termination sequence are pure state machines that only ever ask "what
is the next deadline?" and "time is now T, what must I do?". Keeping the clock behind a
protocol lets tests run a 15-minute kill escalation in microseconds with :class:`FakeClock`,
and keeps every wait of those machines in :func:`drive` (the launcher's other sleeps are
polls of systemd and backoffs, not timers of the job).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from sdexec.exec.aio import first_completed

__all__ = ["Clock", "FakeClock", "MonotonicClock", "TimedMachine", "drive"]

log = logging.getLogger(__name__)

A = TypeVar("A")


class Clock(Protocol):
    """Monotonic seconds, and a way to wait for a point in that time.

    ``sleep_until`` may return a clock tick early: callers re-check ``now()``.
    """

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    """The real clock: wall-clock jumps (NTP, suspend) must not fire or delay kill timers."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        # The event loop may wake a timer up to one clock resolution early; drive() re-checks
        # the deadline and sleeps again, so no loop is needed here.
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)


class FakeClock:
    """Virtual time for tests.

    With ``auto_advance`` (the default) a sleeper jumps virtual time straight to its deadline,
    so a driver runs a whole timeline at once. Without it, sleepers wait until the test moves
    time past their deadline with :meth:`advance` or :meth:`set`, to interleave external events.
    """

    def __init__(self, start: float = 0.0, *, auto_advance: bool = True) -> None:
        self._now = start
        self.auto_advance = auto_advance
        #: every deadline passed to sleep_until, in call order
        self.sleeps: list[float] = []
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"FakeClock cannot go backwards ({t} < {self._now})")
        self._now = t
        self._wake_due()

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"FakeClock cannot go backwards (advance({dt}))")
        self.set(self._now + dt)

    async def sleep_until(self, deadline: float) -> None:
        self.sleeps.append(deadline)
        if self.auto_advance:
            # Yield first, so that a sleeper cancelled in the same loop iteration (the driver
            # was woken by an external event) leaves virtual time where it was.
            await asyncio.sleep(0)
            self._now = max(self._now, deadline)
            return
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (deadline, fut)
        self._waiters.append(entry)
        try:
            await fut
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _wake_due(self) -> None:
        for deadline, fut in list(self._waiters):
            if deadline <= self._now and not fut.done():
                fut.set_result(None)


class TimedMachine(Protocol[A]):
    """A pure state machine with at most one pending deadline."""

    @property
    def done(self) -> bool: ...

    def deadline(self) -> float | None: ...

    def expire(self, now: float) -> list[A]: ...


async def drive(
    machine: TimedMachine[A],
    clock: Clock,
    on_actions: Callable[[list[A]], Awaitable[None]],
    wake: asyncio.Event,
) -> None:
    """Run ``machine``'s timers until it is done.

    Whoever feeds the machine external events (unit state changes, job exit, cancel) must set
    ``wake`` afterwards, so that a new or removed deadline, or ``done``, is noticed at once.
    ``on_actions`` runs inside this loop: while it awaits, no timer fires.
    """
    while not machine.done:
        if wake.is_set():
            wake.clear()
        deadline = machine.deadline()
        if deadline is None:
            await wake.wait()
            continue
        if clock.now() < deadline:
            sleeper = asyncio.ensure_future(clock.sleep_until(deadline))
            await first_completed(sleeper, wake.wait())
            if not sleeper.cancelled() and (exc := sleeper.exception()) is not None:
                raise exc
            # The machine may have changed while we slept: re-read its deadline.
            continue
        actions = machine.expire(clock.now())
        if actions:
            await on_actions(actions)
        else:
            # Stay cooperative even if a machine declines to act at its own deadline.
            await asyncio.sleep(0)
