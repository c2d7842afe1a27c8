"""`sdexec run` end to end in the systemd node (issue 3's acceptance)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from .conftest import run_sdexec

Config = Callable[..., str]


def test_stdio_and_exit_code(config: Config) -> None:
    cfg = config()
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "123",
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 7",
    )
    assert p.returncode == 7, p.stderr
    assert p.stdout == "to-out\n"
    assert "to-err\n" in p.stderr


def test_killed_by_signal_is_128_plus_n(config: Config) -> None:
    p = run_sdexec("run", "--config", config(), "--", "sh", "-c", "kill -9 $$")
    assert p.returncode == 137, p.stderr


def test_missing_program_is_a_clear_error(config: Config) -> None:
    p = run_sdexec("run", "--config", config(), "--", "/no/such/program")
    assert 0 < p.returncode < 128
    assert p.stderr.count("\n") == 1, p.stderr
    assert "/no/such/program" in p.stderr and "Traceback" not in p.stderr


def test_job_runs_in_its_own_unit(config: Config) -> None:
    p = run_sdexec("run", "--config", config(), "--job", "4242", "--", "cat", "/proc/self/cgroup")
    assert p.returncode == 0, p.stderr
    assert "shell-0-4242.service" in p.stdout


def test_dollar_reaches_the_program_literally(config: Config) -> None:
    p = run_sdexec("run", "--config", config(), "--", "sh", "-c", "echo A:$$:$0:B")
    assert p.returncode == 0, p.stderr
    pid = p.stdout.strip().split(":")[1]
    assert pid.isdigit(), p.stdout


def test_stdin_is_relayed(config: Config) -> None:
    p = run_sdexec("run", "--config", config(), "--", "tr", "a-z", "A-Z", input="hello\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "HELLO\n"


def test_no_unit_left_after_failure(config: Config) -> None:
    p = run_sdexec("run", "--config", config(), "--", "sh", "-c", "exit 3")
    assert p.returncode == 3
    out = subprocess.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "shell-" not in out


def test_user_manager(config: Config) -> None:
    """--user: the job is a unit of the calling user's own manager (root's user@0 here)."""
    subprocess.run(["systemctl", "start", "user@0.service"], check=True)
    p = run_sdexec(
        "run",
        "--user",
        "--config",
        config(),
        "--job",
        "user1",
        "--",
        "sh",
        "-c",
        "cat /proc/self/cgroup; exit 5",
    )
    assert p.returncode == 5, p.stderr
    assert "user@0.service" in p.stdout and "shell-0-user1.service" in p.stdout, p.stdout
    assert "WARNING" not in p.stderr, p.stderr
