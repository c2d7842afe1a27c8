"""End-of-job accounting against a real systemd (issue 14): ``sdexec run --json``/``-v``, the
library's ``Job.stats()``, through the server (and its final message) and via ``attach``.

On the podman node (cgroup v1 memory, systemd 252) systemd itself gives none of the figures
once the unit exited: they come from the job shell, measured inside the unit (accounting.py).
On the cgroup-v2 VM the same tests hold. Every test also checks, through the autouse fixture,
that no unit is left behind for the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sdexec import JobSpec, Launcher, load_config
from sdexec.exec.accounting import FIGURES

from .conftest import SDEXEC, run_sdexec, wait_unit
from .test_security import IMP, as_guest, server_conf, server_env  # noqa: F401 (fixture)

MIB = 1 << 20
ALLOC = 'x = bytearray(200 << 20); x[::4096] = b"y" * len(x[::4096])'
"""Touch every page: 200 MiB resident, whatever the allocator does lazily."""


def _report(stderr: str) -> dict[str, Any]:
    lines = [x for x in stderr.splitlines() if x.startswith("{")]
    assert len(lines) == 1, stderr
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return report


def _check_types(acct: dict[str, Any]) -> None:
    assert set(acct) == {*FIGURES, "sources"}, acct
    for key in FIGURES:
        value = acct[key]
        want = float if key in ("wall_time", "cpu_time", "cpu_user", "cpu_system") else int
        assert value is None or type(value) is want, (key, value)
        assert value is None or value >= 0, (key, value)


def _assert_allocated(acct: dict[str, Any]) -> None:
    _check_types(acct)
    assert acct["memory_peak"] >= 200 * MIB, acct
    assert acct["cpu_time"] > 0 and acct["cpu_user"] is not None, acct
    assert acct["cpu_system"] is not None and acct["wall_time"] > 0, acct


def test_run_json_reports_memory_peak_and_cpu_in_process(config: Any) -> None:
    p = run_sdexec("run", "--config", config(), "--json", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    report = _report(p.stderr)
    (shell,) = report["shells"]
    assert (shell["result"], shell["exit_code"], shell["signal"]) == ("success", 0, None)
    _assert_allocated(shell["accounting"])


def test_run_verbose_ends_with_one_human_line_per_shell(config: Any) -> None:
    p = run_sdexec("run", "--config", config(), "-v", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    last = p.stderr.splitlines()[-1]
    assert last.startswith("sdexec: shell-0-") and "Finished with result: success;" in last, last
    assert "Main process terminated with: code=exited/status=0;" in last
    for part in ("Service runtime: ", "CPU time consumed: ", "IO bytes read: ", "Tasks peak: "):
        assert part in last
    peak = last.split("Memory peak: ")[1].split(";")[0]
    assert peak.endswith("M") and float(peak[:-1]) >= 200, last


def test_without_json_or_v_no_shell_is_added(config: Any, tmp_path: Path) -> None:
    """The plain path pays nothing: the command is the unit's main process, as before."""
    out = tmp_path / "comm"
    script = f"cat /proc/$PPID/comm > {out}"  # the main process is this sh, its parent PID 1
    p = run_sdexec("run", "--config", config(), "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    assert out.read_text().strip() == "systemd"


def test_io_bytes_read_are_reported(config: Any) -> None:
    """50 MB read past the page cache (evicted first): IO accounting sees them."""
    data = Path("/var/tmp/sdexec-acct-50m")
    with data.open("wb") as f:
        f.write(os.urandom(50 * 1000 * 1000))
        f.flush()
        os.fsync(f.fileno())
    try:
        fstype = subprocess.run(
            ["stat", "-f", "-c", "%T", str(data)], capture_output=True, text=True, check=True
        ).stdout.strip()
        code = (
            f"import os\nfd = os.open({str(data)!r}, os.O_RDONLY)\n"
            "os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n"
            "while os.read(fd, 1 << 20): pass\n"
        )
        p = run_sdexec("run", "--config", config(), "--json", "--", "python3", "-c", code)
        assert p.returncode == 0, p.stderr
        acct = _report(p.stderr)["shells"][0]["accounting"]
        _check_types(acct)
        if fstype in ("tmpfs", "ramfs"):
            # no block device behind it: no IO to account (0 or null, never a made-up figure)
            assert acct["io_read_bytes"] in (0, None), acct
        else:
            assert acct["io_read_bytes"] >= 45 * 1000 * 1000, (fstype, acct)
    finally:
        data.unlink(missing_ok=True)


def test_two_shells_each_report(config: Any) -> None:
    p = run_sdexec(
        "run", "--config", config(), "--shells", "2", "--json", "--", "python3", "-c", ALLOC
    )
    assert p.returncode == 0, p.stderr
    shells = _report(p.stderr)["shells"]
    assert [s["unit"].split("-")[1] for s in shells] == ["0", "1"]
    for shell in shells:
        _assert_allocated(shell["accounting"])


def test_a_job_killed_by_a_signal_still_reports(config: Any) -> None:
    code = f"{ALLOC}\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    p = run_sdexec("run", "--config", config(), "--json", "--", "python3", "-c", code)
    assert p.returncode == 137, p.stderr
    (shell,) = _report(p.stderr)["shells"]
    assert (shell["signal"], shell["result"]) == (9, "signal")
    _assert_allocated(shell["accounting"])


def test_a_cancelled_job_reports_what_could_be_had(config: Any, tmp_path: Path) -> None:
    """Ctrl-C: the termination sequence's SIGTERM reaches the command through the shell."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", config(), "--json", "--", "python3", "-c",
         f"{ALLOC}\nopen({str(ready)!r}, 'w').close()\nimport time\ntime.sleep(600)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not ready.exists():  # the job says when it holds its memory
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    _assert_allocated(_report(err)["shells"][0]["accounting"])


def test_library_job_stats(config: Any) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Launcher(load_config(config())) as launcher:
            job = await launcher.start(
                JobSpec(jobid="acct-lib", argv=["python3", "-c", ALLOC], accounting=True)
            )
            assert await job.wait() == 0
            plain = await launcher.start(JobSpec(jobid="acct-lib2", argv=["true"]))
            assert await plain.wait() == 0
            acct: dict[str, Any] = job.stats()["accounting"]
            return acct, plain.stats()["accounting"]

    asked, plain = asyncio.run(main())
    _assert_allocated(asked)
    _check_types(plain)
    # not asked: what costs nothing (the wall time between the launcher's events), else null
    assert plain["wall_time"] is not None and plain["sources"]["wall_time"] == "launcher"
    assert plain["memory_peak"] is None and plain["cpu_time"] is None


def test_a_unit_killed_whole_reports_null_not_zero(config: Any) -> None:
    """SIGKILL to every process of the unit (the shell too): nobody measured. What only the
    shell could say is null; the wall time (the launcher's own events) is still known."""

    async def main() -> dict[str, Any]:
        async with Launcher(load_config(config())) as launcher:
            job = await launcher.start(
                JobSpec(
                    jobid="acct-killed",
                    argv=["sh", "-c", "echo ready; exec sleep 600"],
                    accounting=True,
                )
            )
            assert job.stdout is not None
            assert await job.stdout.readline() == b"ready\n"
            job.kill()
            assert await job.wait() == -signal.SIGKILL
            acct: dict[str, Any] = job.stats()["accounting"]
            return acct

    acct = asyncio.run(main())
    _check_types(acct)
    assert acct["wall_time"] is not None, acct
    # on a host whose systemd keeps figures (v2: CPUUsageNSec) they are systemd's, never 0s
    # made up for the shell that could not report
    for key in ("cpu_user", "cpu_system", "tasks_peak"):
        assert acct[key] is None, acct
    for key in ("memory_peak", "io_read_bytes", "cpu_time"):
        assert acct[key] is None or acct["sources"][key] == "systemd", acct


def test_a_gated_job_with_a_checked_limit_reports(config: Any) -> None:
    """MemoryMax is checked in the kernel before the program runs (the start gate, whose sh
    then execs our shell): the figures are there all the same, under the limit."""
    cfg = config('[exec.sdexec-properties]\nMemoryMax = "400M"\n')
    p = run_sdexec("run", "--config", cfg, "--json", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    acct = _report(p.stderr)["shells"][0]["accounting"]
    _assert_allocated(acct)
    assert acct["memory_peak"] <= 400 * MIB, acct


def test_attach_json_reports_what_the_first_launcher_asked(config: Any) -> None:
    """The launcher is killed; the job ends alone; attach reads the figures its shell left
    in the unit (RemainAfterExit keeps the status, and the status keeps the figures)."""
    cfg = config()
    jobid = "acct-attach"
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--config", cfg, "--job", jobid, "--json", "--", "python3", "-c",
         f"{ALLOC}\nimport time\ntime.sleep(1)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    unit = f"shell-0-{jobid}.service"
    wait_unit(unit, ("running",))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_unit(unit, ("exited",))
    p = run_sdexec("attach", "--config", cfg, "--job", jobid, "--json")
    assert p.returncode == 0, p.stderr
    (shell,) = _report(p.stderr)["shells"]
    assert shell["result"] == "success"
    _assert_allocated(shell["accounting"])


# --- through the node's server ----------------------------------------------------------------


def _via_server(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SDEXEC, *args], capture_output=True, text=True, timeout=120, check=False,
        env=server_env(), **kw,
    )  # fmt: skip


def test_through_the_server_json_and_final_message() -> None:
    p = _via_server("run", "--json", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    _assert_allocated(_report(p.stderr)["shells"][0]["accounting"])
    p = _via_server("run", "-v", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    assert "Memory peak: " in p.stderr.splitlines()[-1], p.stderr
    # the final message itself carries the report, for clients that read it (raw here)
    from .test_security import raw, reply, run_request

    final = reply(raw(run_request(["--json", "--", "python3", "-c", ALLOC]), guest=False))
    assert final["exit"] == 0, final
    report = final["report"]
    assert isinstance(report, dict)
    _assert_allocated(report["shells"][0]["accounting"])
    # an old client reads "exit" and "stderr" only: both are as they were
    assert isinstance(final["stderr"], list) and json.loads(final["stderr"][0]) == report


def _wait_gone(unit: str, timeout: float = 120) -> None:
    """Until systemd no longer has the unit (the server ended the job: an event, no delay)."""
    deadline = time.monotonic() + timeout
    while True:
        state = subprocess.run(
            ["systemctl", "show", "-P", "LoadState", unit], capture_output=True, text=True,
            check=False,
        ).stdout.strip()  # fmt: skip
        if state == "not-found":
            return
        assert time.monotonic() < deadline, f"{unit} still {state}"
        time.sleep(0.05)


@pytest.mark.parametrize("ended", [False, True], ids=["running", "ended-alone"])
def test_through_the_server_attach_after_the_client_died(tmp_path: Path, ended: bool) -> None:
    """The server runs the job on; ``attach`` gets the figures, from the job it still runs,
    or from the record it kept for whoever attaches (the job ended with nobody there)."""
    jobid = f"acct-srv-attach-{int(ended)}"
    go = tmp_path / "go"
    proc = subprocess.Popen(
        [*SDEXEC, "run", "--job", jobid, "--json", "--", "python3", "-c",
         f"{ALLOC}\nimport os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=server_env(),
    )  # fmt: skip
    wait_unit(f"shell-0-{jobid}.service", ("running",))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    go.touch()
    if ended:
        _wait_gone(f"shell-0-{jobid}.service")
    p = _via_server("attach", "--job", jobid, "--json", "-v")
    assert p.returncode == 0, p.stderr
    _assert_allocated(_report(p.stderr)["shells"][0]["accounting"])
    last = p.stderr.splitlines()[-1]  # -v: the server adds the summary line
    assert f"shell-0-{jobid}.service: Finished with result: success;" in last, p.stderr


def test_a_guests_job_through_the_imp(server_conf: Any) -> None:  # noqa: F811
    """The IMP is the unit's main process (root): it measures; the guest's shell is not heard."""
    server_conf(f'[exec]\nimp = "{IMP}"\n')
    p = as_guest("run", "--json", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    (shell,) = _report(p.stderr)["shells"]
    assert shell["unit"].startswith("imp-shell-0-")
    _assert_allocated(shell["accounting"])
    p = as_guest("run", "-v", "--", "python3", "-c", "import os; os.kill(os.getpid(), 9)")
    assert p.returncode == 137, p.stderr
    assert "code=killed/signal=SIGKILL" in p.stderr.splitlines()[-1], p.stderr


@pytest.mark.parametrize("mode", ["systemd"])
def test_a_guests_job_with_systemd_credentials(server_conf: Any, mode: str) -> None:  # noqa: F811
    server_conf('[sdexec]\nguest-credentials = "systemd"\n')
    p = as_guest("run", "--json", "--", "python3", "-c", ALLOC)
    assert p.returncode == 0, p.stderr
    _assert_allocated(_report(p.stderr)["shells"][0]["accounting"])
