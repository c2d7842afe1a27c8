"""The ``rexec`` service: the job as a plain local process group, no systemd.

Same surface and the same termination semantics as ``sdexec`` (it is what a host without
systemd uses, and what ``service-override`` can pick): the job gets its own session so
"all the job's processes" is its process group, and processes that outlive the main one are
treated like a unit lingering in *deactivating*: SIGTERM, then the stop timer.
Without a cgroup, a process that leaves the group (setsid) escapes: that is rexec's limit,
and the reason sdexec exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from sdexec.config.table import ExecConfig
from sdexec.errors import CommandNotExecutable
from sdexec.exec.channel import PIPE, Channels
from sdexec.exec.clock import Clock, MonotonicClock
from sdexec.exec.command import check_command, check_environment, resolve_program
from sdexec.exec.job import BaseJob, DrainHook, UpdateHook, Who
from sdexec.systemd.unitstate import ActiveState

log = logging.getLogger(__name__)

GROUP_POLL = 0.1


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RexecJob(BaseJob):
    service = "rexec"

    def __init__(
        self, jobid: str, name: str, proc: asyncio.subprocess.Process, **kw: object
    ) -> None:
        super().__init__(jobid, name, **kw)  # type: ignore[arg-type]
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the job leads its own group

    @classmethod
    async def start(
        cls,
        cfg: ExecConfig,
        *,
        jobid: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        stdin: int,
        stdout: int = PIPE,
        stderr: int = PIPE,
        name: str | None = None,
        clock: Clock | None = None,
        on_drain: DrainHook | None = None,
        on_update: UpdateHook | None = None,
    ) -> RexecJob:
        check_environment(env)
        check_command(argv, cwd)
        path = resolve_program(argv[0], env, cwd)
        # the same stdio as a unit gets (pipes out, a socket in): one relay for both services
        channels = Channels.create(stdin, stdout, stderr)
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                *argv[1:],
                env=dict(env),
                cwd=cwd,
                stdin=channels.remote[0],
                stdout=channels.remote[1],
                stderr=channels.remote[2],
                start_new_session=True,
            )
        except BaseException as e:
            channels.close()
            if isinstance(e, PermissionError):
                raise CommandNotExecutable(f"{argv[0]}: {e.strerror}") from None
            if isinstance(e, OSError):
                raise CommandNotExecutable(
                    f"{argv[0]}: could not be started: {e.strerror}"
                ) from None
            raise
        channels.close_remote()  # the child has its copies: EOF comes when it closes them
        job = cls(
            jobid,
            name or f"rexec-{jobid}",
            proc,
            clock=clock or MonotonicClock(),
            eof_timeout=cfg.sdexec.stdio_eof_timeout,
            on_drain=on_drain,
            on_update=on_update,
        )
        job._channels = channels
        try:
            job.stdin, job.stdout, job.stderr = await channels.open_streams()
        except BaseException:
            channels.close()
            proc.kill()
            raise
        job.apply_kill_policy(cfg, via_imp=False)
        job.spawn(job._watch(), name="rexec-watch")
        job.publish()
        return job

    async def signal(self, signum: int, who: Who = "all") -> None:
        try:
            if who == "all":
                os.killpg(self.pgid, signum)
            elif self.proc.returncode is None:
                self.proc.send_signal(signum)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.error("%s: could not signal processes: %s", self.name, e)
            self.error = self.error or f"could not signal the job's processes: {e.strerror}"

    async def forget(self) -> None:
        pass

    async def _watch(self) -> None:
        rc = await self.proc.wait()
        status = (rc & 0xFF) << 8 if rc >= 0 else -rc
        self.set_finished(status)
        if _group_alive(self.pgid):
            # leftovers: what systemd's stop does to a unit, then the stop timer
            await self.signal(signal.SIGTERM, "all")
            self.on_lingering(ActiveState.DEACTIVATING)
            # no event tells when a process group empties: poll
            while _group_alive(self.pgid) and self.running:  # noqa: ASYNC110
                await asyncio.sleep(GROUP_POLL)
        if self.running:
            self.on_lingering(ActiveState.INACTIVE)
            await self.drain_stdio()
            self.finish_gone()
