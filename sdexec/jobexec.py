"""The job-exec layer: pick the implementation for a job, enforce policy, record the job.

This is what a resource manager's job-exec service calls: a :class:`JobRequest` (id, owner,
command, attributes) is refused or run by one implementation chosen as the reference does
(``testexec`` when the job carries ``system.exec.test.*``, else the configured ``service``,
or the job's ``system.exec.bulkexec.service`` when ``service-override`` allows it). Policy is
checked before anything starts, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .binding import Binding
from .channel import DEVNULL, PIPE
from .config import ExecConfig
from .errors import LaunchError, RefusedError, SdexecError, UsageError
from .job import BaseJob, Who
from .show import show_value

if TYPE_CHECKING:
    from .job import UpdateHook
    from .launcher import Launcher
    from .statedb import StateDB
    from .testexec import TestexecSpec

log = logging.getLogger(__name__)

SERVICES = ("sdexec", "rexec")
SERVICE_ATTR = "system.exec.bulkexec.service"
TEST_PREFIX = "system.exec.test"


@dataclass
class JobRequest:
    jobid: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    owner: str | None = None  # user name or uid; None: the instance owner (us)
    rank: int = 0
    user_manager: bool = False
    keep_failed_unit: bool = False
    time_limit: float | None = None
    shells: int = 1  # shells of this job on this node: ranks rank .. rank+shells-1
    binding: Binding = field(default_factory=Binding)  # its cores/GPUs on this node

    def owner_uid(self) -> int:
        return os.getuid() if self.owner is None else owner_uid(self.owner)

    def guest(self) -> bool:
        return self.owner_uid() != os.getuid()


def owner_uid(owner: str) -> int:
    """``--owner`` (a user name or a uid) as a uid; a UsageError naming the option if none."""
    try:
        if owner.isascii() and owner.isdigit():
            return int(owner)
        return pwd.getpwnam(owner).pw_uid
    except (KeyError, ValueError):
        raise UsageError(f"--owner: no such user {show_value(owner)}") from None


def select_service(cfg: ExecConfig, req: JobRequest) -> str:
    """testexec, else the override attribute (if allowed), else the configured service."""
    guest = req.guest()
    if guest and os.getuid() != 0 and req.owner is not None:
        raise RefusedError(
            "--owner: only the instance owner (root) may run jobs for other users, "
            f"not uid {os.getuid()}"
        )
    if any(k == TEST_PREFIX or k.startswith(TEST_PREFIX + ".") for k in req.attrs):
        return "testexec"
    unknown = [k for k in req.attrs if k.startswith("system.exec.") and k != SERVICE_ATTR]
    if unknown:
        raise UsageError(
            f"--setattr: unknown attribute {unknown[0]!r} (known: {SERVICE_ATTR}, "
            f"{TEST_PREFIX}.run_duration, .wait_status, .mock_exception, .override, "
            ".reattach_finish)"
        )
    service = cfg.service
    wanted = req.attrs.get(SERVICE_ATTR)
    if wanted is not None:
        if not cfg.service_override:
            raise RefusedError(
                f"--setattr {SERVICE_ATTR}={show_value(wanted)}: refused, "
                "exec.service-override is false "
                "(set service-override = true in [exec] to allow it)"
            )
        if wanted not in SERVICES:
            raise UsageError(
                f'--setattr {SERVICE_ATTR}: {wanted!r} is not a service (one of "rexec", "sdexec")'
            )
        service = wanted
    if guest and not cfg.imp:
        raise RefusedError(
            f"job {req.jobid}: owner {show_value(req.owner)} is not the instance owner "
            "and exec.imp "
            "is not set: "
            "guest jobs run only through the IMP"
        )
    if guest and service == "rexec":
        raise RefusedError(f"job {req.jobid}: guest jobs need the sdexec service (exec.service)")
    return service


@dataclass
class Handle:
    """One job on this node (one shell per rank here), whatever the implementation."""

    jobid: str
    service: str
    jobs: list[BaseJob] = field(default_factory=list)
    db: StateDB | None = None
    error: str | None = None  # a job-level failure (barrier), beyond the shells' own
    cleanup: list[Any] = field(default_factory=list)
    owner_uids: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return ", ".join(j.name for j in self.jobs) or self.jobid

    def cancel(self, reason: Literal["cancel", "timeout"] = "cancel") -> None:
        for job in self.jobs:
            job.cancel(reason)

    async def wait(self) -> int | None:
        await asyncio.gather(*(job.wait() for job in self.jobs))
        return self.exit_code()

    def exit_code(self) -> int | None:
        """The highest of the shells' exit codes (128+N for signal N), as Flux reports a job."""
        codes = [job.exit_code for job in self.jobs]
        if not codes or any(c is None for c in codes):
            return None
        return max(c for c in codes if c is not None)

    def report(self) -> dict[str, Any]:
        shells: list[dict[str, Any]] = [
            {
                "unit": job.name,
                "pid": job.pid,
                "returncode": job.returncode,
                "exit_code": job.exit_code,
                "signal": -(job.returncode or 0) if (job.returncode or 0) < 0 else None,
                "result": job.result,
                "error": job.error,
                "memory_note": job.memory_note,
            }
            for job in self.jobs
        ]
        first = shells[0] if shells else {}
        errors = [str(e) for e in [self.error, *(s["error"] for s in shells)] if e]
        return {
            "jobid": self.jobid,
            "service": self.service,
            **{k: first.get(k) for k in ("unit", "pid", "returncode", "signal")},
            "exit_code": self.exit_code(),
            "result": "abandoned"
            if any(s["result"] == "abandoned" for s in shells)
            else first.get("result"),
            "error": "; ".join(errors) or None,
            "memory_note": next((s["memory_note"] for s in shells if s["memory_note"]), None),
            "shells": shells,
        }

    async def close(self, *, kill: bool = True) -> None:
        """Undo whatever is still there: running shells are killed (a half-started job),
        unless ``kill`` is false (a server stopping: the jobs go on, their records stay)."""
        running = [job for job in self.jobs if job.running] if kill else []
        for job in running:
            job.kill()
        if running:
            try:
                await asyncio.wait_for(asyncio.gather(*(j.wait() for j in running)), 30)
            except TimeoutError:
                log.error("job %s: shells still running after SIGKILL", self.jobid)
        for item in reversed(self.cleanup):
            try:
                res = item()
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("cleanup failed")
        self.cleanup.clear()


