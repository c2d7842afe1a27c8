"""The sdexec launcher: one transient systemd unit per job shell, as an asyncio library.

A :class:`Launcher` owns one bus connection and tracks every unit it started; :meth:`start`
returns a :class:`Job` that reads like ``asyncio.subprocess.Process`` (``pid``, ``wait()``,
``send_signal()``, ``returncode``, ``stdin``/``stdout``/``stderr`` streams) and adds what a
job-exec service needs: ``cancel()`` (the termination sequence), the stop timer, and drain
callbacks when processes will not die.

Ordering matters and follows the peer lessons: the unit's match rule and the JobRemoved
handler exist before ``StartTransientUnit``; the start job's result is awaited with a bound;
a failed start is reset so nothing piles up; the unit's properties are read back once
started, both to catch up and to refuse a limit systemd did not apply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as _signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from dbus_fast import Variant

from . import unitstate as us
from .bus import BusCallError, Manager
from .channel import DEVNULL, PIPE, Channels
from .clock import Clock, MonotonicClock, drive
from .config import ExecConfig
from .errors import CommandNotExecutable, LaunchError, RefusedError
from .start import (
    UnitPlan,
    check_environment,
    properties,
    resolve_program,
    stop_timeout_usec,
    verify_applied,
)
from .stoptimer import Abandon, KillUnit, StopTimer, StopTimerPolicy
from .termination import Drain, KillPolicy, SignalShell, SignalTasks, Termination
from .unitname import object_path, unit_name

log = logging.getLogger(__name__)

__all__ = ["DEVNULL", "PIPE", "Job", "JobSpec", "Launcher"]

DrainCallback = Callable[["Job", str], Awaitable[None]]
"""(job, reason): the node must be drained because of this job."""


@dataclass
class JobSpec:
    """What to run. ``argv[0]`` is resolved on ``PATH`` of ``env`` (as a shell would)."""

    jobid: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # None: this process's environment
    cwd: str | None = None
    rank: int = 0
    stdin: int = DEVNULL  # PIPE, DEVNULL, or an fd of ours to hand to the unit
    stdout: int = PIPE
    stderr: int = PIPE
    guest_user: str | None = None  # run through the IMP as this user
    shell: Sequence[str] = ()  # job-shell argv prefix, e.g. ("/usr/libexec/flux/flux-shell",)
    keep_failed_unit: bool = False
    description: str | None = None


@dataclass
class Job:
    """A started job: the familiar Process surface plus termination and stop-timer state."""

    jobid: str
    unit: str
    launcher: Launcher = field(repr=False)
    via_imp: bool = False
    pid: int | None = None
    wait_status: int | None = None
    error: str | None = None
    result: str | None = None
    memory_note: str | None = None
    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None
    termination: Termination | None = None
    stop_timer: StopTimer | None = None
    state: us.UnitState = field(init=False, repr=False)
    keep_failed_unit: bool = False
    _stop_requested: bool = False
    _gone: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _channels: Channels | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    _stop_wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _term_wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.state = us.UnitState(self.unit)

    @property
    def path(self) -> str:
        return object_path(self.unit)

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
        """Wait until the unit is gone (and stdio reached EOF, within a bound); the returncode.

        None when no status could be had (the unit was abandoned, or never ran): ``error`` says why.
        """
        await self._gone.wait()
        return self.returncode

    async def wait_finished(self) -> int | None:
        """Wait for the main process's exit only (leftovers may still be in the unit)."""
        await asyncio.wait(
            [asyncio.ensure_future(self._finished.wait()), asyncio.ensure_future(self._gone.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal every process of the job (fire and forget, like Process.send_signal)."""
        self._spawn(self.kill_unit(signum, "all"))

    def terminate(self) -> None:
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)

    async def kill_unit(self, signum: int, who: Literal["all", "main"] = "all") -> None:
        """``KillUnit``; a refusal (EPERM, Flux #6377) is logged and kept as the job's error."""
        if not self.running:
            return
        try:
            await self.launcher.manager.call("KillUnit", "ssi", [self.unit, who, int(signum)])
        except BusCallError as e:
            if "NoSuchUnit" in e.name or "no main process" in e.text.lower() or not self.running:
                log.debug("%s: KillUnit(%s, %d): %s", self.unit, who, signum, e)
                return
            log.error("%s: could not signal processes: %s", self.unit, e)
            self.error = self.error or f"could not signal the job's processes: {e.text}"

    def cancel(self, reason: Literal["cancel", "timeout"] = "cancel") -> None:
        """Start the termination sequence (kill-timeout, kill-shell-delay, ...); idempotent."""
        if self.termination is None or not self.running:
            return
        actions = self.termination.start(reason)
        if actions:
            self._spawn(self._term_actions(actions))
        self._term_wake.set()
        if not any(t.get_name() == "term-driver" for t in self._tasks):
            self._spawn(
                drive(self.termination, self.launcher.clock, self._term_actions, self._term_wake),
                name="term-driver",
            )

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": self.unit,
            "pid": self.pid,
            "started": self.pid is not None,
            "running": self.running,
            "multiuser": self.via_imp,
            "exception_in_progress": False,
        }
        if self.termination is not None:
            now = self.launcher.clock.now()
            out.update(self.termination.stats(now))
        return out

    # --- internals ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any], name: str | None = None) -> None:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: internal task failed: %r", self.unit, task.exception())

    async def _term_actions(self, actions: list[Any]) -> None:
        for act in actions:
            if isinstance(act, SignalTasks):
                log.info("%s: sending %s to the job's processes", self.unit, _signame(act.signal))
                await self.kill_unit(act.signal, "all")
            elif isinstance(act, SignalShell):
                log.info("%s: sending %s to the job shell", self.unit, _signame(act.signal))
                await self.kill_unit(act.signal, "main")
            elif isinstance(act, Drain):
                await self._abandon(act.reason)
        self.launcher._publish(self)

    async def _stop_actions(self, actions: list[Any]) -> None:
        for act in actions:
            if isinstance(act, KillUnit):
                who: Literal["all", "main"] = "main" if self.via_imp else "all"
                log.warning(
                    "%s: still deactivating after %ss; sending %s",
                    self.unit, self.stop_timer.policy.timeout if self.stop_timer else "?",
                    _signame(act.signal),
                )
                await self.kill_unit(act.signal, who)
            elif isinstance(act, Abandon):
                await self._abandon(act.reason)

    async def _abandon(self, reason: str) -> None:
        """Give up on the unit: stop tracking it, end the job with an error, drain the node."""
        if not self.running:
            return
        log.error("%s: job %s: %s", self.unit, self.jobid, reason)
        self.error = reason
        self.result = "abandoned"
        await self.launcher._drain(self, f"{reason} (job {self.jobid}, unit {self.unit})")
        await self.launcher._forget(self)
        self._finish_gone()

    def _on_props(self, _path: str, changed: dict[str, Any]) -> None:
        for event in self.state.update(changed):
            self._on_event(event)
        if (
            self.state.phase is us.Phase.FINISHED
            and not self._stop_requested
            and self.state.active_state == "active"
            and self.state.props.get("SubState") == "exited"
        ):
            # RemainAfterExit kept the unit for us to read the status: stop it now so
            # leftovers are killed (and the stop timer runs if they resist). A failed unit
            # is not stopped (that would erase its Result) but reset once gone.
            self._stop_requested = True
            self._spawn(self.launcher._stop(self))
        if self.stop_timer is not None and self.state.active_state:
            before = self.stop_timer.deadline()
            self.stop_timer.on_unit_state(self.state.active_state)
            if self.stop_timer.deadline() != before:
                self._stop_wake.set()

    def _on_event(self, event: us.Event) -> None:
        if isinstance(event, us.Started):
            self.pid = event.pid
            log.debug("%s: started, pid %d", self.unit, event.pid)
            self.launcher._publish(self)
        elif isinstance(event, us.Finished):
            self.wait_status = event.wait_status
            self.result = str(self.state.props.get("Result", "")) or None
            log.debug("%s: %s", self.unit, us.describe_status(event.wait_status))
            self._note_memory()
            self._finished.set()
            if self.termination is not None:
                self.termination.on_exit()
                self._term_wake.set()
        elif isinstance(event, us.Deactivating):
            log.debug("%s: deactivating", self.unit)
            if self.stop_timer is not None and not any(
                t.get_name() == "stop-driver" for t in self._tasks
            ):
                self._spawn(
                    drive(self.stop_timer, self.launcher.clock, self._stop_actions, self._stop_wake),
                    name="stop-driver",
                )
        elif isinstance(event, us.Gone):
            self.result = self.result or event.result or None
            if self.wait_status is None and self.error is None:
                self.error = f"the unit ended without an exit status (Result={event.result})"
            self._spawn(self._cleanup(event.failed))

    def _note_memory(self) -> None:
        ws = self.wait_status
        if ws is None:
            return
        result = str(self.state.props.get("Result", ""))
        limit = self.launcher.memory_limit_text()
        if result == "oom-kill":
            self.memory_note = f"killed by the OOM killer under its memory limit ({limit or 'MemoryMax'})"
        elif limit and os.WIFSIGNALED(ws) and os.WTERMSIG(ws) == _signal.SIGKILL:
            self.memory_note = (
                f"killed by SIGKILL under a memory limit ({limit}): most likely the limit "
                "(cgroup v1 does not report OOM kills as such)"
            )

    async def _cleanup(self, failed: bool) -> None:
        if failed and not self.keep_failed_unit:
            await self.launcher._reset_failed(self.unit)
        await self.launcher._forget(self)
        await self._drain_stdio()
        self._finish_gone()

    async def _drain_stdio(self) -> None:
        """Let the relays read to EOF, but only for a while: leftovers may hold the fds open."""
        timeout = self.launcher.config.sdexec.stdio_eof_timeout
        waiters = [r for r in (self.stdout, self.stderr) if r is not None]
        if not waiters:
            return
        async def eof(r: asyncio.StreamReader) -> None:
            while not r.at_eof():
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(asyncio.gather(*(eof(r) for r in waiters)), timeout)
        except TimeoutError:
            log.warning("%s: stdio still open %ss after the unit ended; closing", self.unit, timeout)
            for r in waiters:
                r.feed_eof()

    def _finish_gone(self) -> None:
        if self._gone.is_set():
            return
        self._finished.set()
        self._gone.set()
        for t in list(self._tasks):
            if t.get_name() in ("stop-driver", "term-driver") and t is not asyncio.current_task():
                t.cancel()
        self.launcher._publish(self)


def _signame(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return str(signum)


class Launcher:
    """One connection to a systemd manager, and every job started through it."""

    def __init__(
        self,
        config: ExecConfig | None = None,
        *,
        user: bool = False,
        clock: Clock | None = None,
        on_drain: DrainCallback | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> None:
        self.config = config or ExecConfig()
        self.manager = Manager(user=user)
        self.clock: Clock = clock or MonotonicClock()
        self.jobs: dict[str, Job] = {}  # by object path
        self.on_drain = on_drain
        self.on_update = on_update
        self._job_waiters: dict[str, asyncio.Future[str]] = {}
        self._exec_start_ex = True

    async def __aenter__(self) -> Launcher:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self.manager.connect()
        self.manager.on_job_removed(self._on_job_removed)
        self.manager.on_reconnect(self.resync)

    async def close(self) -> None:
        await self.manager.close()

    # --- starting ---------------------------------------------------------------------------

    def plan(self, spec: JobSpec, fds: tuple[int, int, int] | None) -> UnitPlan:
        """The unit to start for ``spec``: validated and resolved, before anything starts."""
        cfg = self.config
        env = dict(os.environ if spec.env is None else spec.env)
        check_environment(env)
        cwd = spec.cwd or os.getcwd()
        via_imp = spec.guest_user is not None
        argv = [*spec.shell, *spec.argv]
        if not spec.argv:
            raise LaunchError("the command is empty (usage: sdexec run [OPTIONS] -- CMD [ARG...])")
        if via_imp:
            if not cfg.imp:
                raise RefusedError(
                    f"job {spec.jobid}: guest jobs need exec.imp (the privilege helper) to be set"
                )
            argv = [cfg.imp, "exec", *argv]
        argv[0] = resolve_program(argv[0], env, cwd)
        extra = tuple((p.name, p.signature, p.value) for p in cfg.unit_properties)
        return UnitPlan(
            name=unit_name(spec.jobid, spec.rank, guest=via_imp),
            argv=tuple(argv),
            env=env,
            cwd=cwd,
            type="notify" if via_imp else "exec",
            kill_mode="process" if via_imp else "control-group",
            timeout_stop_usec=stop_timeout_usec(cfg.sdexec_stop_timer_sec, via_imp=via_imp),
            description=spec.description or f"User workload (job {spec.jobid})",
            slice=cfg.sdexec.slice,
            extra=extra,
            fds=fds,
            expand_env=not self._exec_start_ex,
        )

    async def start(self, spec: JobSpec) -> Job:
        plan = self.plan(spec, (0, 1, 2))  # validates before any fd or unit exists
        via_imp = spec.guest_user is not None
        if via_imp:
            plan = replace(plan, env={**plan.env, "SDEXEC_IMP_USER": str(spec.guest_user)})
        job = Job(
            jobid=spec.jobid,
            unit=plan.name,
            launcher=self,
            via_imp=via_imp,
            keep_failed_unit=spec.keep_failed_unit,
        )
        job.termination = Termination(
            KillPolicy.from_config(self.config, via_imp=via_imp), spec.jobid, self.clock
        )
        job.stop_timer = StopTimer(
            StopTimerPolicy.from_config(self.config, via_imp=via_imp), self.clock
        )
        path = job.path
        if path in self.jobs:
            raise RefusedError(f"job {spec.jobid}: unit {plan.name} is already running here")
        channels = Channels.create(spec.stdin, spec.stdout, spec.stderr)
        job._channels = channels
        loop = asyncio.get_running_loop()
        removed: asyncio.Future[str] = loop.create_future()
        self._job_waiters[plan.name] = removed
        self.jobs[path] = job
        started = False
        try:
            await self.manager.watch_unit(path, job._on_props)
            await self._start_unit(plan, channels, job)
            started = True
            channels.close_remote()
            timeout = self.config.sdexec.start_timeout
            try:
                result = await asyncio.wait_for(asyncio.shield(removed), timeout)
            except TimeoutError:
                raise LaunchError(
                    f"job {spec.jobid}: systemd did not start {plan.name} within {timeout:g}s"
                ) from None
            props = await self.manager.get_all(path)
            job._on_props(path, props)
            if result != "done":
                # A program that exits at once can fail the start job of a Type=exec
                # unit: that is a run, not a failure to start, unless systemd says exec failed.
                self._check_start_failure(job, result, job.state.props)
            job.stdin, job.stdout, job.stderr = await channels.open_streams()
            problems = verify_applied(plan.extra, props)
            if problems:
                raise LaunchError(f"job {spec.jobid}: {'; '.join(problems)}")
        except BaseException:
            self._job_waiters.pop(plan.name, None)
            channels.close()
            if started:
                await self._stop(job)
                await self._reset_failed(plan.name)
            await self._forget(job)
            raise
        self._job_waiters.pop(plan.name, None)
        self._publish(job)
        return job

    async def _start_unit(self, plan: UnitPlan, channels: Channels, job: Job) -> None:
        for attempt in range(3):
            props = [[k, Variant(sig, v)] for k, (sig, v) in properties(plan)]
            try:
                await self.manager.call(
                    "StartTransientUnit",
                    "ssa(sv)a(sa(sv))",
                    [plan.name, "fail", props, []],
                    unix_fds=channels.remote,
                )
                return
            except BusCallError as e:
                if "UnitExists" in e.name and attempt == 0:
                    # a failed unit of an earlier run with this id: reset once, then retry
                    log.info("%s exists; resetting it and retrying once", plan.name)
                    await self._reset_failed(plan.name)
                    continue
                if "UnitExists" in e.name:
                    raise RefusedError(
                        f"job {job.jobid}: unit {plan.name} already exists and is not failed: "
                        "is the job already running? (never running a job outside its own unit)"
                    ) from None
                if self._exec_start_ex and "ExecStartEx" in e.text:
                    log.info("this systemd has no ExecStartEx; escaping $ in ExecStart instead")
                    self._exec_start_ex = False
                    plan = replace(plan, expand_env=True)
                    continue
                raise
        raise LaunchError(f"job {job.jobid}: could not start {plan.name}")

    @staticmethod
    def _check_start_failure(job: Job, result: str, props: Mapping[str, Any]) -> None:
        code = int(props.get("ExecMainCode", 0) or 0)
        status = int(props.get("ExecMainStatus", 0) or 0)
        if code == us.CLD_EXITED and status in us.EXEC_FAILURES:
            raise CommandNotExecutable(
                f"job {job.jobid}: could not be started: {us.EXEC_FAILURES[status]} "
                f"(systemd status {status}, start job {result})"
            )
        if code not in (us.CLD_EXITED, us.CLD_KILLED, us.CLD_DUMPED):
            raise LaunchError(
                f"job {job.jobid}: could not be started: start job {result}"
                f" (Result={props.get('Result', '?')})"
            )

    def _on_job_removed(self, _job: str, unit: str, result: str) -> None:
        fut = self._job_waiters.get(unit)
        if fut is not None and not fut.done():
            fut.set_result(result)

    # --- teardown ---------------------------------------------------------------------------

    async def _stop(self, job: Job) -> None:
        try:
            await self.manager.call("StopUnit", "ss", [job.unit, "fail"])
        except BusCallError as e:
            if "NoSuchUnit" not in e.name:
                log.warning("%s: StopUnit: %s", job.unit, e)

    async def _reset_failed(self, unit: str) -> None:
        try:
            await self.manager.call("ResetFailedUnit", "s", [unit])
        except BusCallError as e:
            if "NoSuchUnit" not in e.name:
                log.warning("%s: ResetFailedUnit: %s", unit, e)

    async def _forget(self, job: Job) -> None:
        if self.jobs.get(job.path) is job:
            del self.jobs[job.path]
            await self.manager.unwatch_unit(job.path)
        if job._channels is not None:
            job._channels.close_remote()

    async def _drain(self, job: Job, reason: str) -> None:
        if self.on_drain is not None:
            try:
                await self.on_drain(job, reason)
            except Exception:
                log.exception("draining the node failed")
        else:
            log.error("drain (no drain handler configured): %s", reason)

    def _publish(self, job: Job) -> None:
        if self.on_update is not None:
            try:
                self.on_update(job)
            except Exception:
                log.exception("job update hook failed")

    async def resync(self) -> None:
        """Re-read every tracked unit: signals were lost while the bus or systemd was away."""
        for path, job in list(self.jobs.items()):
            try:
                props = await self.manager.get_all(path)
            except LaunchError as e:
                log.warning("%s: cannot re-read after reconnect: %s", job.unit, e)
                continue
            log.info("%s: re-read after reconnect (%s)", job.unit, props.get("ActiveState"))
            job._on_props(path, props)

    def memory_limit_text(self) -> str | None:
        limits = [
            f"{p.name}={self.config.sdexec_properties.get(p.name.removesuffix('Scale'), p.value)}"
            for p in self.config.unit_properties
            if p.name.startswith("MemoryMax")
        ]
        return ", ".join(limits) or None
