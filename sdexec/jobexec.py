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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .config import ExecConfig
from .errors import LaunchError, RefusedError, SdexecError, UsageError
from .job import BaseJob, Who

if TYPE_CHECKING:
    from .job import UpdateHook
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

    def owner_uid(self) -> int:
        if self.owner is None:
            return os.getuid()
        try:
            return int(self.owner) if self.owner.isdigit() else pwd.getpwnam(self.owner).pw_uid
        except KeyError:
            raise UsageError(f"--owner: no such user {self.owner!r}") from None

    def guest(self) -> bool:
        return self.owner_uid() != os.getuid()


def select_service(cfg: ExecConfig, req: JobRequest) -> str:
    """testexec, else the override attribute (if allowed), else the configured service."""
    guest = req.guest()
    if guest and os.getuid() != 0 and req.owner is not None:
        raise RefusedError(
            f"--owner: only the instance owner (root) may run jobs for other users, not uid {os.getuid()}"
        )
    if any(k == TEST_PREFIX or k.startswith(TEST_PREFIX + ".") for k in req.attrs):
        return "testexec"
    unknown = [
        k for k in req.attrs if k.startswith("system.exec.") and k != SERVICE_ATTR
    ]
    if unknown:
        raise UsageError(
            f"--setattr: unknown attribute {unknown[0]!r} (known: {SERVICE_ATTR}, "
            f"{TEST_PREFIX}.run_duration, .wait_status, .mock_exception, .override, .reattach_finish)"
        )
    service = cfg.service
    wanted = req.attrs.get(SERVICE_ATTR)
    if wanted is not None:
        if not cfg.service_override:
            raise RefusedError(
                f"--setattr {SERVICE_ATTR}={wanted}: refused, exec.service-override is false "
                "(set service-override = true in [exec] to allow it)"
            )
        if wanted not in SERVICES:
            raise UsageError(
                f"--setattr {SERVICE_ATTR}: {wanted!r} is not a service (one of \"rexec\", \"sdexec\")"
            )
        service = wanted
    if guest and not cfg.imp:
        raise RefusedError(
            f"job {req.jobid}: owner {req.owner} is not the instance owner and exec.imp is not set: "
            "guest jobs run only through the IMP"
        )
    if guest and service == "rexec":
        raise RefusedError(f"job {req.jobid}: guest jobs need the sdexec service (exec.service)")
    return service


@dataclass
class Handle:
    """One running job of any implementation, with its record in the node's state."""

    name: str
    service: str
    jobid: str
    job: Any
    db: StateDB | None = None
    cleanup: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def cancel(self, reason: Literal["cancel", "timeout"] = "cancel") -> None:
        self.job.cancel(reason)

    async def wait(self) -> int | None:
        await self.job.wait()
        return self.exit_code()

    def exit_code(self) -> int | None:
        rc: int | None = self.job.returncode
        if rc is None:
            return None
        return rc if rc >= 0 else 128 - rc

    def report(self) -> dict[str, Any]:
        job = self.job
        rc = job.returncode
        return {
            "jobid": self.jobid,
            "service": self.service,
            "unit": getattr(job, "unit", None),
            "pid": getattr(job, "pid", None),
            "returncode": rc,
            "exit_code": self.exit_code(),
            "signal": -rc if rc is not None and rc < 0 else None,
            "result": getattr(job, "result", None),
            "error": getattr(job, "error", None),
            "memory_note": getattr(job, "memory_note", None),
            **self.extra,
        }

    async def close(self) -> None:
        for item in reversed(self.cleanup):
            try:
                res = item()
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("cleanup failed")
        self.cleanup.clear()


def _open_db(cfg: ExecConfig) -> StateDB:
    from .statedb import StateDB

    return StateDB.open(cfg.sdexec.resolved_state_dir())


