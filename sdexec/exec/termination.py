"""The job-exec termination sequence: how a cancelled or timed-out job is made to go away.

This is our reading of flux-config-exec(5) "JOB TERMINATION", including the two keys the
reference documents but ignores (``max-term-count``, ``kill-shell-delay``). Escalation is
signals to the tasks first, then to the job shell itself with a doubling interval, and finally
draining the node: a node with processes nobody can kill must not get new jobs.

Exact timeline for the defaults (kill-timeout 5s, kill-shell-delay 25s, max-term-count 2,
max-kill-count 8, no max-kill-timeout), cancel at t=0::

    t=0    SIGTERM -> tasks      (SIGALRM instead when the job hit its time limit)
    t=5    SIGTERM -> tasks      (2nd and last term send: max-term-count)
    t=10   SIGKILL -> tasks
    t=15   SIGKILL -> tasks
    t=20   SIGKILL -> tasks
    t=25   SIGKILL -> shell #1   (kill-shell-delay reached; task signals stop; next in 5s)
    t=30   SIGKILL -> shell #2   (next in 10s)
    t=40   SIGKILL -> shell #3   (next in 20s)
    t=60   SIGKILL -> shell #4   (next in 40s)
    t=100  SIGKILL -> shell #5   (next in 80s)
    t=180  SIGKILL -> shell #6   (next in 160s)
    t=340  SIGKILL -> shell #7   (next in 300s: 320s capped)
    t=640  SIGKILL -> shell #8   (next in 300s)
    t=940  drain: "unkillable user processes for job JOBID (waited 940s, 8 kill attempts)"

Guest jobs run through the IMP get SIGUSR1 instead of SIGKILL at the shell steps (the IMP kills
the whole cgroup on SIGUSR1; SIGKILL would only kill the IMP). Each interval runs from the
moment the previous signal was sent, so every signal gets its full time to act.
``max-kill-timeout``, when set, drains at start + max-kill-timeout whatever the count says.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from sdexec.config.duration import format_seconds
from sdexec.config.signals import signal_name
from sdexec.config.table import ExecConfig

if TYPE_CHECKING:
    from sdexec.exec.clock import Clock

__all__ = [
    "Drain",
    "KillPolicy",
    "SignalShell",
    "SignalTasks",
    "TermAction",
    "TermReason",
    "TermState",
    "Termination",
    "policy_stats",
]

log = logging.getLogger(__name__)

TermReason: TypeAlias = Literal["cancel", "timeout"]
TermState: TypeAlias = Literal["idle", "signalling-tasks", "killing-shell", "drained", "exited"]


@dataclass(frozen=True)
class SignalTasks:
    """Send ``signal`` to all the job's processes (the shell forwards it to the tasks)."""

    signal: int


@dataclass(frozen=True)
class SignalShell:
    """Send ``signal`` to the job's main process: the shell, or the IMP for a guest job."""

    signal: int


@dataclass(frozen=True)
class Drain:
    """The job is unkillable: drain the node with ``reason`` and treat the job as over."""

    reason: str


TermAction: TypeAlias = SignalTasks | SignalShell | Drain


_DEFAULTS = ExecConfig()


