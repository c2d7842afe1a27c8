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
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from sdexec.config.table import load_config
from sdexec.errors import LaunchError, RefusedError, UsageError

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig
    from sdexec.exec.binding import Binding
    from sdexec.jobexec.policy import Handle, JobRequest

log = logging.getLogger(__name__)


def new_jobid() -> str:
    """Unique on this node without coordination: milliseconds, pid and a random tail."""
    return f"{int(time.time() * 1000):x}{os.getpid() % 0x10000:04x}{os.urandom(2).hex()}"


def parse_assignments(items: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option}: {item!r} is not KEY=VALUE (e.g. {option} FOO=bar)")
        out[key] = value
    return out


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given (usage: sdexec run [OPTIONS] -- CMD [ARG...])")
    return cmd


def build_request(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    cwd: str,
    owner: str | None,
    caller_uid: int | None = None,
) -> JobRequest:
    """The job ``sdexec run ARGS`` asks for: from this process, or from a client of the server.

    ``caller_uid`` is who asks (the server's client, from SO_PEERCRED); a job that root runs
    for another user gets a fresh environment for that user (and that user's home as its
    default directory): the caller's variables, secrets and agent sockets included, are the
    caller's and never reach someone else's job.
    """
    from sdexec.systemd.start import (
        check_command,
        check_environment,
        guest_base_environment,
        guest_passwd,
        usable_environment,
    )

    cmd = _command(args)
    attrs = parse_assignments(args.setattr, "--setattr")
    extra_env = parse_assignments(args.env, "--env")
    check_environment(extra_env, "--env")
    caller = os.getuid() if caller_uid is None else caller_uid
    from sdexec.jobexec.policy import owner_uid

    if owner is not None and owner_uid(owner) != caller:
        if caller != 0:
            raise RefusedError(
                "--owner: only the instance owner (root) may run jobs for other users"
            )
        pw = guest_passwd(str(owner_uid(owner)))
        env = guest_base_environment(pw)
        default_cwd = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"
    else:
        env = usable_environment(environ)
        default_cwd = cwd
    env.update(extra_env)
    # Under a resource manager the job's identity is its: Slurm's job.step, task rank, size
    from sdexec.exec.pmi import PmiEndpoint
    from sdexec.jobexec.slurm import allocation_memory, step_from_environment

    step = step_from_environment(environ) if args.job is None or args.rank is None else None
    # the PMI fd is this process's (or the client's, passed to the server), not the unit's
    env.pop("PMI_FD", None)
    check_environment(env)
    job_cwd = args.cwd or default_cwd
    check_command(cmd, job_cwd)
    jobid = args.job if args.job is not None else step.jobid if step else new_jobid()
    rank = args.rank if args.rank is not None else step.rank if step else 0
    from sdexec.systemd.unitname import check_jobid

    check_jobid(jobid)
    time_limit: float | None = None
    if args.time_limit is not None:
        from sdexec.config.duration import parse_fsd

        try:
            time_limit = parse_fsd(args.time_limit, "--time-limit")
        except ValueError as e:
            raise UsageError(f"--time-limit: {e}") from None
    from sdexec.jobexec.policy import JobRequest

    return JobRequest(
        jobid=jobid,
        argv=cmd,
        env=env,
        cwd=job_cwd,
        attrs=attrs,
        owner=owner,
        rank=rank,
        size=step.size if step else None,
        pmi=PmiEndpoint.from_environment(environ),
        allocation_memory=allocation_memory(environ) if step else None,
        slurm_job=step.job_id if step else None,
        user_manager=args.user,
        keep_failed_unit=args.keep_unit,
        time_limit=time_limit,
        shells=args.shells,
        binding=resolve_binding(args, environ),
    )


def resolve_binding(args: argparse.Namespace, environ: Mapping[str, str]) -> Binding:
    from sdexec.exec.binding import resolve

    return resolve(args.cores, args.gpus, args.bind_from, environ)


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
        from sdexec.jobexec.policy import start_job

        return await start_job(cfg, req, service, stdin=0)

    return asyncio.run(_supervise(start, req.jobid, req.time_limit, json_out=args.json))


def attach(args: argparse.Namespace) -> int:
    """Re-attach to a job whose launcher died: wait for it and exit with its status."""
    from sdexec.jobexec.policy import attach_job

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


def outcome(handle: Handle, rc: int | None, *, json_out: bool) -> tuple[int, list[str]]:
    """The exit code of ``sdexec run`` for a finished job, and what it says on stderr."""
    report = handle.report()
    jobid = handle.jobid
    lines = [json.dumps(report)] if json_out else []
    if report.get("memory_note"):
        lines.append(f"sdexec: job {jobid}: {report['memory_note']}")
    if rc is None or report.get("result") == "abandoned" or handle.error:
        # processes we could not kill: the node is drained and the job failed, whatever
        # its main process's status was
        error = LaunchError(f"job {jobid}: {report.get('error') or 'no exit status'}")
        return error.exit_code, [*lines, f"sdexec: {error}"]
    if report.get("error"):
        lines.append(f"sdexec: job {jobid}: {report['error']}")
    return rc, lines
