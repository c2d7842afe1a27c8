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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sdexec.config.duration import format_seconds
from sdexec.config.properties import UnitProperty, collect_properties, combine_errors
from sdexec.config.table import ExecConfig
from sdexec.errors import CommandNotExecutable, LaunchError, RefusedError, SdexecError, UsageError
from sdexec.exec.accounting import ENV_VAR as ACCOUNTING_VAR
from sdexec.exec.accounting import SIGNALLED as ACCOUNTING_SIGNALLED
from sdexec.exec.accounting import STATUS_PREFIX as ACCOUNTING_STATUS
from sdexec.exec.accounting import SYSTEMD_PROPERTIES as ACCOUNTING_PROPERTIES
from sdexec.exec.binding import Binding, Topology, bound_properties
from sdexec.exec.channel import DEVNULL, PIPE, Channels
from sdexec.exec.clock import Clock, MonotonicClock
from sdexec.exec.command import (
    BUILTIN_SHELL,
    DEFAULT_PATH,
    IMP_CWD_VAR,
    IMP_ENV_VAR,
    IMP_USER_VAR,
    check_command,
    check_environment,
    encode_environment,
    guest_exec_prefix,
    guest_passwd,
    resolve_program,
)
from sdexec.exec.job import BaseJob, DrainHook, UpdateHook, Who
from sdexec.systemd import unitstate as us
from sdexec.systemd.bus import (
    RETRY_FOR,
    SERVICE_IFACE,
    SLICE_IFACE,
    TRANSIENT_ERRORS,
    BusCallError,
    Manager,
)
from sdexec.systemd.cgroup import cgroup_pids, kill_cgroup, unit_cgroup_dir
from sdexec.systemd.enforce import CHECKS, base_name, check_cgroup, unenforceable
from sdexec.systemd.gate import Gate
from sdexec.systemd.start import (
    UnitPlan,
    refuse_unmarshallable,
    start_transient_unit,
    stop_timeout_usec,
    verify_applied,
)
from sdexec.systemd.stop import is_gone, kill_unit, reset_failed, stop_unit
from sdexec.systemd.unitname import object_path, unit_name

log = logging.getLogger(__name__)

__all__ = ["DEVNULL", "PIPE", "Job", "JobSpec", "Launcher"]

COLLECT_WAITS = 50
"""Tenths of a second to wait for systemd to collect the dead unit of a dropped start."""
START_ATTEMPTS = 3
"""Starts of one unit when systemd lost the earlier ones (re-exec, bus restart)."""
WATCHED_PROPERTIES = us.STATE_PROPERTIES | ACCOUNTING_SIGNALLED
"""What a job's PropertiesChanged handler keeps: its state, and the figures systemd signals
(a unit that goes straight to inactive, the IMP's, is collected before any read)."""
START_PROPERTIES = us.STATE_PROPERTIES | {"Job"}
"""A starting unit's state, and whether its start job is still queued (``Job`` = (0, "/"))."""


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
    run_as: str | None = None  # run as this user (name or uid) with the unit's User=
    shell: Sequence[str] = ()  # job-shell argv prefix, e.g. ("/usr/libexec/flux/flux-shell",)
    keep_failed_unit: bool = False
    description: str | None = None
    binding: Binding = field(default_factory=Binding)  # cores/GPUs: bound limits (binding.py)
    memory_max: int | None = None  # bytes (a resource manager's allocation), capped by the site's
    # end-of-job figures (Job.stats()["accounting"]): CPU, memory peak, IO, tasks. On hosts
    # whose systemd cannot give them (cgroup v1, systemd < 254) our job shell measures them:
    # one more process in the unit (its Python start: 20 ms at best, ~40 ms on a loaded
    # node, bench/accounting_cost.py), so only when asked
    accounting: bool = False


def _start_pending(props: Mapping[str, Any]) -> bool:
    pending = props.get("Job")
    return isinstance(pending, (list, tuple)) and bool(pending) and bool(pending[0])


def _never_ran(props: Mapping[str, Any]) -> bool:
    """The unit has not run its program and is not failed: a start job systemd dropped."""
    return (
        props.get("ActiveState") == us.ActiveState.INACTIVE
        and not int(props.get("ExecMainPID", 0) or 0)
        and not int(props.get("ExecMainCode", 0) or 0)
    )


