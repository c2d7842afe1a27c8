"""Starting a job: policy first, then a record, then its shells (through the IMP for guests),
the start barrier they meet at, or testexec's simulation; what a half-started job leaves is
undone."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sdexec.config.show import show_value
from sdexec.config.table import ExecConfig
from sdexec.errors import LaunchError, RefusedError
from sdexec.exec.channel import DEVNULL, PIPE
from sdexec.exec.job import BaseJob
from sdexec.jobexec.handle import Handle
from sdexec.jobexec.policy import JobRequest, select_service, shell_prefix, via_imp
from sdexec.jobexec.records import db_remove, finish_record, open_db, publisher, record_job
from sdexec.jobexec.sweep import sweep_abandoned

if TYPE_CHECKING:
    from sdexec.exec.launcher import Launcher
    from sdexec.exec.statedb import StateDB

log = logging.getLogger(__name__)


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


async def drain_job(
    cfg: ExecConfig, db: StateDB, reason: str, jobid: str, unit: str | None
) -> None:
    from sdexec.exec.drain import drain_node

    await drain_node(db, cfg, reason, jobid=jobid, unit=unit)


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
    imp = via_imp(cfg, req)
    shell = shell_prefix(cfg, req)
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
            await drain_job(cfg, db, reason, req.jobid, job.name)

        on_update = publisher(db, req.jobid, rank)
        if handle.service == "sdexec":
            assert launcher is not None
            from sdexec.exec.launcher import JobSpec
            from sdexec.systemd.unitname import unit_name

            record_job(db, req, rank, "sdexec", unit_name(req.jobid, rank, guest=imp))
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
                guest_user=str(req.owner_uid()) if imp else None,
                run_as=str(req.owner_uid()) if guest and not imp else None,
                shell=shell,
                keep_failed_unit=req.keep_failed_unit,
                memory_max=req.allocation_memory if cfg.sdexec.allocation_memory else None,
                binding=req.binding,
                accounting=req.accounting,
            )
            try:
                job: BaseJob = await launcher.start(spec, on_drain=on_drain, on_update=on_update)
            except BaseException:
                db_remove(db, req.jobid, rank)
                raise
        else:
            from sdexec.exec.rexec import RexecJob

            name = f"rexec-{rank}-{req.jobid}"
            record_job(db, req, rank, "rexec", name)
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
            lambda job=job, rank=rank: finish_record(handle, db, job, req.jobid, rank)
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
            await drain_job(
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
    record_job(db, req, req.rank, "testexec", name)
    try:
        await handle.accepted()
    except BaseException:
        db_remove(db, req.jobid, req.rank)
        raise
    from sdexec.exec.simulated import SimulatedJob  # testexec's: only for its jobs

    job = SimulatedJob(
        req.jobid,
        name,
        clock=MonotonicClock(),
        eof_timeout=0,
        on_update=publisher(db, req.jobid, req.rank),
    )
    job.spawn(job.run(spec, req.time_limit))
    handle.jobs.append(job)
    handle.cleanup.append(lambda: finish_record(handle, db, job, req.jobid, req.rank))
