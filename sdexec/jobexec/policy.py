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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sdexec.config.show import show_value
from sdexec.config.table import SERVICES, ExecConfig
from sdexec.errors import LaunchError, RefusedError, SdexecError, UsageError
from sdexec.exec.binding import Binding
from sdexec.exec.channel import DEVNULL, PIPE
from sdexec.exec.job import BaseJob, Who
from sdexec.exec.testexec import PREFIX as TEST_PREFIX

if TYPE_CHECKING:
    from sdexec.exec.job import UpdateHook
    from sdexec.exec.launcher import Launcher
    from sdexec.exec.pmi import PmiEndpoint
    from sdexec.exec.statedb import JobRecord as StateRecord
    from sdexec.exec.statedb import StateDB
    from sdexec.exec.testexec import TestexecSpec

log = logging.getLogger(__name__)

SERVICE_ATTR = "system.exec.bulkexec.service"


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
    size: int | None = None  # ranks of the whole job (all nodes); None: this node's shells
    pmi: PmiEndpoint | None = None  # the resource manager's PMI: the barrier across nodes
    allocation_memory: int | None = None  # bytes the resource manager allocated here
    slurm_job: str | None = None  # the Slurm job this is a step's task of

    async def take_time_limit(self) -> None:
        """A Slurm task without --time-limit ends at its job's end time, with SIGALRM."""
        if self.slurm_job is None or self.time_limit is not None:
            return
        from sdexec.jobexec.slurm import job_end_time, time_limit_from_end

        self.time_limit = time_limit_from_end(await job_end_time(self.slurm_job), time.time())

    def cross_node(self) -> bool:
        """Whether the start barrier spans nodes (through PMI): a job of more than one task."""
        return self.pmi is not None and self.pmi.size > 1 and self.pmi.fd is not None

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
            f"{TEST_PREFIX}.run_duration, .wait_status, .mock_exception)"
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
    if guest:
        guest_policy(cfg, req)
    if guest and service == "rexec":
        raise RefusedError(f"job {req.jobid}: guest jobs need the sdexec service (exec.service)")
    return service


def guest_policy(cfg: ExecConfig, req: JobRequest) -> str:
    """How a guest's job gets the guest's credentials ("imp" or "systemd"), or a refusal."""
    mode = cfg.sdexec.guest_credentials
    if mode == "systemd":
        if os.geteuid() != 0 or req.user_manager:
            raise RefusedError(
                f'job {req.jobid}: [sdexec] guest-credentials = "systemd" runs guests with '
                "the unit's User=, which needs a root launcher on the system manager"
            )
        return mode
    if not cfg.imp:
        raise RefusedError(
            f"job {req.jobid}: owner {show_value(req.owner)} is not the instance owner "
            "and exec.imp is not set: guest jobs run only through the IMP "
            '(or set [sdexec] guest-credentials = "systemd" on a root launcher)'
        )
    return mode


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
    keep_records: bool = False  # keep finished records: nobody has taken the status yet
    # called once, when the job is recorded and before anything of it starts: a server tells
    # its client the job id then, so a client that loses the server can follow the job again
    on_accepted: Callable[[], Awaitable[None]] | None = None

    async def accepted(self) -> None:
        hook, self.on_accepted = self.on_accepted, None
        if hook is not None:
            await hook()

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
    from sdexec.exec.statedb import StateDB

    return StateDB.open(cfg.sdexec.resolved_state_dir())


def _record(db: StateDB, req: JobRequest, rank: int, service: str, unit: str) -> None:
    from sdexec.exec.statedb import JobRecord

    db.add_job(
        JobRecord(
            jobid=req.jobid,
            rank=rank,
            unit=unit,
            service=service,
            owner_uid=req.owner_uid(),
            manager="user" if req.user_manager else "system",
            launcher_pid=os.getpid(),
            state="starting",
            created_at=time.time(),
        )
    )


def _publisher(db: StateDB, jobid: str, rank: int) -> UpdateHook:
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
            rank,
            state=state,
            pid=job.pid,
            exit_status=job.wait_status,
            error=job.error,
            termination=stats,
        )

    return publish


