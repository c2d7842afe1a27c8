"""Slurm's environment as sdexec's job identity, its memory, its end time (pure parts)."""

from __future__ import annotations

import time

import pytest

from sdexec.config.memory import UINT32_MAX, cap_memory_max
from sdexec.errors import UsageError
from sdexec.jobexec.slurm import (
    END_MARGIN_SEC,
    allocation_memory,
    belongs_to,
    job_of_unit,
    parse_end_time,
    step_from_environment,
    time_limit_from_end,
)
from sdexec.protocol.args import build_parser
from sdexec.protocol.request import build_request

STEP = {
    "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
    "SLURM_NODEID": "1", "SLURM_NNODES": "2", "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "7",
    "PATH": "/usr/bin:/bin",
}  # fmt: skip


def test_step_from_environment() -> None:
    step = step_from_environment(STEP)
    assert step is not None
    assert (step.jobid, step.rank, step.size, step.node_id, step.nnodes) == ("42.0", 1, 2, 1, 2)
    assert step_from_environment({"PATH": "/bin"}) is None
    batch = step_from_environment({"SLURM_JOB_ID": "7"})
    assert batch is not None and (batch.jobid, batch.rank, batch.size) == ("7", 0, 1)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"SLURM_JOB_ID": "4x"}, "SLURM_JOB_ID"),
        ({"SLURM_JOB_ID": "4", "SLURM_STEP_ID": "0/../1"}, "SLURM_STEP_ID"),
        ({"SLURM_JOB_ID": "4", "SLURM_PROCID": "-1"}, "SLURM_PROCID"),
        ({"SLURM_JOB_ID": "4", "SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ],
)
def test_bad_slurm_environment_is_a_usage_error(env: dict[str, str], name: str) -> None:
    with pytest.raises(UsageError, match=name):
        step_from_environment(env)


def test_allocation_memory() -> None:
    assert allocation_memory({"SLURM_MEM_PER_NODE": "100"}) == 100 << 20
    assert allocation_memory({"SLURM_MEM_PER_CPU": "60", "SLURM_CPUS_ON_NODE": "3"}) == 180 << 20
    assert allocation_memory({"SLURM_MEM_PER_CPU": "60"}) == 60 << 20
    assert allocation_memory({"SLURM_MEM_PER_NODE": "0"}) is None  # "the whole node"
    assert allocation_memory({}) is None


def test_cap_memory_max() -> None:
    other = ("TasksMax", "t", 10)
    assert cap_memory_max([other], 100, 1000) == (other, ("MemoryMax", "t", 100))
    assert cap_memory_max([("MemoryMax", "t", 50), other], 100, 1000) == (
        other, ("MemoryMax", "t", 50),
    )  # fmt: skip
    assert cap_memory_max([("MemoryMax", "t", 500)], 100, 1000) == (("MemoryMax", "t", 100),)
    half = UINT32_MAX // 2
    assert cap_memory_max([("MemoryMaxScale", "u", half)], 900, 1000) == (("MemoryMax", "t", 499),)


def test_units_of_a_job() -> None:
    assert job_of_unit("shell-1-42.0.service") == (1, "42.0")
    assert job_of_unit("imp-shell-0-42.service") == (0, "42")
    for name in ("shell-x-42.service", "shell-1-.service", "other.service", "shell-1-42"):
        assert job_of_unit(name) is None
    assert belongs_to("42", "42") and belongs_to("42.0", "42") and belongs_to("42.0.1", "42")
    assert not belongs_to("420.0", "42") and not belongs_to("4", "42")


def test_end_time() -> None:
    end = parse_end_time("2026-12-01T22:10:00\n")
    assert end == time.mktime((2026, 12, 1, 22, 10, 0, 0, 0, -1))
    for none in ("Unknown", "N/A", "NONE", ""):
        assert parse_end_time(none) is None
    assert time_limit_from_end(None, 0) is None
    assert time_limit_from_end(100.0, 40.0) == 60 - END_MARGIN_SEC
    assert time_limit_from_end(100.0, 200.0) == 0.001  # past: at once


def _request(argv: list[str], env: dict[str, str]) -> object:
    args = build_parser("run").parse_args(["run", *argv])
    return build_request(args, env, "/", None)


def test_request_takes_its_identity_from_slurm() -> None:
    req = _request(["--", "true"], STEP)
    assert (req.jobid, req.rank, req.size, req.slurm_job) == ("42.0", 1, 2, "42")  # type: ignore[attr-defined]
    assert req.pmi is not None and (req.pmi.rank, req.pmi.size, req.pmi.fd) == (1, 2, None)  # type: ignore[attr-defined]
    assert "PMI_FD" not in req.env  # type: ignore[attr-defined]  # the unit has no such fd
    own = _request(["--job", "x", "--rank", "3", "--", "true"], STEP)
    assert (own.jobid, own.rank) == ("x", 3)  # type: ignore[attr-defined]
    plain = _request(["--", "true"], {"PATH": "/bin"})
    assert plain.rank == 0 and plain.slurm_job is None and plain.pmi is None  # type: ignore[attr-defined]