def open_db(cfg: ExecConfig) -> StateDB:
    from .statedb import StateDB

    return StateDB.open(cfg.sdexec.resolved_state_dir())


def _record(db: StateDB, req: JobRequest, key: str, service: str, unit: str) -> None:
    from .statedb import JobRecord

    db.add_job(
        JobRecord(
            jobid=key,
            unit=unit,
            service=service,
            owner_uid=req.owner_uid(),
            manager="user" if req.user_manager else "system",
            launcher_pid=os.getpid(),
            state="starting",
            created_at=time.time(),
        )
    )


def _publisher(db: StateDB, jobid: str) -> UpdateHook:
    """Mirror a job's state into the node's database, for ``sdexec stats`` and re-attach."""

    def publish(job: BaseJob) -> None:
        stats = job.stats()
        if job.result == "abandoned":
            state = "abandoned"
        elif not job.running:
            state = "finished"
        elif stats.get("exception_in_progress"):
            state = "terminating"
        else:
            state = "running"
        db.update_job(
            jobid,
            state=state,
            pid=job.pid,
            exit_status=job.wait_status,
            error=job.error,
            termination=stats,
        )

    return publish


def record_key(jobid: str, rank: int, shells: int) -> str:
    """The state db holds one record per shell: the job id itself when the node runs one."""
    return jobid if shells == 1 else f"{jobid}.{rank}"