async def start_job(
    cfg: ExecConfig,
    req: JobRequest,
    service: str | None = None,
    *,
    stdin: int = DEVNULL,
    stdout: int = PIPE,
    stderr: int = PIPE,
    launcher: Launcher | None = None,
    db: StateDB | None = None,
    on_accepted: Callable[[], Awaitable[None]] | None = None,
) -> Handle:
    """Start ``req``'s shells under the job-exec policy; ``close()`` on the handle undoes
    everything.

    The policy is applied here, whatever the caller did: ``service``, if given (what the
    caller got from :func:`select_service`, e.g. to log it), must be what the policy chooses.

    ``on_accepted`` is awaited once the job is recorded, before any unit or process starts;
    if it raises (the client went away), nothing starts.

    Nothing is started for a refused job; a job whose second shell fails to start has its
    first one killed; a record stays only for an abandoned shell (for post-mortem).
    """
    chosen = select_service(cfg, req)
    if service is not None and service != chosen:
        raise RefusedError(
            f"job {req.jobid}: service {show_value(service)} refused: the policy chooses "
            f"{chosen!r} for this job"
        )
    handle = Handle(
        jobid=req.jobid,
        service=chosen,
        db=db,
        owner_uids={req.owner_uid()},
        on_accepted=on_accepted,
    )
    if db is None:  # a resident server passes its own, open for all jobs
        db = handle.db = open_db(cfg)
        handle.cleanup.append(db.close)
    try:
        db.check_not_drained()
        await req.take_time_limit()  # a Slurm task's: its job's end time
        if chosen == "sdexec":
            await sweep_abandoned(cfg, db, user_manager=req.user_manager)
        if chosen == "testexec":
            await _start_testexec(cfg, req, handle)
        else:
            await _start_shells(cfg, req, handle, (stdin, stdout, stderr), launcher)
    except BaseException:
        await handle.close()
        raise
    return handle


async def _drain(cfg: ExecConfig, db: StateDB, reason: str, jobid: str, unit: str | None) -> None:
    from sdexec.exec.drain import drain_node

    await drain_node(db, cfg, reason, jobid=jobid, unit=unit)


def _via_imp(cfg: ExecConfig, req: JobRequest) -> bool:
    """A guest's job whose credentials come from the IMP (not from the unit's User=)."""
    return req.guest() and cfg.sdexec.guest_credentials == "imp"


def _shell_prefix(cfg: ExecConfig, req: JobRequest) -> tuple[str, ...]:
    """The job shell the command runs under: configured, else ours when one is needed.

    Without a barrier or the IMP the command is the unit's main process itself, which keeps
    a job's start as cheap as systemd-run's; guests and multi-shell jobs need a shell.
    """
    if cfg.job_shell:
        return (cfg.job_shell, "--")
    if _via_imp(cfg, req) or req.shells > 1 or req.cross_node():
        return (sys.executable, "-m", "sdexec.exec.shell", "--")
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
    via_imp = _via_imp(cfg, req)
    shell = _shell_prefix(cfg, req)
    barrier_path = None
    if req.shells > 1 or req.cross_node():
        barrier_path = await _start_barrier(cfg, req, handle)
    if handle.service == "sdexec" and launcher is None:
        from sdexec.exec.launcher import Launcher

        launcher = Launcher(cfg, user=req.user_manager)
        await launcher.connect()
        handle.cleanup.append(launcher.close)
    for rank in range(req.rank, req.rank + req.shells):
        env = dict(req.env)
        size = req.size or req.shells
        env.update(SDEXEC_JOBID=req.jobid, SDEXEC_RANK=str(rank), SDEXEC_SIZE=str(size))
        if barrier_path:
            env["SDEXEC_BARRIER"] = barrier_path

        async def on_drain(job: BaseJob, reason: str) -> None:
            await _drain(cfg, db, reason, req.jobid, job.name)

        on_update = _publisher(db, req.jobid, rank)
        if handle.service == "sdexec":
            assert launcher is not None
            from sdexec.exec.launcher import JobSpec
            from sdexec.systemd.unitname import unit_name

            _record(db, req, rank, "sdexec", unit_name(req.jobid, rank, guest=via_imp))
            try:
                await handle.accepted()
            except BaseException:
                db_remove(db, req.jobid, rank)
                raise
            spec = JobSpec(
                jobid=req.jobid,
                argv=list(req.argv),
                env=env,
                cwd=req.cwd,
                rank=rank,
                stdin=stdin if rank == req.rank else DEVNULL,
                stdout=stdout,
                stderr=stderr,
                guest_user=str(req.owner_uid()) if via_imp else None,
                run_as=str(req.owner_uid()) if guest and not via_imp else None,
                shell=shell,
                keep_failed_unit=req.keep_failed_unit,
                memory_max=req.allocation_memory if cfg.sdexec.allocation_memory else None,
                binding=req.binding,
            )
            try:
                job: BaseJob = await launcher.start(spec, on_drain=on_drain, on_update=on_update)
            except BaseException:
                db_remove(db, req.jobid, rank)
                raise
        else:
            from sdexec.exec.rexec import RexecJob

            name = f"rexec-{rank}-{req.jobid}"
            _record(db, req, rank, "rexec", name)
            try:
                await handle.accepted()
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
                db_remove(db, req.jobid, rank)
                raise
        handle.jobs.append(job)
        handle.cleanup.append(
            lambda job=job, rank=rank: _finish_record(handle, db, job, req.jobid, rank)
        )


