"""Stop timer, abandon and drain, the termination sequence and `sdexec stats` (issue 4)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable

from .conftest import SDEXEC, run_sdexec, sdexec_units, start_until_ready

Config = Callable[..., str]

# The main process exits at once, leaving a child that ignores TERM (and maybe USR1) behind.
# It says main-done only once the child has set its trap (a delay would not do under TCG).
LINGER = (
    "f=/tmp/linger.$$; sh -c 'trap \"\" {sigs}; : > '$f'; exec sleep 60' & "
    "until [ -e $f ]; do sleep 0.02; done; rm -f $f; echo main-done; exit 0"
)


def _pids(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return out.stdout.split()


def _wait_state(unit: str, state: str, timeout: float) -> None:
    t0 = time.monotonic()
    while True:
        now = subprocess.run(
            ["systemctl", "show", unit, "-P", "ActiveState"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if now == state:
            return
        assert time.monotonic() - t0 < timeout, f"{unit} is {now}, not {state}, after {timeout}s"
        time.sleep(0.2)


def test_stop_timer_kills_leftovers(config: Config, slow: float) -> None:
    cfg = config("sdexec-stop-timer-sec = 2\n")
    t0 = time.monotonic()
    p = run_sdexec(
        "run", "--config", cfg, "--job", "linger1", "--", "sh", "-c", LINGER.format(sigs="TERM")
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    assert p.stdout == "main-done\n"
    assert 1.5 < elapsed < 4 + 1.5 * slow, elapsed  # killed at the first expiry (2 s)
    assert not _pids("exec sleep 60"), "a leftover survived the stop timer"
    drains = json.loads(run_sdexec("drain", "list", "--json", "--config", cfg).stdout)
    assert drains == []


def test_unkillable_leftover_is_abandoned_and_drains(config: Config, slow: float) -> None:
    cfg = config("sdexec-stop-timer-sec = 2\nsdexec-stop-timer-signal = 10\n")
    t0 = time.monotonic()
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "linger2",
        "--",
        "sh",
        "-c",
        LINGER.format(sigs="TERM USR1"),
    )
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert elapsed < 4 + 2 * slow, elapsed
    assert "abandoned" in p.stderr, p.stderr
    listed = run_sdexec("drain", "list", "--json", "--config", cfg)
    drains = json.loads(listed.stdout)
    assert len(drains) == 1 and drains[0]["jobid"] == "linger2", drains
    assert "linger2" in drains[0]["reason"]
    refused = run_sdexec("run", "--config", cfg, "--", "true")
    assert refused.returncode == 125 and "drained" in refused.stderr, refused.stderr
    # The abandoned unit stays for post-mortem; systemd's own stop timeout (2T + 5 s) is the
    # backstop that ends it, and clearing the drain then resets it.
    _wait_state("shell-0-linger2.service", "failed", 15 * slow)
    assert not _pids("exec sleep 60")
    cleared = run_sdexec("drain", "clear", "--config", cfg)
    assert cleared.returncode == 0, cleared.stderr
    assert "shell-0-linger2.service" not in sdexec_units()
    assert run_sdexec("run", "--config", cfg, "--", "true").returncode == 0


def test_cancel_repeats_term_then_kills(config: Config, slow: float) -> None:
    cfg = config('kill-timeout = "0.5s"\nkill-shell-delay = "2s"\n')
    proc = start_until_ready(
        "run",
        "--config",
        cfg,
        "--job",
        "cancel1",
        "--",
        "sh",
        "-c",
        "trap 'echo got-TERM' TERM; echo ready; while :; do sleep 0.05; done",
    )
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 128 + 9, err
    assert out.count("got-TERM") == 2, out  # max-term-count = 2
    assert elapsed < 2 + 1 * slow, elapsed  # SIGKILL at 1 s (2 x 0.5 s)


def test_stats_shows_config_and_running_job(config: Config) -> None:
    cfg = config('kill-timeout = "3s"\nmax-kill-count = 4\n')
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", cfg, "--job", "stats1", "--", "sleep", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            stats = json.loads(run_sdexec("stats", "--json", "--config", cfg).stdout)
            job = stats["jobs"].get("stats1")
            if job and job.get("pid"):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        assert stats["config"]["kill-timeout"] in ("3s", 3, 3.0)
        assert stats["config"]["max-kill-count"] == 4
        assert stats["config"]["term-signal"] == "SIGTERM"
        assert job["unit"] == "shell-0-stats1.service"
        assert job["running"] is True
        assert "kill_count" in job and "kill_shell_count" in job
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 128 + 15
