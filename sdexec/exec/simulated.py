"""testexec's job behind the common job surface: no process, a status after run_duration
(the reference's job-exec testexec implementation)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from sdexec.errors import SdexecError
from sdexec.exec.job import BaseJob, Who

if TYPE_CHECKING:
    from sdexec.exec.testexec import TestexecSpec


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