def job_properties(cfg: ExecConfig, binding: Binding) -> dict[str, str]:
    """A job's ``sdexec-properties`` (strings): the site's, bound to its cores/GPUs."""
    if not binding:
        return dict(cfg.sdexec_properties)
    return bound_properties(
        binding, cfg.sdexec_properties, Topology.read(), scale=cfg.sdexec.bind_scale_memory
    )


def bound_unit_properties(cfg: ExecConfig, binding: Binding) -> list[UnitProperty]:
    """The typed properties of a bound job; DevicePolicy is ours to set here."""
    table = job_properties(cfg, binding)
    props, errors = collect_properties(table, (*cfg.sdexec.allow_properties, "DevicePolicy"))
    if errors:
        raise combine_errors(errors)
    return props


class Job(BaseJob):
    """A job running as a transient unit: the unit's state drives the job's events."""

    service = "sdexec"

    def __init__(
        self,
        jobid: str,
        unit: str,
        launcher: Launcher,
        *,
        via_imp: bool,
        keep_failed_unit: bool,
        on_drain: DrainHook | None = None,
        on_update: UpdateHook | None = None,
    ) -> None:
        super().__init__(
            jobid,
            unit,
            clock=launcher.clock,
            eof_timeout=launcher.config.sdexec.stdio_eof_timeout,
            on_drain=on_drain or launcher.on_drain,
            on_update=on_update or launcher.on_update,
        )
        self.launcher = launcher
        self.via_imp = via_imp
        self.keep_failed_unit = keep_failed_unit
        self.state = us.UnitState(unit)
        self.path = object_path(unit)
        self._stop_requested = False
        self._gate: Gate | None = None
        self.cgroup: str | None = None
        self.want_accounting = False  # read the figures at the exit, before stop or reset
        self._accounting_read: asyncio.Future[Any] | None = None
        self._reported_status = ""  # the main process's last accounting STATUS= (signals)

    @property
    def unit(self) -> str:
        return self.name

    async def signal(self, signum: int, who: Who = "all") -> None:
        """``KillUnit``; a refusal (EPERM, Flux #6377) is logged and kept as the job's error."""
        if not self.running:
            return
        if self.via_imp:
            # A guest's processes are reached through the IMP only (as the reference, where
            # the instance owner cannot signal them): it forwards signals to the shell and
            # turns SIGUSR1 into SIGKILL of the whole unit; a SIGKILL would only kill it.
            who = "main"
            if signum == _signal.SIGKILL:
                log.info("%s: SIGKILL goes to the IMP as SIGUSR1", self.unit)
                signum = _signal.SIGUSR1
        try:
            await kill_unit(self.launcher.manager, self.unit, who, signum)
        except LaunchError as e:
            # systemd's refusal (BusCallError), or no bus in bounded time (bus.call's
            # deadline): either way the sequence goes on to its next step, and in the end to
            # the drain, rather than stalling on a dead bus
            if isinstance(e, BusCallError) and (is_gone(e) or not self.running):
                log.debug("%s: KillUnit(%s, %d): %s", self.unit, who, signum, e)
                return
            log.error("%s: could not signal processes: %s", self.unit, e)
            text = e.text if isinstance(e, BusCallError) else str(e)
            self.error = self.error or f"could not signal the job's processes: {text}"

    def stop_signal_target(self) -> Who:
        # Through the IMP the main process proxies SIGUSR1 to the whole unit.
        return "main" if self.via_imp else "all"

    async def forget(self) -> None:
        await self.launcher.forget(self)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["multiuser"] = self.via_imp
        return out

    def on_props(self, _path: str, changed: dict[str, Any]) -> None:
        if changed.get("ControlGroup"):  # emptied once the unit is inactive: keep the last
            self.cgroup = str(changed["ControlGroup"])
        status = changed.get("StatusText")
        if isinstance(status, str) and status.startswith(ACCOUNTING_STATUS):
            # systemd empties it when the unit dies (the IMP's goes straight to inactive):
            # the figures are the last status that had them
            self._reported_status = status
        for event in self.state.update(changed):
            self._on_event(event)
        if self.state.was_active:  # the "inactive" of a unit not yet started is no end
            self.on_lingering(self.state.active_state)
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
            self.spawn(self._stop())

    async def _stop(self) -> None:
        await self._accounted()
        if not await self.launcher.stop_unit(self.unit):
            self._stop_requested = False  # the next state re-read (resync) tries again

    def _on_event(self, event: us.Event) -> None:
        if isinstance(event, us.Started):
            self.pid = event.pid
            log.debug("%s: started, pid %d", self.unit, event.pid)
            self.note_started()
            self.publish()
        elif isinstance(event, us.Finished):
            self.result = str(self.state.props.get("Result", "")) or None
            log.debug("%s: %s", self.unit, us.describe_status(event.wait_status))
            self._note_memory(event.wait_status)
            if self.want_accounting and self._accounting_read is None:
                # before anything stops or resets the unit (on_props spawns the stop next)
                self._accounting_read = self.spawn(self._read_accounting())
            self.set_finished(event.wait_status)
        elif isinstance(event, us.Deactivating):
            log.debug("%s: deactivating", self.unit)
        elif isinstance(event, us.Gone):
            self.result = self.result or event.result or None
            self.spawn(self._cleanup(event.failed))

    async def _read_accounting(self) -> None:
        """The finished unit's figures: systemd's, and what its main process reported as
        its status (accounting.py), in one GetAll; a failure costs the figures, not the job."""
        # what the signals brought (the status, the timestamps): all there is of a unit
        # systemd collected at once (the IMP's goes straight to inactive)
        props = {k: v for k, v in self.state.props.items() if k in ACCOUNTING_SIGNALLED}
        try:
            props.update(
                await self.launcher.manager.get_all(
                    self.path, SERVICE_IFACE, keys=ACCOUNTING_PROPERTIES
                )
            )
        except LaunchError as e:  # BusCallError included
            log.debug("%s: reading the end-of-job figures: %s", self.unit, e)
        if self._reported_status and not str(props.get("StatusText") or ""):
            props["StatusText"] = self._reported_status
        self.accounting.update_from_unit(props)
        self.publish()

    async def _accounted(self) -> None:
        """Wait for the figures' read, if one is under way: the unit must still be there."""
        if self._accounting_read is not None:
            await asyncio.wait([self._accounting_read])

    def _note_memory(self, ws: int) -> None:
        result = str(self.state.props.get("Result", ""))
        limit = self.launcher.memory_limit_text()
        if result == "oom-kill":
            self.memory_note = (
                f"killed by the OOM killer under its memory limit ({limit or 'MemoryMax'})"
            )
        elif limit and os.WIFSIGNALED(ws) and os.WTERMSIG(ws) == _signal.SIGKILL:
            self.memory_note = (
                f"killed by SIGKILL under a memory limit ({limit}): most likely the limit "
                "(cgroup v1 does not report OOM kills as such)"
            )

    async def _cleanup(self, failed: bool) -> None:
        if self.wait_status is None:
            # "gone" came first; the exit status is in the Service interface's signal, which
            # may still be on its way: read it rather than lose it.
            try:
                self.on_props(self.path, await self.launcher.manager.get_all(
                    self.path, keys=us.STATE_PROPERTIES
                ))  # fmt: skip
            except LaunchError as e:
                log.debug("%s: reading the status: %s", self.unit, e)
            if self.wait_status is None and self.error is None:
                self.error = f"the unit ended without an exit status (Result={self.result})"
        await self._accounted()
        if not await self._reap_leftovers():
            return  # abandoned: the node is drained, the unit kept for post-mortem
        if failed and not self.keep_failed_unit:
            await self.launcher.reset_failed(self.unit)
        await self.forget()
        await self.drain_stdio()
        self.finish_gone()

    async def _reap_leftovers(self) -> bool:
        """An inactive unit is done only if its cgroup is empty (Flux #6501).

        With ``KillMode=process`` (guests), or an IMP that died, processes can outlive a unit
        systemd calls inactive. They get what the stop timer gives a deactivating unit:
        SIGKILL, and if they are still there after the stop timer again, abandon and drain.
        """
        directory = unit_cgroup_dir(self.cgroup) if self.cgroup else None
        if directory is None or not cgroup_pids(directory):
            return True
        timeout = self.launcher.config.sdexec_stop_timer_sec
        log.warning("%s: inactive but processes remain in %s: killing them", self.unit, self.cgroup)
        clock = self.clock
        deadline = clock.now() + 2 * timeout
        while cgroup_pids(directory):
            if clock.now() >= deadline:
                await self.abandon(
                    f"processes remain in the cgroup of inactive unit {self.unit} after "
                    f"SIGKILL and {format_seconds(2 * timeout)}s"
                )
                return False
            kill_cgroup(directory)
            await asyncio.sleep(0.1)
        return True