@dataclass(frozen=True)
class KillPolicy:
    """The effective ``[exec]`` kill settings for one job (seconds and signal numbers)."""

    # the defaults are [exec]'s own (one definition: sdexec.config.table.ExecConfig)
    term_signal: int = _DEFAULTS.term_signal
    kill_signal: int = _DEFAULTS.kill_signal
    kill_timeout: float = _DEFAULTS.kill_timeout
    kill_shell_delay: float = _DEFAULTS.effective_kill_shell_delay
    max_term_count: int = _DEFAULTS.max_term_count
    max_kill_count: int = _DEFAULTS.max_kill_count
    max_kill_timeout: float | None = _DEFAULTS.max_kill_timeout
    shell_kill_signal: int = _DEFAULTS.kill_signal
    backoff_cap: float = 300.0  # ours: the longest wait between two kill-signal sends

    def __post_init__(self) -> None:
        # Config validation reports user errors; these guard the state machine itself (a zero
        # kill-timeout would make the task phase fire forever at the same instant).
        if not self.kill_timeout > 0:
            raise ValueError(f"kill_timeout must be > 0, not {self.kill_timeout}")
        if not self.backoff_cap > 0:
            raise ValueError(f"backoff_cap must be > 0, not {self.backoff_cap}")
        if self.kill_shell_delay < 0:
            raise ValueError(f"kill_shell_delay must be >= 0, not {self.kill_shell_delay}")
        if self.max_kill_timeout is not None and self.max_kill_timeout < 0:
            raise ValueError(f"max_kill_timeout must be >= 0, not {self.max_kill_timeout}")
        if self.max_term_count < 0 or self.max_kill_count < 0:
            raise ValueError("max_term_count and max_kill_count must be >= 0")
        for name in ("term_signal", "kill_signal", "shell_kill_signal"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive signal number")

    @classmethod
    def from_config(cls, cfg: ExecConfig, *, via_imp: bool) -> KillPolicy:
        """Guest jobs get SIGUSR1 at the shell steps, as in the reference.

        The shell of a guest job is the IMP, running as root: job-exec may not send it SIGKILL,
        and the IMP handles SIGUSR1 by killing the whole cgroup (RFC 15).
        """
        return cls(
            term_signal=cfg.term_signal,
            kill_signal=cfg.kill_signal,
            kill_timeout=cfg.kill_timeout,
            kill_shell_delay=cfg.effective_kill_shell_delay,
            max_term_count=cfg.max_term_count,
            max_kill_count=cfg.max_kill_count,
            max_kill_timeout=cfg.max_kill_timeout,
            shell_kill_signal=int(signal.SIGUSR1) if via_imp else cfg.kill_signal,
        )


def policy_stats(policy: KillPolicy) -> dict[str, object]:
    """The effective configuration, as ``flux module stats job-exec`` shows it."""
    return {
        "kill-timeout": policy.kill_timeout,
        "kill-shell-delay": policy.kill_shell_delay,
        "term-signal": signal_name(policy.term_signal),
        "kill-signal": signal_name(policy.kill_signal),
        "shell-kill-signal": signal_name(policy.shell_kill_signal),
        "max-term-count": policy.max_term_count,
        "max-kill-count": policy.max_kill_count,
        "max-kill-timeout": policy.max_kill_timeout,
    }


class Termination:
    """Pure state machine for one job; the launcher runs it with ``clock.drive``."""

    def __init__(self, policy: KillPolicy, jobid: str, clock: Clock) -> None:
        self.policy = policy
        self.jobid = jobid
        self._clock = clock
        self.state: TermState = "idle"
        self.reason: TermReason | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        #: signals sent to the tasks (term and kill)
        self.kill_count = 0
        #: term sends among them (the first SIGALRM of a timeout included)
        self.term_count = 0
        self.kill_shell_count = 0
        #: the current interval: kill-timeout, then the shell backoff
        self.interval = policy.kill_timeout
        self._next_tick: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ("drained", "exited")

    def start(self, reason: TermReason) -> list[TermAction]:
        """Begin terminating; later calls (a 2nd cancel, a timeout during a cancel) are no-ops."""
        if self.state != "idle":
            log.debug("job %s: termination already %s, %s ignored", self.jobid, self.state, reason)
            return []
        now = self._clock.now()
        self.started_at = now
        self.reason = reason
        self.state = "signalling-tasks"
        signum = int(signal.SIGALRM) if reason == "timeout" else self.policy.term_signal
        self.term_count = 1
        self.kill_count = 1
        self._next_tick = now + self.policy.kill_timeout
        log.info("job %s: terminating (%s): %s to tasks", self.jobid, reason, signal_name(signum))
        return [SignalTasks(signum)]

    def on_exit(self) -> None:
        """The job is gone: no further signal, no drain."""
        if self.done:
            return
        self.state = "exited"
        self.ended_at = self._clock.now()
        self._next_tick = None

    def deadline(self) -> float | None:
        if self.started_at is None or self._next_tick is None or self.done:
            return None
        deadline = self._next_tick
        if self.state == "signalling-tasks":
            deadline = min(deadline, self._shell_at())
        if (limit := self._limit_at()) is not None:
            deadline = min(deadline, limit)
        return deadline

    def expire(self, now: float) -> list[TermAction]:
        """Called at (or after) the deadline; earlier calls are no-ops."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        # Compare absolute times computed exactly as deadline() does, so float rounding can
        # never make a step fire at its deadline yet refuse to act.
        if (limit := self._limit_at()) is not None and now >= limit:
            return self._drain(now)
        if self.state == "signalling-tasks":
            if now >= self._shell_at():
                self.state = "killing-shell"
                log.info("job %s: kill-shell-delay elapsed, signalling the shell", self.jobid)
            else:
                return self._signal_tasks(now)
        if self.kill_shell_count >= self.policy.max_kill_count:
            return self._drain(now)
        return self._signal_shell(now)

    def stats(self, now: float | None = None) -> dict[str, object]:
        """Per-job progress, like ``flux module stats job-exec``; frozen once the job is over."""
        if now is None:
            now = self._clock.now()
        if self.ended_at is not None:
            now = min(now, self.ended_at)
        remaining: float | None = None
        if self.started_at is not None:
            if self.kill_shell_count > 0 or self.state == "killing-shell":
                remaining = 0.0
            else:
                remaining = max(0.0, self._shell_at() - now)
        return {
            "kill_timeout": self.interval,
            "kill_count": self.kill_count,
            "kill_shell_count": self.kill_shell_count,
            "term_count": self.term_count,
            "exception_in_progress": self.started_at is not None and not self.done,
            "kill_shell_delay_remaining": remaining,
            "started_at": self.started_at,
            "reason": self.reason,
            "state": self.state,
        }

    def _shell_at(self) -> float:
        assert self.started_at is not None
        return self.started_at + self.policy.kill_shell_delay

    def _limit_at(self) -> float | None:
        if self.policy.max_kill_timeout is None:
            return None
        assert self.started_at is not None
        return self.started_at + self.policy.max_kill_timeout

    def _signal_tasks(self, now: float) -> list[TermAction]:
        if self.term_count < self.policy.max_term_count:
            signum = self.policy.term_signal
            self.term_count += 1
        else:
            signum = self.policy.kill_signal
        self.kill_count += 1
        self._next_tick = now + self.policy.kill_timeout
        log.debug("job %s: %s to tasks", self.jobid, signal_name(signum))
        return [SignalTasks(signum)]

    def _signal_shell(self, now: float) -> list[TermAction]:
        cap = self.policy.backoff_cap
        if self.kill_shell_count == 0:
            self.interval = min(self.policy.kill_timeout, cap)
        else:
            self.interval = min(self.interval * 2, cap)
        self.kill_shell_count += 1
        self._next_tick = now + self.interval
        signum = self.policy.shell_kill_signal
        log.debug(
            "job %s: %s to shell (attempt %d, next in %ss)",
            self.jobid,
            signal_name(signum),
            self.kill_shell_count,
            format_seconds(self.interval),
        )
        return [SignalShell(signum)]

    def _drain(self, now: float) -> list[TermAction]:
        assert self.started_at is not None
        waited = format_seconds(now - self.started_at)
        reason = (
            f"unkillable user processes for job {self.jobid} "
            f"(waited {waited}s, {self.kill_shell_count} kill attempts)"
        )
        self.state = "drained"
        self.ended_at = now
        self._next_tick = None
        log.warning("job %s: %s", self.jobid, reason)
        return [Drain(reason)]
