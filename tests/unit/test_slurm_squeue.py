"""A Slurm job's end time, asked of the controller with one ``squeue`` (jobexec/slurm.py).

The time limit it gives must never cost the job: no squeue, a failing one, one that hangs or
prints nothing usable all mean "no limit from Slurm" (Slurm's own limit still ends the job).
``squeue`` here is a script on PATH that records how it was called and plays one answer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sdexec.jobexec import slurm


def _squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Put a ``squeue`` running ``body`` first on PATH; returns the file its argv goes to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    script = bindir / "squeue"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return calls


async def test_the_end_time_squeue_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _squeue(tmp_path, monkeypatch, "echo 2031-05-04T12:30:00")
    end = await slurm.job_end_time("4242")
    assert end == time.mktime((2031, 5, 4, 12, 30, 0, 0, 0, -1))
    assert calls.read_text() == "-h -j 4242 -o %e\n"  # the one job, its end time only


@pytest.mark.parametrize(
    "body",
    [
        "echo Unknown",  # a job without a time limit
        "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
        "exit 0",  # printed nothing
    ],
)
async def test_no_usable_answer_means_no_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    calls = _squeue(tmp_path, monkeypatch, body)
    assert await slurm.job_end_time("4243") is None
    assert calls.read_text() == "-h -j 4243 -o %e\n"


async def test_no_squeue_means_no_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    assert await slurm.job_end_time("4244") is None
    assert "job 4244: squeue: " in caplog.text and "no time limit from Slurm" in caplog.text


async def test_a_hanging_squeue_is_killed_and_means_no_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "pid"
    _squeue(tmp_path, monkeypatch, f"echo $$ > {pidfile}; exec sleep 300")
    monkeypatch.setattr(slurm, "SQUEUE_TIMEOUT_SEC", 0.5)
    assert await slurm.job_end_time("4245") is None
    assert "job 4245: squeue timed out" in caplog.text
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_time_limit_from_end_keeps_a_margin() -> None:
    assert slurm.time_limit_from_end(None, 100.0) is None
    assert slurm.time_limit_from_end(200.0, 100.0) == 100.0 - slurm.END_MARGIN_SEC
    assert slurm.time_limit_from_end(100.5, 100.0) == 0.001  # past due: at once, never 0
