"""What a Slurm step tells its tasks: job id, rank, size and memory, from the environment.

``srun ... sdexec run -- CMD`` runs one ``sdexec run`` per task; without ``--job``/``--rank``
each takes its identity from Slurm, so every node's unit is named for the job
(``shell-PROCID-JOBID.STEPID.service``) and the Epilog can find all of a job's units by name.

The variables come from the caller's environment, which the caller controls: nothing here
grants anything. A forged job id names only the caller's own unit (the server still decides
the owner from the socket), and the allocation's memory only ever lowers a limit
(``MemoryMax`` is the smaller of it and the site's ``sdexec-properties``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sdexec.errors import UsageError

__all__ = ["SlurmStep", "allocation_memory", "job_of_unit", "step_from_environment"]

MIB = 1024 * 1024


def _natural(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    text = env.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{name}={text[:32]!r} in the environment is not a whole number")
    return int(text)


@dataclass(frozen=True)
class SlurmStep:
    job_id: str
    step_id: str | None
    rank: int  # SLURM_PROCID: the task's rank in the step
    size: int  # SLURM_NTASKS
    node_id: int  # SLURM_NODEID
    nnodes: int  # SLURM_NNODES

    @property
    def jobid(self) -> str:
        """sdexec's job id: ``JOB.STEP`` (two steps of one job never share a unit)."""
        return f"{self.job_id}.{self.step_id}" if self.step_id is not None else self.job_id


def step_from_environment(env: Mapping[str, str]) -> SlurmStep | None:
    """The step this process is a task of, or None outside Slurm (no ``SLURM_JOB_ID``)."""
    job = _natural(env, "SLURM_JOB_ID")
    if job is None:
        return None
    step_text = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    step: str | None = None
    if step_text:
        if not (step_text.isascii() and (step_text.isdigit() or step_text.isalpha())):
            raise UsageError(
                f"SLURM_STEP_ID={step_text[:32]!r} in the environment is not a step id"
            )
        step = step_text
    rank = _natural(env, "SLURM_PROCID", 0)
    size = _natural(env, "SLURM_NTASKS", None)
    if size is None:
        size = _natural(env, "SLURM_NPROCS", 1)
    node = _natural(env, "SLURM_NODEID", 0)
    nnodes = _natural(env, "SLURM_NNODES", 1)
    assert rank is not None and size is not None and node is not None and nnodes is not None
    if size < 1 or rank >= size:
        raise UsageError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={size} in the environment")
    return SlurmStep(str(job), step, rank, size, node, max(nnodes, 1))


def allocation_memory(env: Mapping[str, str]) -> int | None:
    """The step's memory on this node in bytes: ``SLURM_MEM_PER_NODE`` (MiB), else
    ``SLURM_MEM_PER_CPU`` * ``SLURM_CPUS_ON_NODE``; None when Slurm gives neither (or 0,
    Slurm's "all of the node's memory")."""
    per_node = _natural(env, "SLURM_MEM_PER_NODE")
    if per_node:
        return per_node * MIB
    per_cpu = _natural(env, "SLURM_MEM_PER_CPU")
    if per_cpu:
        cpus = _natural(env, "SLURM_CPUS_ON_NODE", 1) or 1
        return per_cpu * cpus * MIB
    return None


def job_of_unit(unit: str) -> tuple[int, str] | None:
    """(rank, escaped job id) of a job unit ``[imp-]shell-RANK-JOBID.service``, else None."""
    name = unit.removesuffix(".service")
    if name == unit:
        return None
    for prefix in ("imp-shell-", "shell-"):
        if name.startswith(prefix):
            rank, dash, jobid = name[len(prefix) :].partition("-")
            if dash and rank.isascii() and rank.isdigit() and jobid:
                return int(rank), jobid
            return None
    return None


def belongs_to(jobid: str, slurm_job: str) -> bool:
    """Whether sdexec job ``jobid`` (``J``, ``J.STEP``, ``J.STEP.RANK``) is of Slurm job ``J``."""
    return jobid == slurm_job or jobid.startswith(slurm_job + ".")


#: sdexec's own time limit fires this long before Slurm's end time, so the job sees
#: SIGALRM (Flux's time-limit signal) before Slurm's SIGTERM
END_MARGIN_SEC = 1.0
SQUEUE_TIMEOUT_SEC = 10.0


def parse_end_time(text: str) -> float | None:
    """squeue's ``%e`` (``2026-12-01T22:10:00``, local time) as a Unix time; None for a job
    without one (``Unknown``, ``N/A``, ``NONE``: no time limit)."""
    import time

    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def time_limit_from_end(end: float | None, now: float) -> float | None:
    """The time limit that ends the job at Slurm's end time (minus the margin); None: none."""
    if end is None:
        return None
    return max(end - now - END_MARGIN_SEC, 0.001)


async def job_end_time(job_id: str) -> float | None:
    """The job's end time from the controller (one ``squeue``); None if it cannot be had:
    Slurm's own limit still ends the job then (SIGTERM instead of SIGALRM)."""
    import asyncio
    import logging

    log = logging.getLogger(__name__)
    try:
        proc = await asyncio.create_subprocess_exec(
            "squeue", "-h", "-j", job_id, "-o", "%e",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    except OSError as e:
        log.warning("job %s: squeue: %s: no time limit from Slurm", job_id, e.strerror or e)
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), SQUEUE_TIMEOUT_SEC)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("job %s: squeue timed out: no time limit from Slurm", job_id)
        return None
    if proc.returncode != 0:
        return None
    return parse_end_time(out.decode(errors="replace"))
