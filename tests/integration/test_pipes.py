"""A job in a shell pipeline ends like one: SIGPIPE (141) when the reader goes away.

Issue 9 M9: ``SDEXEC_NO_SERVER=1 sdexec run -- yes | head -c 10`` never ended (the relay
discarded output forever after EPIPE). Issue 9 "Low": jobs ran with SIGPIPE ignored
(systemd's IgnoreSIGPIPE=yes), so ``yes | head`` inside a job exited 1 "Broken pipe".
Issue 10: ``--rank 4 --shells 2`` failed at the start barrier.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from .conftest import SDEXEC, run_sdexec

Config = Callable[..., str]
SOCKET = "/run/sdexec/sdexec.sock"


def _server_env() -> dict[str, str]:
    """``sdexec run`` without --config and without SDEXEC_NO_SERVER: the node's server."""
    if not os.path.exists(SOCKET):
        pytest.fail("sdexec.socket is not listening in the node (containers/node up installs it)")
    return {k: v for k, v in os.environ.items() if k not in ("SDEXEC_CONFIG", "SDEXEC_NO_SERVER")}


def _head(args: list[str], env: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """``sdexec ARGS | head -c 10``: read 10 bytes, close the pipe, wait for sdexec to end."""
    proc = subprocess.Popen(
        [*SDEXEC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(10)
    proc.stdout.close()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("sdexec run did not end after its reader went away") from None
    return rc, head, proc.stderr.read().decode(errors="replace")


@pytest.mark.parametrize("service", ["sdexec", "rexec"])
def test_in_process_job_dies_of_sigpipe_when_our_reader_goes(config: Config, service: str) -> None:
    cfg = config(service=service)
    env = {**os.environ, "SDEXEC_NO_SERVER": "1"}
    rc, head, err = _head(["run", "--config", cfg, "--job", f"pipe-{service}", "--", "yes"], env)
    assert head == b"y\n" * 5
    assert rc == 141, err  # 128 + SIGPIPE, as `yes | head` in a shell
    jobs = run_sdexec("jobs", "--config", cfg)
    assert f"pipe-{service}" not in jobs.stdout, jobs.stdout  # no stale record


def test_server_job_dies_of_sigpipe_when_our_reader_goes() -> None:
    rc, head, err = _head(["run", "--job", "pipe-srv", "--", "yes"], _server_env())
    assert head == b"y\n" * 5
    assert rc == 141, err


@pytest.mark.parametrize("service", ["sdexec", "rexec"])
def test_sigpipe_is_default_inside_a_job(config: Config, service: str) -> None:
    """``yes | head`` inside the job: yes dies of SIGPIPE, not "Broken pipe" (exit 1)."""
    cfg = config(service=service)
    p = run_sdexec(
        "run", "--config", cfg, "--job", f"inner-{service}", "--",
        "bash", "-c", 'yes | head -c 4; echo " ${PIPESTATUS[*]}"; grep SigIgn /proc/self/status',
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("y\ny\n 141 0\n"), p.stdout
    assert "Broken pipe" not in p.stderr
    # SIGPIPE (bit 13) is not in the job's ignored set
    (ignored,) = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("SigIgn")]
    assert not int(ignored, 16) & (1 << 12), ignored


def test_sigpipe_is_default_inside_a_server_job() -> None:
    p = subprocess.run(
        [*SDEXEC, "run", "--job", "inner-srv", "--",
         "bash", "-c", 'yes | head -c 4; echo " ${PIPESTATUS[*]}"'],
        capture_output=True, text=True, timeout=60, env=_server_env(), check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == "y\ny\n 141 0\n", (p.stdout, p.stderr)


def test_shells_with_a_rank_offset_pass_the_barrier(config: Config) -> None:
    """A job's second node runs ranks 4..5: they meet at the barrier as 0..1 would."""
    cfg = config('barrier-timeout = "60s"\n')
    p = run_sdexec(
        "run", "--config", cfg, "--job", "off1", "--rank", "4", "--shells", "2", "--",
        "sh", "-c", "echo rank-$SDEXEC_RANK",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.split()) == ["rank-4", "rank-5"]


def test_rank_offset_true_through_the_server() -> None:
    p = subprocess.run(
        [*SDEXEC, "run", "--rank", "4", "--shells", "2", "--", "true"],
        capture_output=True, text=True, timeout=120, env=_server_env(), check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("attr", ["override=1", "reattach_finish=1"])
def test_testexec_override_is_refused_not_hung(config: Config, attr: str) -> None:
    """Nothing could start an override job: it hung forever (issue 10); now exit 2, one line."""
    cfg = config()
    p = run_sdexec(
        "run", "--config", cfg, "--job", "ovr1", "--setattr", f"system.exec.test.{attr}",
        "--", "true", timeout=60,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"sdexec: system.exec.test.{attr.partition('=')[0]}: not supported")
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert "ovr1" not in run_sdexec("jobs", "--config", cfg).stdout


def test_testexec_override_is_refused_through_the_server() -> None:
    p = subprocess.run(
        [*SDEXEC, "run", "--setattr", "system.exec.test.override=1", "--", "true"],
        capture_output=True, text=True, timeout=60, env=_server_env(), check=False,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert "system.exec.test.override: not supported" in p.stderr
