"""Re-attach after the launcher dies (kill -9): the job's status is still reported (issue 6)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable

import pytest

from .conftest import SDEXEC, run_sdexec, wait_unit

Config = Callable[..., str]


STARTED = ("running", "exited", "failed")


def _start_and_kill(cfg: str, jobid: str, script: str) -> None:
    """Kill the launcher once its unit has started (not after a delay: a start takes 0.1 s on
    the podman node and up to 3 s under TCG)."""
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", cfg, "--job", jobid, "--", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_unit(f"shell-0-{jobid}.service", STARTED)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("jobid", "script", "ended", "code"),
    [
        ("att-running", "sleep 3; exit 42", False, 42),  # (likely) still running on re-attach
        ("att-exited", "sleep 1; exit 0", True, 0),  # exited meanwhile: active/exited
        ("att-failed", "sleep 1; exit 43", True, 43),  # failed meanwhile: failed unit kept
        ("att-signal", "sleep 1; kill -9 $$", True, 137),
    ],
)
def test_attach_reports_status_after_launcher_kill(
    config: Config, jobid: str, script: str, ended: bool, code: int
) -> None:
    cfg = config()
    _start_and_kill(cfg, jobid, script)
    jobs = json.loads(run_sdexec("jobs", "--json", "--config", cfg).stdout)
    assert any(j["jobid"] == jobid for j in jobs), jobs
    if ended:  # the job ends while no launcher watches it
        wait_unit(f"shell-0-{jobid}.service", ("exited", "failed"))
    p = run_sdexec("attach", "--config", cfg, "--job", jobid, "--json", timeout=30)
    assert p.returncode == code, p.stderr
    report = json.loads(p.stderr.strip().splitlines()[-1])
    assert report["exit_code"] == code
    jobs = json.loads(run_sdexec("jobs", "--json", "--config", cfg).stdout)
    assert not any(j["jobid"] == jobid for j in jobs), "the record outlived the job"


def test_attach_refuses_unknown_and_live_jobs(config: Config) -> None:
    cfg = config()
    p = run_sdexec("attach", "--config", cfg, "--job", "nosuchjob")
    assert p.returncode == 125 and "no record" in p.stderr
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", cfg, "--job", "att-live", "--", "sleep", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_unit("shell-0-att-live.service", ("running",))
        p = run_sdexec("attach", "--config", cfg, "--job", "att-live")
        assert p.returncode == 125 and "still tracked" in p.stderr, p.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_units_without_a_record_are_reported(config: Config) -> None:
    cfg = config()
    subprocess.run(["systemd-run", "-q", "--unit", "shell-0-orphan1", "sleep", "30"], check=True)
    try:
        jobs = json.loads(run_sdexec("jobs", "--json", "--config", cfg).stdout)
        assert {"jobid": None, "unit": "shell-0-orphan1.service", "state": "orphan"} in jobs
        text = run_sdexec("jobs", "--config", cfg).stdout
        assert "orphan unit (no record here): shell-0-orphan1.service" in text
    finally:
        subprocess.run(["systemctl", "stop", "shell-0-orphan1"], check=False)
