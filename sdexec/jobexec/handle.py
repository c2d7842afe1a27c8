"""One job on this node, whatever the implementation: its shells, their exit codes and
report, and what to undo. A server and the CLI hold the same object."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sdexec.exec.job import BaseJob

if TYPE_CHECKING:
    from sdexec.exec.statedb import StateDB

log = logging.getLogger(__name__)


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
