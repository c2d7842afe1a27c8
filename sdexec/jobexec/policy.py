"""The job-exec layer: pick the implementation for a job, enforce policy, record the job.

This is what a resource manager's job-exec service calls: a :class:`JobRequest` (id, owner,
command, attributes) is refused or run by one implementation chosen as the reference does
(``testexec`` when the job carries ``system.exec.test.*``, else the configured ``service``,
or the job's ``system.exec.bulkexec.service`` when ``service-override`` allows it). Policy is
checked before anything starts, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import os
import pwd
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdexec.config.show import show_value
from sdexec.config.table import SERVICES, ExecConfig
from sdexec.errors import RefusedError, UsageError
from sdexec.exec.binding import Binding
from sdexec.exec.testexec import PREFIX as TEST_PREFIX

if TYPE_CHECKING:
    from sdexec.exec.pmi import PmiEndpoint


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


def via_imp(cfg: ExecConfig, req: JobRequest) -> bool:
    """A guest's job whose credentials come from the IMP (not from the unit's User=)."""
    return req.guest() and cfg.sdexec.guest_credentials == "imp"


def shell_prefix(cfg: ExecConfig, req: JobRequest) -> tuple[str, ...]:
    """The job shell the command runs under: configured, else ours when one is needed.

    Without a barrier or the IMP the command is the unit's main process itself, which keeps
    a job's start as cheap as systemd-run's; guests and multi-shell jobs need a shell.
    """
    if cfg.job_shell:
        return (cfg.job_shell, "--")
    if via_imp(cfg, req) or req.shells > 1 or req.cross_node():
        return (sys.executable, "-m", "sdexec.exec.shell", "--")
    return ()