async def _start_barrier(cfg: ExecConfig, req: JobRequest, handle: Handle) -> str:
    """Serve the shells' start barrier here; on expiry: job error, cancel, drain."""
    import tempfile

    from sdexec.exec.barrier import BarrierError, LocalBarrierServer
    from sdexec.exec.clock import MonotonicClock

    db = handle.db
    assert db is not None
    rundir = tempfile.mkdtemp(prefix="sdexec-barrier-")
    os.chmod(rundir, 0o711)  # guests' shells must reach the socket (owned by them) inside
    path = os.path.join(rundir, "barrier.sock")
    owner = req.owner_uid() if req.guest() else None
    if req.cross_node():
        from sdexec.exec.pmi import ClusterBarrierServer

        assert req.pmi is not None
        server: LocalBarrierServer = ClusterBarrierServer(
            path, req.shells, cfg.barrier_timeout, MonotonicClock(), req.pmi, owner_uid=owner,
            first_rank=req.rank,
        )  # fmt: skip
    else:
        server = LocalBarrierServer(
            path, req.shells, cfg.barrier_timeout, MonotonicClock(), owner_uid=owner,
            first_rank=req.rank,  # the shells report RANK..RANK+N-1
        )  # fmt: skip
    try:
        await server.start()
    except BaseException:
        os.rmdir(rundir)  # a refused PMI fd: nothing of the barrier stays
        raise

    async def watch() -> None:
        try:
            await server.wait()
            log.info("job %s: all %d shells passed the start barrier", req.jobid, req.shells)
        except BarrierError as e:
            handle.error = f"start barrier failed: {e}"
            log.error("job %s: %s", req.jobid, handle.error)
            waiting = getattr(e, "waiting", [])
            handle.cancel("cancel")
            if req.guest():
                # A guest's shells run as the guest, who can stop them (SIGSTOP, ptrace)
                # before they arrive: draining would let any user take the node out of
                # service. Only the instance owner's shells are trusted to say "node fault".
                log.warning(
                    "job %s: guest job's barrier failed: job failed, node not drained", req.jobid
                )
                return
            missing = f"shell ranks {waiting}" if waiting else "the other nodes"
            await _drain(
                cfg,
                db,
                f"{handle.error} (job {req.jobid}, {missing} never arrived)",
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


def db_remove(db: StateDB, jobid: str, rank: int) -> None:
    try:
        db.remove_job(jobid, rank)
    except Exception as e:  # the db may be closed already, or the disk full (retried later)
        log.warning("removing the record of job %s rank %d failed: %s", jobid, rank, e)


def _finish_record(handle: Handle, db: StateDB, job: BaseJob, jobid: str, rank: int) -> None:
    """A finished shell's record goes, unless nobody took its status (``keep_records``: the
    client of a server went away; ``sdexec attach`` collects it later); an abandoned one
    (post-mortem) or a running one (its launcher is going away: re-attach needs it) stays.

    The job itself says which, not the record: a record whose last update failed (a full
    disk) must not outlive a job that ended."""
    if job.running or job.result in ("abandoned", "detached"):
        return
    if handle.keep_records and job.result != "not-started":
        job.publish()  # once more, in case the last update did not get through
        return
    db_remove(db, jobid, rank)


class SimulatedJob(BaseJob):
    """testexec behind the common job surface: no process, a status after run_duration."""

    service = "testexec"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._cancelled = asyncio.Event()
        self.started = False

    async def signal(self, signum: int, who: Who = "all") -> None:
        self._cancelled.set()

    async def forget(self) -> None:
        pass

    def cancel(self, reason: Literal["cancel", "timeout"] = "cancel") -> None:
        self._cancelled.set()

    def _on_start(self) -> None:
        """The simulated job counts as started: its record says so (``sdexec jobs``)."""
        self.started = True
        self.publish()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["started"] = self.started
        return out

    async def run(self, spec: TestexecSpec, time_limit: float | None) -> None:
        from sdexec.exec.testexec import run_testexec

        try:
            status = await run_testexec(
                spec,
                jobid=self.jobid,
                clock=self.clock,
                default_duration=time_limit,
                cancelled=self._cancelled,
                on_start=self._on_start,
            )
        except SdexecError as e:
            self.error = str(e)
            self.finish_gone()
            return
        self.set_finished(status)
        self.finish_gone()


async def _start_testexec(cfg: ExecConfig, req: JobRequest, handle: Handle) -> None:
    from sdexec.exec.clock import MonotonicClock
    from sdexec.exec.testexec import TestexecSpec, allowed

    db = handle.db
    assert db is not None
    spec = TestexecSpec.from_attrs(req.attrs)
    assert spec is not None  # select_service chose testexec because of these attributes
    allowed(spec, guest=req.guest(), allow_guests=cfg.testexec.allow_guests)
    if spec.mock_exception == "init":
        raise LaunchError(f"job {req.jobid}: mock init exception (testexec)")
    name = f"testexec-{req.rank}-{req.jobid}"
    _record(db, req, req.rank, "testexec", name)
    try:
        await handle.accepted()
    except BaseException:
        db_remove(db, req.jobid, req.rank)
        raise
    job = SimulatedJob(
        req.jobid,
        name,
        clock=MonotonicClock(),
        eof_timeout=0,
        on_update=_publisher(db, req.jobid, req.rank),
    )
    job.spawn(job.run(spec, req.time_limit))
    handle.jobs.append(job)
    handle.cleanup.append(lambda: _finish_record(handle, db, job, req.jobid, req.rank))


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
    from sdexec.systemd.bus import BusCallError, Manager
    from sdexec.systemd.unitname import object_path

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
            db.remove_job(rec.jobid, rec.rank)
            cleaned.append(rec.unit)
            log.info("cleaned up %s of abandoned job %s", rec.unit, rec.jobid)
    finally:
        await manager.close()
    return cleaned


async def orphan_units(known: set[str], *, user_manager: bool = False) -> list[str]:
    """Job units systemd has that no record names (Flux #6590): one call, never a poll loop."""
    from sdexec.systemd.bus import Manager

    manager = Manager(user=user_manager)
    await manager.connect()
    try:
        (units,) = await manager.call(
            "ListUnitsByPatterns", "asas", [[], ["shell-*.service", "imp-shell-*.service"]]
        )
    finally:
        await manager.close()
    return sorted(u[0] for u in units if u[0] not in known)


class RecordedJob(BaseJob):
    """A shell that ended while nobody waited for it: its status, as the record kept it."""

    service = "sdexec"

    def __init__(self, rec: StateRecord) -> None:
        from sdexec.exec.clock import MonotonicClock

        super().__init__(rec.jobid, rec.unit, clock=MonotonicClock(), eof_timeout=0)
        self.pid = rec.pid
        self.error = rec.error
        if rec.exit_status is not None:
            self.wait_status = rec.exit_status
        self.result = "abandoned" if rec.state == "abandoned" else None
        self.finish_gone()

    async def signal(self, signum: int, who: Who = "all") -> None:
        pass

    async def forget(self) -> None:
        pass


def check_attach(recs: Sequence[StateRecord], jobid: str, caller_uid: int | None) -> None:
    """Whether ``caller_uid`` may attach to ``jobid``: before anything is adopted or said.

    A caller other than root or the instance owner learns nothing of another user's job,
    not even that it exists."""
    stranger = caller_uid is not None and caller_uid not in (0, os.getuid())
    if stranger and (not recs or any(r.owner_uid != caller_uid for r in recs)):
        raise RefusedError(f"attach: no job {jobid} of yours on this node")
    if not recs:
        raise RefusedError(f"attach: no record of job {jobid} on this node (see 'sdexec jobs')")


async def attach_job(
    cfg: ExecConfig,
    jobid: str,
    *,
    user_manager: bool,
    db: StateDB | None = None,
    launcher: Launcher | None = None,
    caller_uid: int | None = None,
) -> Handle:
    """Take over the shells of ``jobid`` whose launcher died (``sdexec attach``), or collect
    the status that a finished job's record kept because nobody was there to take it.

    ``caller_uid``: who asks (a server's client); only the job's owner, root or the instance
    owner may, and the check comes before anything is touched."""
    from sdexec.exec.launcher import Launcher

    handle = Handle(jobid=jobid, service="sdexec", db=db)
    if db is None:
        db = handle.db = open_db(cfg)
        handle.cleanup.append(db.close)
    try:
        all_recs = db.list_jobs(jobid=jobid)
        check_attach(all_recs, jobid, caller_uid)
        recs = all_recs
        for rec in recs:
            if rec.live and rec.launcher_alive() and rec.launcher_pid != os.getpid():
                raise RefusedError(
                    f"attach: job {jobid} is still tracked by launcher pid {rec.launcher_pid}"
                )
            if rec.service != "sdexec" and rec.live:
                raise RefusedError(
                    f"attach: job {jobid} ran under {rec.service}: only sdexec units can be "
                    "re-attached (a plain process's status dies with its parent)"
                )
        handle.owner_uids.update(r.owner_uid for r in recs)
        live = [r for r in recs if r.live]
        for rec in recs:
            if not rec.live:
                recorded = RecordedJob(rec)
                handle.jobs.append(recorded)
                handle.cleanup.append(
                    lambda j=recorded, r=rec: _finish_record(handle, db, j, r.jobid, r.rank)
                )
        if live and launcher is None:
            launcher = Launcher(cfg, user=user_manager)
            await launcher.connect()
            handle.cleanup.append(launcher.close)
        for rec in live:
            assert launcher is not None

            async def on_drain(job: BaseJob, reason: str) -> None:
                await _drain(cfg, db, reason, jobid, job.name)

            db.update_job(rec.jobid, rec.rank, launcher_pid=os.getpid())
            # No hook yet: a unit found gone must not overwrite, in the record, a status the
            # record already has; what the record should say is decided below, then written.
            job = await launcher.adopt(jobid, rec.unit, on_drain=on_drain, on_update=None)
            log.info("attached to %s (%s)", rec.unit, job.state.active_state or "gone")
            shell: BaseJob = job
            publisher = _publisher(db, rec.jobid, rec.rank)
            if not job.running and job.wait_status is None and rec.exit_status is not None:
                # the unit is gone, but its exit was recorded first (the launcher records
                # the status, then stops the unit; it died in between): that is the status
                shell = RecordedJob(rec)
                db.update_job(
                    rec.jobid, rec.rank, state="finished", exit_status=rec.exit_status,
                    error=rec.error,
                )  # fmt: skip
            else:
                if rec.state == "starting" and not job.running and job.wait_status is None:
                    # the launcher died between the record and the unit: the job never ran
                    job.error = (
                        f"job {jobid} was not started (its launcher stopped before the unit)"
                    )
                    job.result = "not-started"  # no status to keep for anyone
                job.on_update = publisher
                job.publish()
            handle.jobs.append(shell)
            handle.cleanup.append(
                lambda j=shell, r=rec: _finish_record(handle, db, j, r.jobid, r.rank)
            )
    except BaseException:
        await handle.close()
        raise
    return handle
