"""The job handle every implementation shares: asyncio's Process surface plus termination.

``sdexec`` (a systemd unit) and ``rexec`` (a plain process group) differ only in how a signal
reaches the job, how the node is drained and what "the job is gone" means; the termination
sequence, the stop timer, the stdio EOF bound and the Process-like API are the same, and live
here once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as _signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from sdexec.config.signals import signal_name
from sdexec.errors import SdexecError
from sdexec.exec.accounting import Accounting
from sdexec.exec.aio import first_completed
from sdexec.exec.channel import Channels, EofReader
from sdexec.exec.clock import Clock, drive
from sdexec.exec.stoptimer import Abandon, KillUnit, StopTimer, StopTimerPolicy
from sdexec.exec.termination import Drain, KillPolicy, SignalShell, SignalTasks, Termination
from sdexec.systemd.unitstate import ActiveState

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig

log = logging.getLogger(__name__)

Who = Literal["all", "main"]
UpdateHook = Callable[["BaseJob"], None]
DrainHook = Callable[["BaseJob", str], Awaitable[None]]


class BaseJob(ABC):
    """A started job. Subclasses say how to signal it and how it is forgotten."""

    service = "?"

    def __init__(
        self,
        jobid: str,
        name: str,
        *,
        clock: Clock,
        eof_timeout: float,
        on_drain: DrainHook | None = None,
        on_update: UpdateHook | None = None,
    ) -> None:
        self.jobid = jobid
        self.name = name
        self.clock = clock
        self.eof_timeout = eof_timeout
        self.on_drain = on_drain
        self.on_update = on_update
        self.pid: int | None = None
        self.wait_status: int | None = None
        self.error: str | None = None
        self.result: str | None = None
        self.memory_note: str | None = None
        # what the shell used (accounting.py); only the wall time unless accounting was asked
        self.accounting = Accounting()
        self.started_at: float | None = None  # our clock, at the start and the exit events
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: EofReader | None = None
        self.stderr: EofReader | None = None
        self._channels: Channels | None = None  # the stdio made for this job, if any
        self.termination: Termination | None = None
        self.stop_timer: StopTimer | None = None
        self._gone = asyncio.Event()
        self._finished = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop_wake = asyncio.Event()
        self._term_wake = asyncio.Event()

    # --- the Process surface ---------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """asyncio's convention: exit code, or -N when killed by signal N; None while running."""
        if self.wait_status is None:
            return None
        return os.waitstatus_to_exitcode(self.wait_status)

    @property
    def exit_code(self) -> int | None:
        """The shell's convention (what ``sdexec run`` exits with): 128+N for signal N."""
        rc = self.returncode
        if rc is None:
            return None
        return rc if rc >= 0 else 128 - rc

    @property
    def running(self) -> bool:
        return not self._gone.is_set()

    async def wait(self) -> int | None:
        """Wait until the job is gone (and stdio reached EOF, within a bound); the returncode.

        None when no status could be had (abandoned, or never ran): ``error`` says why.
        """
        await self._gone.wait()
        return self.returncode

    async def wait_finished(self) -> int | None:
        """Wait for the main process's exit only (leftovers may still run)."""
        await first_completed(self._finished.wait(), self._gone.wait())
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal every process of the job (fire and forget, like Process.send_signal)."""
        self.spawn(self.signal(signum, "all"))

    def terminate(self) -> None:
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)

    @abstractmethod
    async def signal(self, signum: int, who: Who = "all") -> None:
        """Deliver ``signum`` to all the job's processes or to its main process (the shell)."""

    @abstractmethod
    async def forget(self) -> None:
        """Stop tracking the job's processes (on exit or when abandoning)."""

    def cancel(self, reason: Literal["cancel", "timeout"] = "cancel") -> None:
        """Start the termination sequence (kill-timeout, kill-shell-delay, ...); idempotent."""
        if self.termination is None or not self.running:
            return
        actions = self.termination.start(reason)
        if actions:
            self.spawn(self._term_actions(actions))
        self._term_wake.set()
        self._start_driver("term-driver", self.termination, self._term_actions, self._term_wake)
        self.publish()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.name,
            "service": self.service,
            "pid": self.pid,
            "started": self.pid is not None,
            "running": self.running,
            "exception_in_progress": False,
            "result": self.result,
            "accounting": self.accounting.as_dict(),
        }
        if self.termination is not None:
            out.update(self.termination.stats(self.clock.now()))
        return out

    # --- for subclasses ---------------------------------------------------------------------

    def apply_kill_policy(self, cfg: ExecConfig, *, via_imp: bool) -> None:
        """The termination sequence and the stop timer from the ``[exec]`` table, both on this
        job's clock: every implementation (sdexec, rexec) kills the same way."""
        self.termination = Termination(
            KillPolicy.from_config(cfg, via_imp=via_imp), self.jobid, self.clock
        )
        self.stop_timer = StopTimer(StopTimerPolicy.from_config(cfg, via_imp=via_imp), self.clock)

    def spawn(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: internal task failed: %r", self.name, task.exception())

    def _start_driver(self, name: str, machine: Any, on_actions: Any, wake: asyncio.Event) -> None:
        if not any(t.get_name() == name for t in self._tasks):
            self.spawn(drive(machine, self.clock, on_actions, wake), name=name)

    def publish(self) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self)
            except SdexecError as e:  # e.g. a full disk under the state db: say it, go on
                log.error("%s: recording the job's state failed: %s", self.name, e)
            except Exception:
                log.exception("job update hook failed")

    def note_started(self) -> None:
        if self.started_at is None:
            self.started_at = self.clock.now()

    def set_finished(self, wait_status: int) -> None:
        self.wait_status = wait_status
        if self.started_at is not None:
            self.accounting.note_wall_time(self.clock.now() - self.started_at)
        self._finished.set()
        if self.termination is not None:
            self.termination.on_exit()
            self._term_wake.set()
        self.publish()

    def on_lingering(self, state: str) -> None:
        """Feed the stop timer ("deactivating": processes outlived the main one; "inactive")."""
        if self.stop_timer is None:
            return
        before = self.stop_timer.deadline()
        self.stop_timer.on_unit_state(state)
        if self.stop_timer.deadline() != before:
            self._stop_wake.set()
        if state == ActiveState.DEACTIVATING:
            self._start_driver("stop-driver", self.stop_timer, self._stop_actions, self._stop_wake)

    async def _term_actions(self, actions: list[Any]) -> None:
        for act in actions:
            if isinstance(act, SignalTasks):
                log.info(
                    "%s: sending %s to the job's processes", self.name, signal_name(act.signal)
                )
                await self.signal(act.signal, "all")
            elif isinstance(act, SignalShell):
                log.info("%s: sending %s to the job shell", self.name, signal_name(act.signal))
                await self.signal(act.signal, "main")
            elif isinstance(act, Drain):
                await self.abandon(act.reason)
        self.publish()

    def stop_signal_target(self) -> Who:
        return "all"

    async def _stop_actions(self, actions: list[Any]) -> None:
        for act in actions:
            if isinstance(act, KillUnit):
                log.warning(
                    "%s: processes still there after the stop timer; sending %s",
                    self.name,
                    signal_name(act.signal),
                )
                await self.signal(act.signal, self.stop_signal_target())
            elif isinstance(act, Abandon):
                await self.abandon(act.reason)

    async def abandon(self, reason: str) -> None:
        """Give up: stop tracking, end the job with an error, drain the node."""
        if not self.running:
            return
        log.error("%s: job %s: %s", self.name, self.jobid, reason)
        self.error = reason
        self.result = "abandoned"
        if self.on_drain is not None:
            try:
                named = f"job {self.jobid}, " if f"job {self.jobid}" not in reason else ""
                await self.on_drain(self, f"{reason} ({named}unit {self.name})")
            except Exception:
                log.exception("draining the node failed")
        else:
            log.error("no drain handler: the node should be drained: %s", reason)
        await self.forget()
        self.close_stdio()  # the processes we gave up on may hold them open forever
        self.finish_gone()

    async def drain_stdio(self) -> None:
        """Let the relays read to EOF, for a while only: leftovers may hold them (Flux #6656)."""
        readers = [r for r in (self.stdout, self.stderr) if r is not None]
        if not readers:
            return

        try:
            # EOF from the far end, whether or not anyone consumed the data (at_eof() would
            # wait for a reader that may never come)
            await asyncio.wait_for(
                asyncio.gather(*(r.eof.wait() for r in readers)), self.eof_timeout
            )
        except TimeoutError:
            log.warning(
                "%s: stdio still open %gs after the job ended (leftover processes?); closing",
                self.name,
                self.eof_timeout,
            )
        # Our ends are closed either way (a finished job holds no fd); what was received
        # stays readable.
        self.close_stdio()

    def close_stdio(self) -> None:
        """Close our ends: readers then see EOF after what was already received."""
        for r in (self.stdout, self.stderr):
            if r is not None:
                r.close()
        if self._channels is not None:  # stdin's socket too
            self._channels.close()

    def finish_gone(self) -> None:
        if self._gone.is_set():
            return
        self._finished.set()
        self._gone.set()
        if self.termination is not None:
            self.termination.on_exit()
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t.get_name() in ("stop-driver", "term-driver") and t is not current:
                t.cancel()
        self.publish()