async def start_job(
    cfg: ExecConfig,
    req: JobRequest,
    service: str,
    *,
    stdin: int,
    stdout: int = PIPE,
    stderr: int = PIPE,
    launcher: Launcher | None = None,
    db: StateDB | None = None,
) -> Handle:
    """Start ``req``'s shells with ``service``; ``close()`` on the handle undoes everything.

    Nothing is started for a refused job; a job whose second shell fails to start has its
    first one killed; a record stays only for an abandoned shell (for post-mortem).
    """
    handle = Handle(jobid=req.jobid, service=service, db=db, owner_uids={req.owner_uid()})
    if db is None:  # a resident server passes its own, open for all jobs
        db = handle.db = open_db(cfg)
        handle.cleanup.append(db.close)
    try:
        db.check_not_drained()
        if service == "sdexec":
            await sweep_abandoned(cfg, db, user_manager=req.user_manager)
        if service == "testexec":
            await _start_testexec(cfg, req, handle)
        else:
            await _start_shells(cfg, req, handle, (stdin, stdout, stderr), launcher)
    except BaseException:
        await handle.close()
        raise
    return handle


async def _drain(cfg: ExecConfig, db: StateDB, reason: str, jobid: str, unit: str | None) -> None:
    from .drain import drain_node

    await drain_node(db, cfg, reason, jobid=jobid, unit=unit)


def _shell_prefix(cfg: ExecConfig, req: JobRequest) -> tuple[str, ...]:
    """The job shell the command runs under: configured, else ours when one is needed.

    Without a barrier or the IMP the command is the unit's main process itself, which keeps
    a job's start as cheap as systemd-run's; guests and multi-shell jobs need a shell.
    """
    if cfg.job_shell:
        return (cfg.job_shell, "--")
    if req.guest() or req.shells > 1:
        return (sys.executable, "-m", "sdexec.shell", "--")
    return ()


async def _start_shells(
    cfg: ExecConfig,
    req: JobRequest,
    handle: Handle,
    stdio: tuple[int, int, int],
    launcher: Launcher | None,
) -> None:
    """Start each shell; ``launcher``: a connected one to share (the server's), else our own."""
    stdin, stdout, stderr = stdio
    db = handle.db
    assert db is not None
    guest = req.guest()
    shell = _shell_prefix(cfg, req)
    barrier_path = None
    if req.shells > 1:
        barrier_path = await _start_barrier(cfg, req, handle)
    if handle.service == "sdexec" and launcher is None:
        from .launcher import Launcher

        launcher = Launcher(cfg, user=req.user_manager)
        await launcher.connect()
        handle.cleanup.append(launcher.close)
    for rank in range(req.rank, req.rank + req.shells):
        key = record_key(req.jobid, rank, req.shells)
        env = dict(req.env)
        env.update(SDEXEC_JOBID=req.jobid, SDEXEC_RANK=str(rank), SDEXEC_SIZE=str(req.shells))
        if barrier_path:
            env["SDEXEC_BARRIER"] = barrier_path

        async def on_drain(job: BaseJob, reason: str) -> None:
            await _drain(cfg, db, reason, req.jobid, job.name)

        on_update = _publisher(db, key)
        if handle.service == "sdexec":
            assert launcher is not None
            from .launcher import JobSpec
            from .unitname import unit_name

            _record(db, req, key, "sdexec", unit_name(req.jobid, rank, guest=guest))
            spec = JobSpec(
                jobid=req.jobid,
                argv=list(req.argv),
                env=env,
                cwd=req.cwd,
                rank=rank,
                stdin=stdin if rank == req.rank else DEVNULL,
                stdout=stdout,
                stderr=stderr,
                guest_user=req.owner if guest else None,
                shell=shell,
                keep_failed_unit=req.keep_failed_unit,
                binding=req.binding,
            )
            try:
                job: BaseJob = await launcher.start(spec, on_drain=on_drain, on_update=on_update)
            except BaseException:
                db_remove(db, key)
                raise
        else:
            from .rexec import RexecJob

            name = f"rexec-{rank}-{req.jobid}"
            _record(db, req, key, "rexec", name)
            try:
                job = await RexecJob.start(
                    cfg,
                    jobid=req.jobid,
                    argv=[*shell, *req.argv],
                    env=env,
                    cwd=req.cwd,
                    stdin=stdin if rank == req.rank else DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    name=name,
                    on_drain=on_drain,
                    on_update=on_update,
                )
            except BaseException:
                db_remove(db, key)
                raise
        handle.jobs.append(job)
        handle.cleanup.append(lambda key=key: _finish_record(db, key))


