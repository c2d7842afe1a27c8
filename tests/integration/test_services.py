"""The rest of the [exec] table as behaviour: testexec, service-override, imp and guests,
job-shell, barrier-timeout (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .conftest import SDEXEC, main_pid, run_sdexec, start_until_ready

Config = Callable[..., str]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", "/opt/sdexec")) / "bin"
IMP = "/usr/local/libexec/sdexec-test-imp"  # installed by containers/node from tests/imp
SHELL = str(VENV_BIN / "sdexec-shell")
AS_GUEST = ("--owner", "guest", "--cwd", "/tmp")  # the node's test user, somewhere it may be


def _journal_mentions(text: str, since: str) -> bool:
    out = subprocess.run(
        ["journalctl", "--since", since, "--no-pager", "-q"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return text in out


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def test_testexec_simulates_without_a_unit(config: Config, slow: float) -> None:
    since = _now()
    t0 = time.monotonic()
    p = run_sdexec(
        "run",
        "--config",
        config(),
        "--job",
        "160",
        "--setattr",
        "system.exec.test.run_duration=1s",
        "--",
        "/no/such/program",
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    assert 0.9 < elapsed < 1 + 4 * slow, elapsed
    time.sleep(0.2)
    assert not _journal_mentions("shell-0-160", since)


def test_testexec_wait_status_and_mock_exception(config: Config) -> None:
    p = run_sdexec(
        "run", "--config", config(), "--setattr", "system.exec.test.wait_status=3", "--", "true"
    )
    assert p.returncode == 3, p.stderr
    p = run_sdexec(
        "run",
        "--config",
        config(),
        "--setattr",
        "system.exec.test.mock_exception=init",
        "--",
        "true",
    )
    assert p.returncode == 125 and "mock init exception" in p.stderr, p.stderr


def test_service_override_refused_when_not_allowed(config: Config) -> None:
    since = _now()
    p = run_sdexec(
        "run",
        "--config",
        config(),
        "--job",
        "ovr1",
        "--setattr",
        "system.exec.bulkexec.service=rexec",
        "--",
        "true",
    )
    assert p.returncode == 125
    assert "service-override" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not _journal_mentions("ovr1", since)


def test_service_override_runs_under_rexec(config: Config) -> None:
    cfg = config("service-override = true\n")
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "ovr2",
        "--setattr",
        "system.exec.bulkexec.service=rexec",
        "--",
        "cat",
        "/proc/self/cgroup",
    )
    assert p.returncode == 0, p.stderr
    assert "shell-" not in p.stdout and "ovr2" not in p.stdout, p.stdout
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "ovr3",
        "--setattr",
        "system.exec.bulkexec.service=teleport",
        "--",
        "true",
    )
    assert p.returncode == 2 and "teleport" in p.stderr


def test_guest_without_imp_is_refused(config: Config) -> None:
    since = _now()
    p = run_sdexec("run", "--config", config(), "--job", "guest0", "--owner", "guest", "--", "id")
    assert p.returncode == 125, p.stderr
    assert "exec.imp" in p.stderr
    assert not _journal_mentions("guest0", since)


def test_guest_runs_as_the_guest_through_the_imp(config: Config) -> None:
    cfg = config(f'imp = "{IMP}"\n')
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "guest1",
        *AS_GUEST,
        "--",
        "sh",
        "-c",
        "id -un; cat /proc/self/cgroup",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "guest", p.stdout
    assert "imp-shell-0-guest1.service" in p.stdout, p.stdout


def test_guest_cancel_goes_through_the_imp_with_sigusr1(config: Config) -> None:
    cfg = config(
        f'imp = "{IMP}"\nkill-timeout = "0.5s"\nkill-shell-delay = "1s"\nmax-term-count = 5\n'
    )
    proc = start_until_ready(
        "-v",
        "run",
        "--config",
        cfg,
        "--job",
        "guest2",
        *AS_GUEST,
        "--",
        "sh",
        "-c",
        "trap '' TERM; echo ready; exec sleep 60",
    )
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert "sending SIGUSR1 to the job shell" in err, err
    assert proc.returncode == 128 + 9, err
    left = subprocess.run(["pgrep", "-u", "guest", "sleep"], capture_output=True, check=False)
    assert left.returncode == 1, "a guest process survived"


def test_configured_job_shell_is_the_main_process(config: Config) -> None:
    cfg = config(f'job-shell = "{SHELL}"\n')
    script = (
        "pid=$(systemctl show -P ExecMainPID shell-0-js1.service); "
        "tr '\\0' ' ' < /proc/$pid/cmdline"
    )
    p = run_sdexec("run", "--config", cfg, "--job", "js1", "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    assert SHELL in p.stdout.split()[:3], p.stdout


def _lazy_shell(tmp: Path) -> str:
    """A job shell whose rank 1 never reaches the barrier."""
    script = tmp / "lazy-shell"
    script.write_text(
        f'#!/bin/sh\nif [ "$SDEXEC_RANK" = 1 ]; then exec sleep 60; fi\nexec {SHELL} "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


def test_barrier_timeout_fails_the_job_and_drains(
    config: Config, tmp_path: Path, slow: float
) -> None:
    cfg = config(f'job-shell = "{_lazy_shell(tmp_path)}"\nbarrier-timeout = "2s"\n')
    t0 = time.monotonic()
    p = run_sdexec("run", "--config", cfg, "--job", "bar1", "--shells", "2", "--", "echo", "ran")
    elapsed = time.monotonic() - t0
    assert p.returncode == 125, p.stderr
    assert "barrier" in p.stderr, p.stderr
    assert "ran" not in p.stdout
    assert 1.5 < elapsed < 2 + 6 * slow, elapsed
    drains = json.loads(run_sdexec("drain", "list", "--json", "--config", cfg).stdout)
    assert len(drains) == 1 and "bar1" in drains[0]["reason"], drains
    assert run_sdexec("drain", "clear", "--config", cfg).returncode == 0


def test_barrier_passes_when_all_arrive(config: Config) -> None:
    cfg = config('barrier-timeout = "5s"\n')
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "bar2",
        "--shells",
        "3",
        "--",
        "sh",
        "-c",
        "echo rank-$SDEXEC_RANK",
    )
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.split()) == ["rank-0", "rank-1", "rank-2"]


def test_barrier_timeout_zero_waits(config: Config, tmp_path: Path) -> None:
    cfg = config(f'job-shell = "{_lazy_shell(tmp_path)}"\nbarrier-timeout = "0"\n')
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", cfg, "--job", "bar3", "--shells", "2", "--", "echo", "ran"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=30)
    assert "ran" not in out
    drains = json.loads(run_sdexec("drain", "list", "--json", "--config", cfg).stdout)
    assert drains == [], drains


def test_leftovers_of_an_inactive_unit_are_killed(config: Config) -> None:
    """The IMP dies (kill -9): with KillMode=process the unit fails while the guest's
    processes remain in its cgroup (Flux #6501); sdexec must see and kill them."""
    cfg = config(f'imp = "{IMP}"\nsdexec-stop-timer-sec = 2\n')
    proc = start_until_ready(
        "-v",
        "run",
        "--config",
        cfg,
        "--job",
        "guest3",
        *AS_GUEST,
        "--",
        "sh",
        "-c",
        "echo ready; exec sleep 61",
    )
    os.kill(main_pid("imp-shell-0-guest3.service"), signal.SIGKILL)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + 9, err
    assert "processes remain" in err, err
    left = subprocess.run(["pgrep", "-f", "sleep 61"], capture_output=True, check=False)
    assert left.returncode == 1, "a guest process outlived its unit"


def test_testexec_guests_only_with_allow_guests(config: Config) -> None:
    args = ["--owner", "guest", "--setattr", "system.exec.test.run_duration=0.1s", "--", "true"]
    p = run_sdexec("run", "--config", config(), *args)
    assert p.returncode == 125 and "allow-guests" in p.stderr, p.stderr
    p = run_sdexec("run", "--config", config("[exec.testexec]\nallow-guests = true\n"), *args)
    assert p.returncode == 0, p.stderr
