"""From parsed ``sdexec run`` arguments to a JobRequest, and from a finished job to its exit
code and report lines: the same on both ends, whether the job runs in-process or in the server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdexec.errors import LaunchError, RefusedError, UsageError

if TYPE_CHECKING:
    from sdexec.exec.binding import Binding
    from sdexec.exec.pmi import PmiEndpoint
    from sdexec.jobexec.handle import Handle
    from sdexec.jobexec.policy import JobRequest
    from sdexec.jobexec.slurm import SlurmStep

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
    from sdexec.exec.command import (
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
    # Under a resource manager the job's identity is its: Slurm's job.step, task rank, size.
    # Their modules are imported only for a task of one (every job's start pays for imports).
    step: SlurmStep | None = None
    if "SLURM_JOB_ID" in environ and (args.job is None or args.rank is None):
        from sdexec.jobexec.slurm import step_from_environment

        step = step_from_environment(environ)
    pmi: PmiEndpoint | None = None
    if "PMI_RANK" in environ:
        from sdexec.exec.pmi import PmiEndpoint

        pmi = PmiEndpoint.from_environment(environ)
    memory: int | None = None
    if step is not None:
        from sdexec.jobexec.slurm import allocation_memory

        memory = allocation_memory(environ)
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
        pmi=pmi,
        allocation_memory=memory,
        slurm_job=step.job_id if step else None,
        user_manager=args.user,
        keep_failed_unit=args.keep_unit,
        time_limit=time_limit,
        shells=args.shells,
        binding=resolve_binding(args, environ),
        accounting=wants_accounting(args),
    )


def wants_accounting(args: argparse.Namespace) -> bool:
    """``--json`` and ``-v`` report the end-of-job figures; a job that asks neither does not
    pay for them (on cgroup v1 they cost a job shell in the unit)."""
    return bool(getattr(args, "json", False) or getattr(args, "verbose", 0))


def resolve_binding(args: argparse.Namespace, environ: Mapping[str, str]) -> Binding:
    from sdexec.exec.binding import resolve

    return resolve(args.cores, args.gpus, args.bind_from, environ)


def outcome(
    handle: Handle, rc: int | None, *, json_out: bool, verbose: bool = False
) -> tuple[int, list[str]]:
    """The exit code of ``sdexec run`` for a finished job, and what it says on stderr: the
    JSON report first (``--json``), the job's own notes and errors, and with ``verbose`` one
    line per shell at the end, systemd-run's "Finished with result ..." in one line."""
    report = handle.report()
    jobid = handle.jobid
    lines = [json.dumps(report)] if json_out else []
    summary = [summary_line(shell) for shell in report["shells"]] if verbose else []
    if report.get("memory_note"):
        lines.append(f"sdexec: job {jobid}: {report['memory_note']}")
    if rc is None or report.get("result") == "abandoned" or handle.error:
        # processes we could not kill: the node is drained and the job failed, whatever
        # its main process's status was
        error = LaunchError(f"job {jobid}: {report.get('error') or 'no exit status'}")
        return error.exit_code, [*lines, f"sdexec: {error}", *summary]
    if report.get("error"):
        lines.append(f"sdexec: job {jobid}: {report['error']}")
    return rc, [*lines, *summary]


def summary_line(shell: Mapping[str, Any]) -> str:
    """One shell of a report as systemd-run's closing lines say it, in one line."""
    from sdexec.config.signals import signal_name
    from sdexec.exec.accounting import human_line

    rc = shell.get("returncode")
    if rc is None:
        status = "status unknown"
    elif rc >= 0:
        status = f"code=exited/status={rc}"
    else:
        status = f"code=killed/signal={signal_name(-rc)}"
    return human_line(str(shell.get("unit")), shell.get("result"), status, shell["accounting"])