async def _start_barrier(cfg: ExecConfig, req: JobRequest, handle: Handle) -> str:
    """Serve the shells' start barrier here; on expiry: job error, cancel, drain."""
    import tempfile

    from .barrier import BarrierError, LocalBarrierServer
    from .clock import MonotonicClock

    db = handle.db
    assert db is not None
    rundir = tempfile.mkdtemp(prefix="sdexec-barrier-")
    os.chmod(rundir, 0o711)  # guests' shells must reach the socket (owned by them) inside
    path = os.path.join(rundir, "barrier.sock")
    server = LocalBarrierServer(
        path,
        req.shells,
        cfg.barrier_timeout,
        MonotonicClock(),
        owner_uid=req.owner_uid() if req.guest() else None,
    )
    await server.start()

    async def watch() -> None:
        try:
            await server.wait()
            log.info("job %s: all %d shells passed the start barrier", req.jobid, req.shells)
        except BarrierError as e:
            handle.error = f"start barrier failed: {e}"
            log.error("job %s: %s", req.jobid, handle.error)
            waiting = getattr(e, "waiting", [])
            handle.cancel("cancel")
            await _drain(
                cfg,
                db,
                f"{handle.error} (job {req.jobid}, shell ranks {waiting} never arrived)",
                req.jobid,
                None,
            )

    task = asyncio.ensure_future(watch())

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()
        try:
            os.rmdir(rundir)
        except OSError:
            pass

    handle.cleanup.append(stop)
    return path


def db_remove(db: StateDB, key: str) -> None:
    try:
        db.remove_job(key)
    except Exception:  # the db may be closed already
        log.debug("remove_job(%s) failed", key, exc_info=True)


def _finish_record(db: StateDB, key: str) -> None:
    """A finished shell's record goes; an abandoned one (post-mortem) or a running one (its
    launcher is going away: re-attach needs it) stays."""
    rec = db.get_job(key)
    if rec is not None and rec.state == "finished":
        db.remove_job(key)


class SimulatedJob(BaseJob):
    """testexec behind the common job surface: no process, a status after run_duration."""

    service = "testexec"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._cancelled = asyncio.Event()

    async def signal(self, signum: int, who: Who = "all") -> None:
        self._cancelled.set()

    async def forget(self) -> None:
        pass

    def cancel(self, reason: Literal["cancel", "timeout"] = "cancel") -> None:
        self._cancelled.set()

    async def run(self, spec: TestexecSpec, time_limit: float | None) -> None:
        from .testexec import run_testexec

        try:
            status = await run_testexec(
                spec,
                jobid=self.jobid,
                clock=self.clock,
                default_duration=time_limit,
                cancelled=self._cancelled,
            )
        except SdexecError as e:
            self.error = str(e)
            self.finish_gone()
            return
        self.set_finished(status)
        self.finish_gone()


async def _start_testexec(cfg: ExecConfig, req: JobRequest, handle: Handle) -> None:
    from .clock import MonotonicClock
    from .testexec import TestexecSpec, allowed

    db = handle.db
    assert db is not None
    spec = TestexecSpec.from_attrs(req.attrs)
    assert spec is not None  # select_service chose testexec because of these attributes
    allowed(spec, guest=req.guest(), allow_guests=cfg.testexec.allow_guests)
    if spec.mock_exception == "init":
        raise LaunchError(f"job {req.jobid}: mock init exception (testexec)")
    name = f"testexec-{req.rank}-{req.jobid}"
    _record(db, req, req.jobid, "testexec", name)
    job = SimulatedJob(
        req.jobid,
        name,
        clock=MonotonicClock(),
        eof_timeout=0,
        on_update=_publisher(db, req.jobid),
    )
    job.spawn(job.run(spec, req.time_limit))
    handle.jobs.append(job)
    handle.cleanup.append(lambda: _finish_record(db, req.jobid))