def _record(db: StateDB, req: JobRequest, service: str, unit: str) -> None:
    from .statedb import JobRecord

    db.add_job(
        JobRecord(
            jobid=req.jobid,
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


async def start_job(
    cfg: ExecConfig, req: JobRequest, service: str, *, stdin: int
) -> Handle:
    """Start ``req`` with ``service``; the handle's close() removes every trace but records."""
    db = _open_db(cfg)
    try:
        db.check_not_drained()
        if service == "sdexec":
            await sweep_abandoned(cfg, db, user_manager=req.user_manager)
    except BaseException:
        db.close()
        raise
    if service == "testexec":
        return await _start_testexec(cfg, req, db)
    if service == "rexec":
        return await _start_rexec(cfg, req, db, stdin)
    return await _start_sdexec(cfg, req, db, stdin)


async def _drain_cb(cfg: ExecConfig, db: StateDB, jobid: str, unit: str, reason: str) -> None:
    from .drain import drain_node

    await drain_node(db, cfg, reason, jobid=jobid, unit=unit)


async def _start_sdexec(cfg: ExecConfig, req: JobRequest, db: StateDB, stdin: int) -> Handle:
    from .launcher import JobSpec, Launcher
    from .unitname import unit_name

    guest = req.guest()
    unit = unit_name(req.jobid, req.rank, guest=guest)
    shell: tuple[str, ...] = ()
    if cfg.job_shell:
        shell = (cfg.job_shell, "--")
    elif guest:
        shell = (_builtin_shell_python(), "-m", "sdexec.shell", "--")
    env = dict(req.env)
    env.update(SDEXEC_JOBID=req.jobid, SDEXEC_RANK=str(req.rank), SDEXEC_SIZE="1")

    async def on_drain(job: Any, reason: str) -> None:
        await _drain_cb(cfg, db, req.jobid, job.unit, reason)

    launcher = Launcher(
        cfg, user=req.user_manager, on_drain=on_drain, on_update=_publisher(db, req.jobid)
    )
    _record(db, req, "sdexec", unit)
    handle = Handle(name=unit, service="sdexec", jobid=req.jobid, job=None, db=db)
    handle.cleanup += [db.close, lambda: _finish_record(db, req.jobid)]
    try:
        await launcher.connect()
        handle.cleanup.append(launcher.close)
        handle.job = await launcher.start(
            JobSpec(
                jobid=req.jobid,
                argv=list(req.argv),
                env=env,
                cwd=req.cwd,
                rank=req.rank,
                stdin=stdin,
                guest_user=req.owner if guest else None,
                shell=shell,
                keep_failed_unit=req.keep_failed_unit,
            )
        )
    except BaseException:
        db_remove(db, req.jobid)
        await handle.close()
        raise
    return handle


def db_remove(db: StateDB, jobid: str) -> None:
    try:
        db.remove_job(jobid)
    except Exception:  # the db may be closed already
        log.debug("remove_job(%s) failed", jobid, exc_info=True)


def _finish_record(db: StateDB, jobid: str) -> None:
    rec = db.get_job(jobid)
    if rec is not None and rec.state != "abandoned":
        db.remove_job(jobid)


def _builtin_shell_python() -> str:
    import sys

    return sys.executable


async def _start_rexec(cfg: ExecConfig, req: JobRequest, db: StateDB, stdin: int) -> Handle:
    from .rexec import RexecJob

    name = f"rexec-{req.rank}-{req.jobid}"
    _record(db, req, "rexec", name)
    handle = Handle(name=name, service="rexec", jobid=req.jobid, job=None, db=db)
    handle.cleanup += [db.close, lambda: _finish_record(db, req.jobid)]
    shell: tuple[str, ...] = (cfg.job_shell, "--") if cfg.job_shell else ()
    env = dict(req.env)
    env.update(SDEXEC_JOBID=req.jobid, SDEXEC_RANK=str(req.rank), SDEXEC_SIZE="1")

    async def on_drain(job: Any, reason: str) -> None:
        await _drain_cb(cfg, db, req.jobid, name, reason)

    try:
        handle.job = await RexecJob.start(
            cfg,
            jobid=req.jobid,
            argv=[*shell, *req.argv],
            env=env,
            cwd=req.cwd,
            stdin=stdin,
            on_drain=on_drain,
            on_update=_publisher(db, req.jobid),
        )
    except BaseException:
        db_remove(db, req.jobid)
        await handle.close()
        raise
    return handle


class SimulatedJob(BaseJob):
    """testexec behind the common job surface: no process, a status after run_duration."""

    service = "testexec"

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


async def _start_testexec(cfg: ExecConfig, req: JobRequest, db: StateDB) -> Handle:
    from .clock import MonotonicClock
    from .testexec import TestexecSpec, allowed

    spec = TestexecSpec.from_attrs(req.attrs)
    assert spec is not None  # select_service chose testexec because of these attributes
    allowed(spec, guest=req.guest(), allow_guests=cfg.testexec.allow_guests)
    if spec.mock_exception == "init":
        raise LaunchError(f"job {req.jobid}: mock init exception (testexec)")
    name = f"testexec-{req.rank}-{req.jobid}"
    _record(db, req, "testexec", name)
    job = SimulatedJob(
        req.jobid, name, clock=MonotonicClock(), eof_timeout=0,
        on_update=_publisher(db, req.jobid),
    )
    job.spawn(job.run(spec, req.time_limit))
    handle = Handle(name=name, service="testexec", jobid=req.jobid, job=job, db=db)
    handle.cleanup += [db.close, lambda: _finish_record(db, req.jobid)]
    return handle


async def sweep_abandoned(cfg: ExecConfig, db: StateDB, *, user_manager: bool = False) -> list[str]:
    """Reset the units of abandoned jobs that systemd has since stopped; return their names.

    An abandoned unit is left as it is for post-mortem (Flux #5960) while the node is
    drained; once systemd's own stop timeout has ended it, the next ``drain clear`` or the next
    job on the node resets it, so failed units never pile up.
    """
    from .bus import BusCallError, Manager
    from .unitname import object_path

    manager_name = "user" if user_manager else "system"
    recs = [r for r in db.list_jobs() if r.state == "abandoned" and r.manager == manager_name]
    if not recs:
        return []
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


async def attach_job(cfg: ExecConfig, jobid: str, *, user_manager: bool, json_out: bool) -> int:
    raise RefusedError("attach: not implemented yet")
