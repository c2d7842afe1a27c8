"""The state-db records of a job's shells: written before anything starts (so a launcher that
dies leaves what to re-attach or sweep), updated as they change, removed once the status was
taken."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from sdexec.config.table import ExecConfig
from sdexec.exec.job import BaseJob
from sdexec.jobexec.handle import Handle
from sdexec.jobexec.policy import JobRequest

if TYPE_CHECKING:
    from sdexec.exec.job import UpdateHook
    from sdexec.exec.statedb import StateDB

log = logging.getLogger(__name__)


def open_db(cfg: ExecConfig, *, background_checkpoint: bool = False) -> StateDB:
    """The node's state db; ``background_checkpoint`` for a long-lived process (the server)
    whose event loop must never wait for a WAL checkpoint (see StateDB.open)."""
    from sdexec.exec.statedb import StateDB

    return StateDB.open(
        cfg.sdexec.resolved_state_dir(), background_checkpoint=background_checkpoint
    )


def record_job(db: StateDB, req: JobRequest, rank: int, service: str, unit: str) -> None:
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


def publisher(db: StateDB, jobid: str, rank: int) -> UpdateHook:
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


def db_remove(db: StateDB, jobid: str, rank: int) -> None:
    try:
        db.remove_job(jobid, rank)
    except Exception as e:  # the db may be closed already, or the disk full (retried later)
        log.warning("removing the record of job %s rank %d failed: %s", jobid, rank, e)


def finish_record(handle: Handle, db: StateDB, job: BaseJob, jobid: str, rank: int) -> None:
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
