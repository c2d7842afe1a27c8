"""``sdexec epilog`` on a real systemd: what a resource manager's Epilog runs when its job ends.

The Slurm cluster (tests/cluster) runs it from slurmd; here the same command meets the cases
a cluster cannot provoke at will: clients killed at once (their units run on, their records
stay), a job of another Slurm job that must be left alone, processes that ignore term-signal,
units that outlast --timeout (the node drains), a node already drained that the resource
manager could not be told about, and bad arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdexec.systemd.unitname import unit_name

from .conftest import run_sdexec, sdexec_units, start_until_ready

Config = Callable[..., str]


def _orphan(cfg: str, jobid: str, script: str = "echo ready; exec sleep 300") -> str:
    """A running job whose client died at once (KillOnBadExit, OOM): its unit and record stay."""
    proc = start_until_ready("run", "--config", cfg, "--job", jobid, "--", "sh", "-c", script)
    proc.kill()
    proc.communicate(timeout=30)
    unit = unit_name(jobid)
    assert unit in sdexec_units(), f"{unit} did not outlive its client"
    return unit


def _epilog(cfg: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    p = run_sdexec("epilog", "--config", cfg, "--json", *args, timeout=120, env=env)
    report = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, report, p.stderr


def _records(cfg: str) -> list[str]:
    p = run_sdexec("jobs", "--config", cfg, "--json")
    assert p.returncode == 0, p.stderr
    return [j["jobid"] for j in json.loads(p.stdout)]


def test_epilog_ends_its_jobs_units_and_no_others(config: Config) -> None:
    cfg = config()
    mine = [_orphan(cfg, "7001.0"), _orphan(cfg, "7001.1")]
    other = _orphan(cfg, "70011.0")  # a job id that 7001 is a prefix of: not 7001's
    rc, report, err = _epilog(cfg, "--job", "7001")
    assert rc == 0, err
    assert sorted(report["ended"]) == sorted(mine) and report["problems"] == []
    assert {"record 7001.0", "record 7001.1"} <= set(report["cleaned"])
    units = sdexec_units()
    assert not set(mine) & set(units) and other in units
    assert _records(cfg) == ["70011.0"]
    # Slurm's way: the job in SLURM_JOB_ID
    rc, report, err = _epilog(cfg, env={**os.environ, "SLURM_JOB_ID": "70011"})
    assert rc == 0 and report["ended"] == [other], err
    assert other not in sdexec_units() and _records(cfg) == []


def test_processes_ignoring_term_signal_get_kill_signal(config: Config) -> None:
    cfg = config('kill-timeout = "0.5s"\n')
    unit = _orphan(cfg, "7101.0", "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    rc, report, err = _epilog(cfg, "--job", "7101")
    assert rc == 0 and report["ended"] == [unit], err
    assert unit not in sdexec_units()


def test_units_outlasting_the_timeout_drain_the_node(config: Config, tmp_path: Path) -> None:
    told = tmp_path / "told"
    cfg = config(
        'kill-timeout = "300s"\n',
        sdexec=f'drain-command = ["sh", "-c", "echo \\"$0\\" >> {told}", "{{reason}}"]\n',
    )
    unit = _orphan(cfg, "7201.0", "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    try:
        rc, report, err = _epilog(cfg, "--job", "7201", "--timeout", "1s")
        assert rc == 1, err
        assert unit in sdexec_units()
        (problem,) = report["problems"]
        assert f"{unit} of job 7201 still running 1s after its termination began" in problem
        assert f"sdexec: epilog: job 7201: {problem}" in err
        assert "still running" in report["drained"]
        assert "still running" in told.read_text()  # the resource manager was told
    finally:
        subprocess.run(["systemctl", "kill", "-s", "KILL", unit], check=False)
        run_sdexec("epilog", "--config", cfg, "--job", "7201", timeout=120)
        run_sdexec("drain", "clear", "--config", cfg)
    assert unit not in sdexec_units()


def test_a_drain_the_resource_manager_was_not_told_of_fails_the_epilog(config: Config) -> None:
    """No drain-command: Slurm learns of the drain from the Epilog's failure, never loses it."""
    cfg = config()  # no drain-command (the default)
    p = run_sdexec("drain", "set", "--config", cfg, "disk on fire")
    assert p.returncode == 0, p.stderr
    try:
        rc, report, err = _epilog(cfg, "--job", "7301")
        assert rc == 1 and report["drained"] == "disk on fire", err
        assert report["ended"] == [] and len(report["problems"]) == 1
        assert "could not be told through drain-command" in err
    finally:
        assert run_sdexec("drain", "clear", "--config", cfg).returncode == 0
    rc, report, err = _epilog(cfg, "--job", "7301")
    assert rc == 0 and "drained" not in report, err


def test_bad_arguments_are_usage_errors(config: Config) -> None:
    cfg = config()
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    for args, words in (
        ((), "no job given (--job ID, or SLURM_JOB_ID"),
        (("--job", "7401", "--timeout", "0"), "--timeout must be more than 0"),
        (("--job", "7401", "--timeout", "soon"), "--timeout"),
        (("--job", "a\x01b"), "--job: the job id contains control characters"),
    ):
        p = run_sdexec("epilog", "--config", cfg, *args, env=env)
        assert p.returncode == 2, (args, p.stderr)
        assert words in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