class Launcher:
    """One connection to a systemd manager, and every job started through it."""

    def __init__(
        self,
        config: ExecConfig | None = None,
        *,
        user: bool = False,
        clock: Clock | None = None,
        on_drain: DrainHook | None = None,
        on_update: UpdateHook | None = None,
    ) -> None:
        self.config = config or ExecConfig()
        self.manager = Manager(user=user)
        self.clock: Clock = clock or MonotonicClock()
        self.jobs: dict[str, Job] = {}  # by object path
        self.on_drain = on_drain
        self.on_update = on_update
        self._job_waiters: dict[str, asyncio.Future[str]] = {}
        self._created: set[str] = set()  # units whose StartTransientUnit went through
        self._start_jobs: dict[str, str] = {}  # unit -> its start job (while start() waits)
        self._stale_jobs: set[str] = set()  # start jobs of attempts given up: JobRemoved ignored
        self._exec_start_ex = True
        self._slice_cgroups: dict[str, str] = {}  # slice -> its ControlGroup (see start())

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
        """Disconnect from systemd. Jobs still running go on in their units (another
        launcher's :meth:`adopt` takes them over, their records say where); their Job objects
        end here, so nothing waits forever: ``wait()`` returns None, ``result`` is
        "detached" and ``error`` says why. Their records are left as they are."""
        for job in list(self.jobs.values()):
            if job.running:
                job.error = job.error or (
                    "the launcher was closed while the job ran: its unit goes on "
                    "(Launcher.adopt re-attaches)"
                )
                job.result = "detached"
                job.on_update = None  # the record must keep saying "running"
                job.close_stdio()
                job.finish_gone()
        self.jobs.clear()
        await self.manager.close()

    # --- starting ---------------------------------------------------------------------------

    def plan(self, spec: JobSpec, fds: tuple[int, int, int] | None) -> UnitPlan:
        """The unit to start for ``spec``: validated and resolved, before anything starts.

        A guest's command, environment and working directory are never looked at with our
        privileges: through the IMP they travel as data that the IMP applies after it became
        the guest (the unit itself gets a fixed environment and ``/``); with ``run_as`` systemd
        drops privileges before it enters the directory and runs the command, and the
        program is looked up on the guest's PATH by ``env``, as the guest.
        """
        cfg = self.config
        env = dict(os.environ if spec.env is None else spec.env)
        check_environment(env)
        cwd = spec.cwd or os.getcwd()
        check_command(spec.argv, cwd)
        if not spec.argv:
            raise LaunchError("the command is empty (usage: sdexec run [OPTIONS] -- CMD [ARG...])")
        via_imp = spec.guest_user is not None
        unit_env, unit_cwd, user = env, cwd, None
        # the job shell in front of the command (not through the IMP: it takes spec.shell)
        shell = spec.shell or (BUILTIN_SHELL if spec.accounting else ())
        if via_imp and spec.run_as is not None:
            raise UsageError(f"job {spec.jobid}: guest_user (IMP) and run_as exclude each other")
        if via_imp:
            if not cfg.imp:
                raise RefusedError(
                    f"job {spec.jobid}: guest jobs need exec.imp (the privilege helper) to be set"
                )
            argv = [cfg.imp, "exec", *spec.shell, *spec.argv]
            argv[0] = resolve_program(argv[0], {"PATH": DEFAULT_PATH}, "/")
            unit_env = {
                "PATH": DEFAULT_PATH,
                IMP_USER_VAR: str(spec.guest_user),
                IMP_ENV_VAR: encode_environment(env),
                IMP_CWD_VAR: cwd,
            }
            unit_cwd = "/"
        elif spec.run_as is not None:
            if os.geteuid() != 0 or self.manager.user:
                raise RefusedError(
                    f"job {spec.jobid}: running a job as another user with the unit's User= "
                    "needs a root launcher on the system manager ([sdexec] guest-credentials)"
                )
            pw = guest_passwd(spec.run_as)
            argv = [*(shell or guest_exec_prefix(spec.argv[0])), *spec.argv]
            argv[0] = resolve_program(argv[0], {"PATH": DEFAULT_PATH}, "/")  # ours, not theirs
            groups = [g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid]
            user = (pw.pw_uid, pw.pw_gid, tuple(groups))
        else:
            argv = [*shell, *spec.argv]
            argv[0] = resolve_program(argv[0], env, cwd)
        if spec.accounting and (via_imp or tuple(argv[: len(BUILTIN_SHELL)]) == BUILTIN_SHELL):
            # its main process measures (our shell; the IMP if it can): accounting.py
            unit_env = {**unit_env, ACCOUNTING_VAR: "1"}
        props = bound_unit_properties(cfg, spec.binding) if spec.binding else cfg.unit_properties
        extra = tuple((p.name, p.signature, p.value) for p in props)
        if spec.memory_max is not None:
            from sdexec.config.memory import cap_memory_max

            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            extra = cap_memory_max(extra, spec.memory_max, physical)
        self.refuse_unenforceable(spec.jobid, [name for name, _s, _v in extra])
        return UnitPlan(
            name=unit_name(spec.jobid, spec.rank, guest=via_imp),
            argv=tuple(argv),
            env=unit_env,
            cwd=unit_cwd,
            type="notify" if via_imp else "exec",
            kill_mode="process" if via_imp else "control-group",
            timeout_stop_usec=stop_timeout_usec(cfg.sdexec_stop_timer_sec, via_imp=via_imp),
            description=spec.description or f"User workload (job {spec.jobid})",
            slice=cfg.sdexec.slice,
            extra=extra,
            fds=fds,
            expand_env=not self._exec_start_ex,
            user=user,
            accounting=spec.accounting,
        )

    def refuse_unenforceable(self, jobid: str, names: Sequence[str]) -> None:
        """A limit this host's cgroups cannot enforce is refused before anything exists,
        unless the site accepts the downgrade (``[sdexec] allow-unenforced``)."""
        allowed = set(self.config.sdexec.allow_unenforced)
        bad = {k: v for k, v in unenforceable(names).items() if k not in allowed}
        if bad:
            name, why = next(iter(bad.items()))
            more = f" (and {', '.join(list(bad)[1:])})" if len(bad) > 1 else ""
            raise RefusedError(
                f"job {jobid}: {name}{more} cannot be enforced on this host: {why}; refused "
                f'before anything started ([sdexec] allow-unenforced = ["{name}"] accepts it)'
            )

    async def start(
        self,
        spec: JobSpec,
        *,
        on_drain: DrainHook | None = None,
        on_update: UpdateHook | None = None,
    ) -> Job:
        """Start one shell's unit; the hooks override the launcher's for this job."""
        plan = self.plan(spec, (0, 1, 2))  # validates before any fd or unit exists
        via_imp = spec.guest_user is not None
        checked = sorted({base_name(n) for n, _s, _v in plan.extra} & set(CHECKS))
        job = self._new_job(
            spec.jobid, plan.name, via_imp, spec.keep_failed_unit, on_drain, on_update
        )
        job.want_accounting = spec.accounting
        path = job.path
        if path in self.jobs:
            raise RefusedError(f"job {spec.jobid}: unit {plan.name} is already running here")
        channels = Channels.create(spec.stdin, spec.stdout, spec.stderr)
        job._channels = channels
        if checked and not via_imp and plan.user is None:
            # the program waits at the gate until its cgroup was read back (sdexec/systemd/gate.py);
            # a guest's unit (IMP, or User=) is checked once started: the gate is ours only
            job._gate = Gate()
            plan = replace(plan, argv=job._gate.wrap(plan.argv))
        loop = asyncio.get_running_loop()
        removed: asyncio.Future[str] = loop.create_future()
        self._job_waiters[plan.name] = removed
        self.jobs[path] = job
        started = False
        try:
            # Our stdio ends exist before the unit does: a job may be over (and its cleanup
            # waiting for EOF on them) before StartTransientUnit even returns.
            job.stdin, job.stdout, job.stderr = await channels.open_streams()
            await self.manager.watch_unit(path, job.on_props, WATCHED_PROPERTIES)
            timeout = self.config.sdexec.start_timeout
            for attempt in range(1, START_ATTEMPTS + 1):
                generation = self.manager.generation
                await self._start_unit(plan, channels, job, again=attempt > 1)
                started = True
                try:
                    result = await asyncio.wait_for(asyncio.shield(removed), timeout)
                except TimeoutError:
                    # An overloaded systemd may have started it all the same: then it is a
                    # run to follow, never a "not started" for a job that ran.
                    state = await self.manager.get_all(path, keys=START_PROPERTIES)
                    if state.get("LoadState") != "loaded" or (
                        _never_ran(state) or _start_pending(state)
                    ):
                        # still queued: the cleanup below cancels it (StopUnit "replace")
                        raise LaunchError(
                            f"job {spec.jobid}: systemd did not start {plan.name} within "
                            f"{timeout:g}s ([sdexec] start-timeout; systemd overloaded?): "
                            "it did not run; retry"
                        ) from None
                    log.warning("%s: started, but its start job took over %gs", plan.name, timeout)
                    job.on_props(path, state)
                    running = state.get("ActiveState") in us.RUNNING
                    result = "done" if running else "resync"
                if result != "done" or job.state.phase is us.Phase.NEW:
                    # The signals (subscribed before the start) normally told us everything;
                    # read the unit only when they did not. Reading all its ~400 properties
                    # for every job costs systemd a third more work per job.
                    job.on_props(path, await self.manager.get_all(path, keys=us.STATE_PROPERTIES))
                if (
                    result == "done"
                    or attempt == START_ATTEMPTS
                    or self.manager.generation == generation
                    or not _never_ran(job.state.props)
                ):
                    break
                # A start job queued across a daemon-reexec can fail with nothing run (the
                # unit inactive, Result=success): systemd lost it, not the job. Once more,
                # with the same stdio (still ours: close_remote() comes after).
                log.info(
                    "%s: start job %s across a systemd re-exec or bus reconnect and nothing "
                    "ran; starting it again", plan.name, result,
                )  # fmt: skip
                removed = self._job_waiters[plan.name] = loop.create_future()
                self._created.discard(plan.name)
                stale = self._start_jobs.pop(plan.name, None)
                if stale is not None:
                    self._stale_jobs.add(stale)
                job.state = us.UnitState(plan.name)
                started = False
                await self.reset_failed(plan.name)
            channels.close_remote()
            if result != "done":
                # A program that exits at once can fail the start job of a Type=exec
                # unit: that is a run, not a failure to start, unless systemd says exec failed.
                self._check_start_failure(job, result, job.state.props)
            # The cgroup (to check it is empty once the unit is inactive: not in the signals)
            # and the configured properties (to refuse a limit systemd did not apply). The
            # cgroup of a unit is its slice's plus its name (systemd escapes none of ours):
            # the slice's, asked once, spares every later job a call.
            slice_cgroup = await self._slice_cgroup(plan)
            names = {*(name for name, _s, _v in plan.extra), *checked}
            if slice_cgroup is None:
                names.add("ControlGroup")
            applied = await self.manager.get_some(path, sorted(names)) if names else {}
            if slice_cgroup is not None:
                job.cgroup = f"{slice_cgroup.rstrip('/')}/{plan.name}"
            elif applied.get("ControlGroup"):
                job.cgroup = str(applied["ControlGroup"])
            problems = verify_applied(plan.extra, applied)
            if problems:
                raise LaunchError(f"job {spec.jobid}: {'; '.join(problems)}")
            await self._check_kernel(job, {n: applied[n] for n in checked if n in applied})
            if job._gate is not None:
                job._gate.open()
        except BaseException:
            self._job_waiters.pop(plan.name, None)
            self._created.discard(plan.name)
            self._start_jobs.pop(plan.name, None)
            channels.close()
            if started:
                # "replace": a start job still queued is cancelled, not left to run untracked
                await self.stop_unit(job.unit, mode="replace")
                await self.reset_failed(plan.name)
            await self.forget(job)
            raise
        self._job_waiters.pop(plan.name, None)
        self._created.discard(plan.name)
        self._start_jobs.pop(plan.name, None)
        job.publish()
        return job

    async def _check_kernel(self, job: Job, applied: Mapping[str, Any]) -> None:
        """What the kernel shows in the unit's cgroup, before the program runs: a mismatch
        drains the node (the node cannot run jobs as configured) and fails the job; the
        caller's cleanup stops and resets the unit."""
        if not applied:
            return
        if not job.cgroup:
            problems = [f"{', '.join(applied)} not verifiable: systemd gave no ControlGroup"]
        else:
            problems = check_cgroup(applied, job.cgroup)
        if not problems:
            return
        reason = "; ".join(problems)
        log.info("%s: %s", job.unit, reason)
        if job.on_drain is not None:
            try:
                await job.on_drain(job, f"{reason} (job {job.jobid}, unit {job.unit})")
            except Exception:
                log.exception("%s: draining the node failed", job.unit)
        raise LaunchError(f"job {job.jobid}: {reason}; the job did not run, node drained")

    def _new_job(
        self,
        jobid: str,
        unit: str,
        via_imp: bool,
        keep_failed_unit: bool,
        on_drain: DrainHook | None,
        on_update: UpdateHook | None,
    ) -> Job:
        job = Job(
            jobid,
            unit,
            self,
            via_imp=via_imp,
            keep_failed_unit=keep_failed_unit,
            on_drain=on_drain,
            on_update=on_update,
        )
        job.apply_kill_policy(self.config, via_imp=via_imp)
        return job

    async def adopt(
        self,
        jobid: str,
        unit: str,
        *,
        keep_failed_unit: bool = False,
        on_drain: DrainHook | None = None,
        on_update: UpdateHook | None = None,
    ) -> Job:
        """Track a unit another launcher started (it died): status, stop timer, cleanup.

        The unit's own state tells what happened meanwhile: RemainAfterExit keeps an exited
        job's status readable, and a failed unit is kept until reset, so nothing is lost
        unless the unit was already collected (then ``error`` says so). Its stdio went with
        the launcher that died.
        """
        job = self._new_job(
            jobid, unit, unit.startswith("imp-shell-"), keep_failed_unit, on_drain, on_update
        )
        if job.path in self.jobs:
            raise RefusedError(f"job {jobid}: unit {unit} is already tracked here")
        self.jobs[job.path] = job
        try:
            await self.manager.watch_unit(job.path, job.on_props, WATCHED_PROPERTIES)
            props = await self.manager.get_all(job.path, keys=us.STATE_PROPERTIES)
        except BaseException:
            await self.forget(job)
            raise
        if props.get("LoadState") != "loaded":
            job.error = f"unit {unit} no longer exists: its exit status is lost"
            await self.forget(job)
            job.finish_gone()
            return job
        job.pid = int(props.get("ExecMainPID", 0) or 0) or None
        # whatever its first launcher asked, the figures are read once more at the end (one
        # GetAll): a unit whose shell measured has them in its status
        job.want_accounting = True
        job.state.was_active = True  # it ran before we came: "inactive" now means it ended
        job.on_props(job.path, props)
        job.publish()
        return job

    async def _slice_cgroup(self, plan: UnitPlan) -> str | None:
        """The ControlGroup of the slice a unit of ``plan`` lands in (read once; None when
        unknown). The system manager's only: a user manager's units are asked one by one."""
        if self.manager.user:
            return None
        slice_name = plan.slice or "system.slice"
        for name, _sig, value in plan.extra:
            if name == "Slice":
                slice_name = str(value)
        known = self._slice_cgroups.get(slice_name)
        if known is None:
            try:
                value = await self.manager.get_one(
                    object_path(slice_name), SLICE_IFACE, "ControlGroup"
                )
            except LaunchError as e:  # BusCallError included: the unit is asked instead
                log.debug("%s: reading its ControlGroup: %s", slice_name, e)
                return None
            if not isinstance(value, str) or not value.startswith("/"):
                return None  # not realized (yet): ask the unit, and the slice next time
            known = self._slice_cgroups[slice_name] = value
        return known

    async def _start_unit(
        self, plan: UnitPlan, channels: Channels, job: Job, *, again: bool = False
    ) -> None:
        """StartTransientUnit, sent again when it failed for want of systemd or the bus.

        A ``daemon-reexec`` answers calls in flight with NoReply, a bus restart drops them:
        the start may or may not have happened. Once systemd answers again, a unit of our
        name that exists is ours (the job's record reserves the name), so it is tracked from
        its state; otherwise the start is sent again, with the same stdio (``channels``
        keeps its copies until ``close_remote()``). ``again``: an earlier start of this unit
        was dropped by systemd (start() saw it fail with nothing run).
        """
        reset = transient = waits = 0
        deadline = asyncio.get_running_loop().time() + RETRY_FOR
        while True:
            try:
                start_job = await start_transient_unit(self.manager, plan, channels.remote)
                self._start_jobs[plan.name] = start_job
                self._created.add(plan.name)
                return
            except BusCallError as e:
                if "UnitExists" in e.name and not (reset or transient or again):
                    # a failed unit of an earlier run with this id: reset once, then retry
                    log.info("%s exists; resetting it and retrying once", plan.name)
                    reset += 1
                    await self.reset_failed(plan.name)
                    continue
                if "UnitExists" in e.name and (transient or again):
                    # we may have made it: a start that went through after all (ours: follow
                    # it), or the dead unit of a start systemd dropped, not collected yet
                    state = await self.manager.get_all(job.path, keys=START_PROPERTIES)
                    if state.get("LoadState") == "loaded" and (
                        _start_pending(state) or not _never_ran(state)
                    ):
                        log.info("%s: started after all; following it", plan.name)
                        job.on_props(job.path, state)
                        self._created.add(plan.name)
                        self._settle_start(plan.name, state)
                        return
                    if waits < COLLECT_WAITS:
                        waits += 1
                        await self.reset_failed(plan.name)
                        await asyncio.sleep(0.1)  # systemd collects it: no signal we match
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
                if e.name not in TRANSIENT_ERRORS:
                    raise
                failure: LaunchError = e
            except LaunchError as e:  # the connection dropped under the call
                failure = e
            except SdexecError:
                raise
            except Exception:
                # dbus-fast checks values only as it marshals the call: what it refuses
                # would surface as its own exception (a traceback); name the property.
                refuse_unmarshallable(plan)
                raise
            transient += 1
            if asyncio.get_running_loop().time() > deadline:
                raise failure
            log.info("%s: StartTransientUnit: %s; checking whether it started", plan.name, failure)
            state = await self.manager.get_all(job.path, keys=START_PROPERTIES)  # waits it out
            if state.get("LoadState") == "loaded":
                log.info("%s: started after all; following it", plan.name)
                self._created.add(plan.name)
                job.on_props(job.path, state)
                self._settle_start(plan.name, state)
                return
            await asyncio.sleep(min(0.05 * transient, 1.0))

    def _settle_start(self, unit: str, props: Mapping[str, Any]) -> None:
        """Resolve a start that waits for its JobRemoved from the unit's state, when no start
        job is pending any more: a JobRemoved sent while the bus was away is lost for good."""
        fut = self._job_waiters.get(unit)
        if fut is None or fut.done():
            return
        pending = props.get("Job")
        if _start_pending(props) and unit not in self._start_jobs:
            assert isinstance(pending, (list, tuple))
            self._start_jobs[unit] = str(pending[1])  # followed, not sent: its job is that one
        if props.get("LoadState") != "loaded":
            if unit in self._created:  # created, and already collected: the start is over
                fut.set_result("collected")
            return  # else not created yet: StartTransientUnit is still on its way
        if _start_pending(props):
            return  # still queued: its JobRemoved comes on the connection we have now
        active = props.get("ActiveState")
        # "done" as systemd would have said; anything else makes start() check whether the
        # program ran (a quick exit can fail the start job of a Type=exec unit)
        fut.set_result("done" if active in us.RUNNING else "resync")

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

    def _on_job_removed(self, job: str, unit: str, result: str) -> None:
        fut = self._job_waiters.get(unit)
        if fut is None or fut.done():
            return
        if job in self._stale_jobs:
            self._stale_jobs.discard(job)
            log.debug("%s: JobRemoved of an earlier start job %s (%s) ignored", unit, job, result)
            return
        if self._start_jobs.get(unit, job) != job:
            # a start job of an earlier attempt at this unit, late: not this start's end
            log.debug("%s: JobRemoved of an earlier start job %s (%s) ignored", unit, job, result)
            return
        fut.set_result(result)

    # --- teardown ---------------------------------------------------------------------------

    async def stop_unit(self, unit: str, mode: str = "fail") -> bool:
        """StopUnit; False when it did not get through (then a later re-read retries)."""
        return await stop_unit(self.manager, unit, mode)

    async def reset_failed(self, unit: str) -> None:
        await reset_failed(self.manager, unit)

    async def forget(self, job: Job) -> None:
        if self.jobs.get(job.path) is job:
            del self.jobs[job.path]
            await self.manager.unwatch_unit(job.path)
        if job._channels is not None:
            job._channels.close_remote()
        if job._gate is not None:
            job._gate.close()

    async def resync(self) -> None:
        """Re-read every tracked unit: signals were lost while the bus or systemd was away."""
        for path, job in list(self.jobs.items()):
            starting = job.unit in self._job_waiters
            try:
                props = await self.manager.get_all(
                    path, keys=START_PROPERTIES if starting else us.STATE_PROPERTIES
                )
            except LaunchError as e:
                log.warning("%s: cannot re-read after reconnect: %s", job.unit, e)
                continue
            log.info("%s: re-read after reconnect (%s)", job.unit, props.get("ActiveState"))
            job.on_props(path, props)
            if starting:
                self._settle_start(job.unit, props)

    def memory_limit_text(self) -> str | None:
        limits = [
            f"{p.name}={self.config.sdexec_properties.get(p.name.removesuffix('Scale'), p.value)}"
            for p in self.config.unit_properties
            if p.name.startswith("MemoryMax")
        ]
        return ", ".join(limits) or None
