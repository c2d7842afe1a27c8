"""`sdexec serve`, socket-activated (units/sdexec.socket, installed in the node by
containers/node): `sdexec run` without --config hands the job to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import SDEXEC, main_pid, start_until_ready

SOCKET = "/run/sdexec/sdexec.sock"


def _server_pid() -> int:
    return main_pid("sdexec.service")


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SDEXEC_CONFIG", "SDEXEC_NO_SERVER")}
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*SDEXEC, *args], capture_output=True, text=True, timeout=60, check=False, env=env, **kw
    )


@pytest.fixture(autouse=True)
def server() -> Iterator[None]:
    if not os.path.exists(SOCKET):
        pytest.fail("sdexec.socket is not listening in the node (containers/node up installs it)")
    subprocess.run(["systemctl", "reset-failed", "sdexec.service"], check=False)
    yield


def test_run_goes_through_the_server(tmp_path: Path) -> None:
    # the job runs until the test has looked (not for a delay: `sdexec jobs` alone takes
    # seconds under TCG)
    go = tmp_path / "go"
    proc = start_until_ready(
        "run", "--job", "srv1", "--", "sh", "-c",
        f"echo ready; while [ ! -e {go} ]; do sleep 0.05; done; exit 7",
    )  # fmt: skip
    try:
        jobs = json.loads(run("jobs", "--json").stdout)
        (rec,) = [j for j in jobs if j["jobid"] == "srv1"]
        assert rec["launcher_pid"] == _server_pid() != 0, rec
    finally:
        go.touch()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err


def test_stdio_status_and_errors_through_the_server() -> None:
    p = run("run", "--job", "srv2", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    assert (p.returncode, p.stdout) == (3, "to-out\n"), p.stderr
    assert "to-err" in p.stderr
    assert run("run", "--", "sh", "-c", "kill -9 $$").returncode == 137
    p = run("run", "--", "/no/such/program")
    assert p.returncode == 127 and "/no/such/program" in p.stderr
    p = run("run", "--rank", "x", "--", "true")
    assert p.returncode == 2 and "--rank" in p.stderr and "Traceback" not in p.stderr
    p = run("run", "--", "tr", "a-z", "A-Z", input="hello\n")
    assert p.stdout == "HELLO\n"


def test_ctrl_c_cancels_through_the_server() -> None:
    proc = start_until_ready(
        "run",
        "--job",
        "srv3",
        "--",
        "sh",
        "-c",
        "trap 'echo got-TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "got-TERM" in out and proc.returncode == 42, (out, err)


def test_server_restart_loses_no_job() -> None:
    proc = start_until_ready(
        "run", "--job", "srv4", "--", "sh", "-c", "echo ready; sleep 3; exit 9"
    )
    before = _server_pid()
    subprocess.run(["systemctl", "restart", "sdexec.service"], check=True, timeout=30)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 9, err
    assert "following job srv4 again" in err
    assert _server_pid() not in (0, before)
    jobs = json.loads(run("jobs", "--json").stdout)
    assert not [j for j in jobs if j.get("jobid") == "srv4"], jobs


def test_a_caller_that_is_not_root_is_a_guest() -> None:
    """Who the job belongs to comes from the socket, not the request: no imp, no guests."""
    p = subprocess.run(
        ["runuser", "-u", "guest", "--", "/opt/sdexec/bin/sdexec", "run", "--", "id", "-un"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/tmp",
    )
    assert p.returncode == 125, (p.stdout, p.stderr)
    assert "exec.imp" in p.stderr
    p = subprocess.run(
        [
            "runuser",
            "-u",
            "guest",
            "--",
            "/opt/sdexec/bin/sdexec",
            "run",
            "--owner",
            "root",
            "--",
            "id",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/tmp",
    )
    assert p.returncode == 125 and "only the instance owner" in p.stderr, p.stderr