async def sweep_abandoned(cfg: ExecConfig, db: StateDB, *, user_manager: bool = False) -> list[str]:
    """Reset the units of abandoned jobs that systemd has since stopped; return their names.

    An abandoned unit is left as it is for post-mortem (Flux #5960) while the node is
    drained; once systemd's own stop timeout has ended it, the next ``drain clear`` or the next
    job on the node resets it, so failed units never pile up.
    """
    manager_name = "user" if user_manager else "system"
    recs = [r for r in db.list_jobs() if r.state == "abandoned" and r.manager == manager_name]
    if not recs:
        return []
    from .bus import BusCallError, Manager
    from .unitname import object_path

    cleaned = []
    manager = Manager(user=user_manager)
    await manager.connect()
    try:
        for rec in recs:
            props = await manager.get_all(object_path(rec.unit))
            state = props.get("ActiveState")
            if props.get("LoadState") == "loaded" and state not in ("failed", "inactive"):
                log.info("%s (abandoned job %s) is still %s", rec.unit, rec.jobid, state)
                continue
            if state == "failed":
                try:
                    await manager.call("ResetFailedUnit", "s", [rec.unit])
                except BusCallError as e:
                    log.warning("%s: ResetFailedUnit: %s", rec.unit, e)
                    continue
            db.remove_job(rec.jobid)
            cleaned.append(rec.unit)
            log.info("cleaned up %s of abandoned job %s", rec.unit, rec.jobid)
    finally:
        await manager.close()
    return cleaned


async def orphan_units(known: set[str], *, user_manager: bool = False) -> list[str]:
    """Job units systemd has that no record names (Flux #6590): one call, never a poll loop."""
    from .bus import Manager

    manager = Manager(user=user_manager)
    await manager.connect()
    try:
        (units,) = await manager.call(
            "ListUnitsByPatterns", "asas", [[], ["shell-*.service", "imp-shell-*.service"]]
        )
    finally:
        await manager.close()
    return sorted(u[0] for u in units if u[0] not in known)


async def attach_job(
    cfg: ExecConfig,
    jobid: str,
    *,
    user_manager: bool,
    db: StateDB | None = None,
    launcher: Launcher | None = None,
) -> Handle:
    """Take over the shells of ``jobid`` whose launcher died (``sdexec attach``)."""
    from .launcher import Launcher

    handle = Handle(jobid=jobid, service="sdexec", db=db)
    if db is None:
        db = handle.db = open_db(cfg)
        handle.cleanup.append(db.close)
    try:
        recs = [r for r in db.list_jobs() if r.jobid == jobid or r.jobid.startswith(jobid + ".")]
        if not recs:
            raise RefusedError(f"attach: no record of job {jobid} on this node (see 'sdexec jobs')")
        for rec in recs:
            if rec.live and rec.launcher_alive() and rec.launcher_pid != os.getpid():
                raise RefusedError(
                    f"attach: job {jobid} is still tracked by launcher pid {rec.launcher_pid}"
                )
            if rec.service != "sdexec":
                raise RefusedError(
                    f"attach: job {jobid} ran under {rec.service}: only sdexec units can be "
                    "re-attached (a plain process's status dies with its parent)"
                )
        if launcher is None:
            launcher = Launcher(cfg, user=user_manager)
            await launcher.connect()
            handle.cleanup.append(launcher.close)
        for rec in recs:

            async def on_drain(job: BaseJob, reason: str) -> None:
                await _drain(cfg, db, reason, jobid, job.name)

            db.update_job(rec.jobid, launcher_pid=os.getpid())
            handle.owner_uids.add(rec.owner_uid)
            job = await launcher.adopt(
                jobid, rec.unit, on_drain=on_drain, on_update=_publisher(db, rec.jobid)
            )
            log.info("attached to %s (%s)", rec.unit, job.state.active_state or "gone")
            handle.jobs.append(job)
            handle.cleanup.append(lambda key=rec.jobid: _finish_record(db, key))
    except BaseException:
        await handle.close()
        raise
    return handle
