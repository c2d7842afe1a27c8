"""``sdexec attach`` for a status nobody was there to take, and for what cannot be re-attached.

A job whose client was killed goes on under the server, which keeps its status when it ends;
``sdexec attach`` gives that status once (the README's recovery after a client was killed).
A rexec job is a plain process group: once its launcher died, nothing can report its status,
and attach says so instead of pretending.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import SDEXEC, run_sdexec, start_until_ready

Config = Callable[..., str]
WAIT = 60.0  # bound for events that take well under a second


def _server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SDEXEC_CONFIG", "SDEXEC_NO_SERVER")}


def _server_record(jobid: str) -> dict[str, Any] | None:
    p = run_sdexec("jobs", "--json", env=_server_env())
    assert p.returncode == 0, p.stderr
    return next((j for j in json.loads(p.stdout) if j.get("jobid") == jobid), None)


def _journal_since(since: str, text: str) -> bool:
    out = subprocess.run(
        ["journalctl", "-u", "sdexec.service", "--since", since, "--no-pager", "-q"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return text in out


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


DROP_IN = Path("/run/systemd/system/sdexec.service.d/zz-test-verbose.conf")


@pytest.fixture
def verbose_server() -> Iterator[None]:
    """The node's server at INFO (``sdexec -v serve``): what it decides, in the journal."""
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text("[Service]\nExecStart=\nExecStart=/usr/local/bin/sdexec -v serve\n")
    try:
        subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60)
        subprocess.run(["systemctl", "restart", "sdexec.service"], check=True, timeout=60)
        yield
    finally:
        DROP_IN.unlink()
        subprocess.run(["systemctl", "daemon-reload"], check=True, timeout=60)
        subprocess.run(["systemctl", "restart", "sdexec.service"], check=True, timeout=60)


@pytest.mark.usefixtures("verbose_server")
def test_a_status_kept_for_attach_after_the_client_died(tmp_path: Path) -> None:
    go = tmp_path / "go"
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    script = f"echo ready; while [ ! -e {go} ]; do sleep 0.05; done; exit 6"
    proc = start_until_ready("run", "--job", "kept1", "--", "sh", "-c", script, env=_server_env())
    proc.kill()
    proc.wait(timeout=30)  # (its stdout and stderr are the job's too: open until the job ends)
    # the server sees its client's connection end: the job goes on, its status will be kept
    _until(
        "the server noticed the client went away",
        lambda: _journal_since(since, "job kept1: its client went away; the job goes on"),
    )
    go.touch()
    _until("the job's status was recorded", lambda: (_server_record("kept1") or {}).get(
        "state") == "finished")  # fmt: skip
    p = subprocess.run(
        [*SDEXEC, "attach", "--job", "kept1"], env=_server_env(), capture_output=True,
        text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    assert p.returncode == 6, p.stderr
    for pipe in (proc.stdout, proc.stderr):
        assert pipe is not None
        pipe.close()
    assert _server_record("kept1") is None, "the status is given once"
    again = run_sdexec("attach", "--job", "kept1", env=_server_env())
    assert again.returncode == 125 and "no record of job kept1" in again.stderr, again.stderr


def test_a_rexec_job_whose_launcher_died_cannot_be_reattached(config: Config) -> None:
    cfg = config(service="rexec")
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", cfg, "--job", "kept-rx", "--", "sh", "-c",
         "echo $$; exec sleep 300"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=30)
    try:
        p = run_sdexec("attach", "--config", cfg, "--job", "kept-rx")
        assert p.returncode == 125, p.stderr
        assert "ran under rexec: only sdexec units can be re-attached" in p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
    finally:
        os.killpg(pid, signal.SIGKILL)  # its own group: what a reboot or an admin would end
