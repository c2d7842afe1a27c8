"""The sdexec stop timer: what happens to a unit stuck in ``deactivating``.

A guest's unit (through the IMP) runs with ``KillMode=process`` and no systemd stop timeout
(systemd, running as the instance owner, must not signal a guest's processes: only the IMP
may), so when the job shell exits, leftover user processes keep the unit in ``deactivating``
for ever; any other unit's leftovers can outlast systemd's SIGTERM the same way. This timer
bounds that: after ``sdexec-stop-timer-sec`` it sends ``sdexec-stop-timer-signal`` through
``KillUnit`` (to the IMP, the main process, for a guest: SIGUSR1 by default, which it turns
into SIGKILL of the whole cgroup; to every process of the unit otherwise), and after the same
time again it gives up on the unit, so the job's kill escalation can end in draining the node.

Timeline for the defaults (30 s, SIGUSR1), unit deactivating at t=0:
``t=0`` armed; ``t=30`` KillUnit(SIGUSR1); ``t=60`` Abandon.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from sdexec.config.duration import format_seconds
from sdexec.config.signals import signal_name
from sdexec.systemd.unitstate import ENDED, ActiveState

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig
    from sdexec.exec.clock import Clock

__all__ = [
    "Abandon",
    "KillUnit",
    "StopAction",
    "StopTimer",
    "StopTimerPolicy",
    "StopTimerState",
]

log = logging.getLogger(__name__)

StopTimerState: TypeAlias = Literal["idle", "armed", "signalled", "abandoned", "done"]

#: unit ActiveState values meaning the unit is gone (or no longer has processes to wait for)
_FINAL_STATES = ENDED


@dataclass(frozen=True)
class KillUnit:
    """Send ``signal`` with ``KillUnit``: to the main process for a guest (the IMP), to the
    whole unit otherwise (the job's ``stop_signal_target``)."""

    signal: int


@dataclass(frozen=True)
class Abandon:
    """Stop tracking the unit and fail the request with ``reason``."""

    reason: str


StopAction: TypeAlias = KillUnit | Abandon


@dataclass(frozen=True)
class StopTimerPolicy:
    """How long a unit may stay deactivating before each step, and the signal to send."""

    timeout: float
    signal: int

    def __post_init__(self) -> None:
        if self.timeout < 0:
            raise ValueError(f"stop timer timeout must be >= 0, not {self.timeout}")
        if self.signal <= 0:
            raise ValueError(f"stop timer signal must be a positive number, not {self.signal}")

    @classmethod
    def from_config(cls, cfg: ExecConfig, *, via_imp: bool) -> StopTimerPolicy:
        """SIGUSR1 only means "kill everything" to the IMP.

        Sent to a job shell running without the IMP, SIGUSR1 would be an ordinary (often
        ignored or fatal-by-accident) signal; so a signal left at its default becomes SIGKILL
        there. A signal the admin configured explicitly is sent as given.
        """
        signum = cfg.sdexec_stop_timer_signal
        if not via_imp and not cfg.sdexec_stop_timer_signal_set:
            signum = int(signal.SIGKILL)
        return cls(timeout=float(cfg.sdexec_stop_timer_sec), signal=signum)


class StopTimer:
    """Pure state machine; the launcher feeds it unit states and runs it with ``clock.drive``."""

    def __init__(self, policy: StopTimerPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self.state: StopTimerState = "idle"
        #: when the unit first entered deactivating
        self.armed_at: float | None = None
        #: when the signal was sent
        self.signalled_at: float | None = None
        self._deadline: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ("abandoned", "done")

    def deadline(self) -> float | None:
        return self._deadline

    def on_unit_state(self, active_state: str) -> None:
        """Track the unit's ActiveState.

        Only the first ``deactivating`` arms the timer: a unit that flaps between states must
        not be able to postpone its kill for ever. Any other live state (``active`` after a
        reload...) leaves a running timer alone, since the unit has not gone away.
        """
        if self.done:
            return
        if active_state in _FINAL_STATES:
            log.debug("stop timer: unit %s, timer off (was %s)", active_state, self.state)
            self.state = "done"
            self._deadline = None
            return
        if active_state == ActiveState.DEACTIVATING and self.state == "idle":
            now = self._clock.now()
            self.state = "armed"
            self.armed_at = now
            self._deadline = now + self.policy.timeout
            log.debug("stop timer armed: %s in %ss", self._signame(), self.policy.timeout)

    def expire(self, now: float) -> list[StopAction]:
        """Called at (or after) the deadline; earlier calls are no-ops."""
        if self._deadline is None or now < self._deadline:
            return []
        if self.state == "armed":
            self.state = "signalled"
            self.signalled_at = now
            self._deadline = now + self.policy.timeout
            log.info("stop timer: unit still deactivating, sending %s", self._signame())
            return [KillUnit(self.policy.signal)]
        # signalled: the second expiry
        assert self.armed_at is not None
        waited = now - self.armed_at
        reason = (
            f"processes did not respond to signal {self.policy.signal} ({self._signame()}) "
            f"after {format_seconds(waited)}s; unit abandoned"
        )
        self.state = "abandoned"
        self._deadline = None
        log.warning("stop timer: %s", reason)
        return [Abandon(reason)]

    def _signame(self) -> str:
        return signal_name(self.policy.signal)
