"""Following a job again after its launcher went away (kill -9, a server restart): ownership
first, then the live unit is adopted or the kept status given, once."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sdexec.config.table import ExecConfig
from sdexec.errors import RefusedError
from sdexec.exec.accounting import Accounting
from sdexec.exec.job import BaseJob, Who
from sdexec.jobexec.handle import Handle
from sdexec.jobexec.records import finish_record, open_db, publisher
from sdexec.jobexec.shells import drain_job

if TYPE_CHECKING:
    from sdexec.exec.launcher import Launcher
    from sdexec.exec.statedb import JobRecord as StateRecord
    from sdexec.exec.statedb import StateDB

log = logging.getLogger(__name__)


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
        kept = rec.termination or {}
        result = kept.get("result")
        self.result = "abandoned" if rec.state == "abandoned" else (
            result if isinstance(result, str) else None
        )  # fmt: skip
        # the figures its launcher read before it stopped the unit (and recorded)
        self.accounting = Accounting.from_dict(kept.get("accounting"))
        self.finish_gone()

    async def signal(self, signum: int, who: Who = "all") -> None:
        pass

    async def forget(self) -> None:
        pass


def is_stranger(caller_uid: int | None) -> bool:
    """A caller other than root or the instance owner: it may follow only its own jobs."""
    return caller_uid is not None and caller_uid not in (0, os.getuid())


def check_attach(recs: Sequence[StateRecord], jobid: str, caller_uid: int | None) -> None:
    """Whether ``caller_uid`` may attach to ``jobid``: before anything is adopted or said.

    A caller other than root or the instance owner learns nothing of another user's job,
    not even that it exists."""
    if is_stranger(caller_uid) and (not recs or any(r.owner_uid != caller_uid for r in recs)):
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
                    lambda j=recorded, r=rec: finish_record(handle, db, j, r.jobid, r.rank)
                )
        if live and launcher is None:
            launcher = Launcher(cfg, user=user_manager)
            await launcher.connect()
            handle.cleanup.append(launcher.close)
        for rec in live:
            assert launcher is not None

            async def on_drain(job: BaseJob, reason: str) -> None:
                await drain_job(cfg, db, reason, jobid, job.name)

            db.update_job(rec.jobid, rec.rank, launcher_pid=os.getpid())
            # No hook yet: a unit found gone must not overwrite, in the record, a status the
            # record already has; what the record should say is decided below, then written.
            job = await launcher.adopt(jobid, rec.unit, on_drain=on_drain, on_update=None)
            log.info("attached to %s (%s)", rec.unit, job.state.active_state or "gone")
            shell: BaseJob = job
            update = publisher(db, rec.jobid, rec.rank)
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
                job.on_update = update
                job.publish()
            handle.jobs.append(shell)
            handle.cleanup.append(
                lambda j=shell, r=rec: finish_record(handle, db, j, r.jobid, r.rank)
            )
    except BaseException:
        await handle.close()
        raise
    return handle
