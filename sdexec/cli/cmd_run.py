"""``sdexec run``: one job, stdio relayed, its status as ours (like ``systemd-run --wait --pipe``).

Exit codes: the job's own exit code; 128+N when it was killed by signal N (not systemd-run's
255, peer lessons); 2 for usage/config errors; 125 when the launcher failed or refused; 126/127
when the program could not be executed / was not found. Ctrl-C or SIGTERM starts the job's
termination sequence (term-signal first) instead of abandoning the job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sdexec.config.table import load_config
from sdexec.protocol.request import build_request, outcome

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig
    from sdexec.jobexec.handle import Handle
    from sdexec.jobexec.policy import JobRequest

log = logging.getLogger(__name__)


def dry_run(cfg: ExecConfig, req: JobRequest, *, json_out: bool) -> int:
    """What the job's unit would get from the config and its binding; nothing starts."""
    from sdexec.exec.launcher import job_properties

    props = job_properties(cfg, req.binding)
    if json_out:
        sys.stdout.write(json.dumps(props) + "\n")
    else:
        for name, value in props.items():
            sys.stdout.write(f"{name}={value}\n")
    return 0


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    req = build_request(args, os.environ, os.getcwd(), args.owner)
    if args.dry_run:
        return dry_run(cfg, req, json_out=args.json)
    if req.pmi is not None:
        from dataclasses import replace

        from sdexec.exec.pmi import env_fd

        req.pmi = replace(req.pmi, fd=env_fd(os.environ))
    from sdexec.jobexec.policy import select_service

    service = select_service(cfg, req)
    if req.slurm_job is not None and req.time_limit is None:
        asyncio.run(req.take_time_limit())

    async def start() -> Handle:
        from sdexec.jobexec.shells import start_job

        return await start_job(cfg, req, service, stdin=0)

    return asyncio.run(_supervise(start, req.jobid, req.time_limit, json_out=args.json))


def attach(args: argparse.Namespace) -> int:
    """Re-attach to a job whose launcher died: wait for it and exit with its status."""
    from sdexec.jobexec.attach import attach_job

    cfg = load_config(args.config)

    async def start() -> Handle:
        return await attach_job(cfg, args.job, user_manager=args.user)

    return asyncio.run(_supervise(start, args.job, None, json_out=args.json))


async def _relay(
    reader: asyncio.StreamReader | None, fd: int, lock: asyncio.Lock | None = None
) -> None:
    """Copy job output to our fd as it comes, every byte, in order.

    A non-blocking fd whose reader is slow keeps the unwritten rest and waits until it is
    writable (``lock``: one writer per fd, several shells may share it). When our reader goes
    away (EPIPE: ``sdexec run -- yes | head``), the job must learn it as it would in a shell
    pipeline: our end of its output is closed, so its next write fails with EPIPE/SIGPIPE
    and it ends on its own, rather than writing into a relay that discards forever.
    """
    if reader is None:
        return
    lock = lock or asyncio.Lock()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        try:
            async with lock:
                await _write_all(fd, chunk)
        except BrokenPipeError:
            log.debug("fd %d closed by its reader; closing the job's end too", fd)
            transport = getattr(reader, "_transport", None)
            if transport is not None:
                transport.close()
            return


async def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is out; on a full non-blocking fd, wait (no spin)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _writable(fd)
            continue
        view = view[n:]


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def _supervise(
    start: Callable[[], Awaitable[Handle]], jobid: str, time_limit: float | None, *, json_out: bool
) -> int:
    """Start (or attach to) a job, relay its output, turn signals into a cancel; its status."""
    loop = asyncio.get_running_loop()
    handle: Handle | None = None
    pending: list[int] = []

    def on_signal(signum: int) -> None:
        # Ctrl-C / SIGTERM / SIGHUP cancel the job (its termination sequence), never
        # abandon it; one arriving while the job starts applies once it has started.
        log.warning("job %s: cancelling (%s)", jobid, signal.Signals(signum).name)
        if handle is None:
            pending.append(signum)
        else:
            handle.cancel("cancel")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        handle = await start()
        try:
            if pending:
                handle.cancel("cancel")
            timer: asyncio.TimerHandle | None = None
            if time_limit is not None and time_limit > 0:
                timer = loop.call_later(time_limit, handle.cancel, "timeout")
            locks = {1: asyncio.Lock(), 2: asyncio.Lock()}
            relays = [
                asyncio.create_task(_relay(reader, fd, locks[fd]))
                for job in handle.jobs
                for reader, fd in ((job.stdout, 1), (job.stderr, 2))
            ]
            rc = await handle.wait()
            await asyncio.gather(*relays, return_exceptions=True)
            if timer is not None:
                timer.cancel()
        finally:
            await handle.close()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    code, lines = outcome(handle, rc, json_out=json_out)
    for line in lines:
        sys.stderr.write(line + "\n")
    return code
