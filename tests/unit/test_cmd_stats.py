"""``sdexec stats`` and ``sdexec jobs`` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sdexec.cli.cmd_stats import describe_status, job_stats
from sdexec.cli.main import main
from sdexec.exec.statedb import JobRecord, StateDB


def _config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "exec.toml"
    path.write_text(f"{extra}\n[sdexec]\nstate-dir = {json.dumps(str(tmp_path / 'state'))}\n")
    return str(path)


def _job(jobid: str, **kw: Any) -> JobRecord:
    base: dict[str, Any] = {
        "jobid": jobid,
        "unit": f"shell-0-{jobid}.service",
        "service": "sdexec",
        "owner_uid": os.getuid(),
        "manager": "system",
        "launcher_pid": os.getpid(),
        "state": "running",
        "created_at": time.time(),
    }
    base.update(kw)
    return JobRecord(**base)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


TERM = {
    "kill_timeout": 5.0,
    "kill_count": 3,
    "kill_shell_count": 0,
    "term_count": 2,
    "exception_in_progress": True,
    "kill_shell_delay_remaining": 10.0,
    "started_at": 100.0,
    "reason": "cancel",
    "state": "signalling-tasks",
}


def _populate(tmp_path: Path) -> None:
    with StateDB.open(str(tmp_path / "state")) as db:
        db.add_job(_job("f1", pid=4242))
        db.update_job("f1", 0, state="terminating", termination=TERM)
        db.update_job("f1", 0, updated_at=time.time() - 4)  # snapshot taken 4 s ago
        db.add_job(_job("f2", owner_uid=os.getuid() + 1, service="rexec", state="starting"))
        db.add_job(_job("f3", state="finished", exit_status=2 << 8, error="boom"))
        db.drain("unkillable user processes for job f0", jobid="f0")


def test_stats_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, '[exec]\nkill-timeout = "2s"\nservice = "sdexec"\n')
    _populate(tmp_path)
    assert main(["stats", "--config", cfg, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    config = data["config"]
    assert config["kill-timeout"] == 2.0
    assert config["kill-shell-delay"] == 10.0  # 5 x kill-timeout
    assert config["term-signal"] == "SIGTERM" and config["max-kill-count"] == 8
    assert config["sdexec-stop-timer-sec"] == 30
    assert config["sdexec-stop-timer-signal"] == "SIGUSR1"
    assert config["service"] == "sdexec"
    assert config["state-dir"] == str(tmp_path / "state")

    assert [d["reason"] for d in data["drained"]] == ["unkillable user processes for job f0"]
    assert set(data["jobs"]) == {"f1", "f2"}  # live jobs only

    f1 = data["jobs"]["f1"]
    assert f1["unit"] == "shell-0-f1.service" and f1["pid"] == 4242
    assert (f1["service"], f1["state"]) == ("sdexec", "terminating")
    assert (f1["started"], f1["running"], f1["multiuser"]) == (True, True, False)
    assert f1["launcher_pid"] == os.getpid() and f1["launcher_alive"] is True
    assert (f1["kill_timeout"], f1["kill_count"], f1["kill_shell_count"]) == (5.0, 3, 0)
    assert f1["exception_in_progress"] is True
    assert 5.0 <= f1["kill_shell_delay_remaining"] <= 6.5  # 10 s, aged by the 4 s since
    assert f1["termination_state"] == "signalling-tasks"  # the job's own state wins "state"

    f2 = data["jobs"]["f2"]
    assert (f2["started"], f2["running"], f2["multiuser"]) == (False, False, True)
    assert f2["pid"] is None and "kill_count" not in f2


def test_stats_human(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    _populate(tmp_path)
    assert main(["stats", "-c", cfg]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "config:"
    assert any(line.split() == ["kill-timeout", "5"] for line in out)
    assert "drained: unkillable user processes for job f0 (since " in "\n".join(out)
    assert "jobs: 2" in out
    f1 = next(line for line in out if line.startswith("  f1 "))
    assert "state=terminating" in f1 and "pid=4242" in f1 and "kill_count=3" in f1
    f2 = next(line for line in out if line.startswith("  f2 "))
    assert "pid=-" in f2 and "multiuser=true" in f2
    assert not any(line.startswith("  f3 ") for line in out)


def test_stats_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "-c", _config(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "drained: no\n" in out and out.endswith("jobs: none\n")


def test_stats_bad_config_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, '[exec]\nkill-timeout = "soon"\n')
    assert main(["stats", "-c", cfg]) == 2
    assert "kill-timeout" in capsys.readouterr().err


def test_remaining_is_not_aged_once_the_job_is_over() -> None:
    now = time.time()
    rec = _job("f1", state="finished", termination=TERM, updated_at=now - 100)
    assert job_stats(rec, now)["kill_shell_delay_remaining"] == 10.0
    rec = _job("f1", termination=TERM, updated_at=now - 100)
    assert job_stats(rec, now)["kill_shell_delay_remaining"] == 0.0


def test_jobs_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    _populate(tmp_path)
    with StateDB.open(str(tmp_path / "state")) as db:
        db.add_job(_job("f4", launcher_pid=_dead_pid()))
    assert main(["jobs", "-c", cfg, "--json"]) == 0
    data = {j["jobid"]: j for j in json.loads(capsys.readouterr().out)}
    assert set(data) == {"f1", "f2", "f3", "f4"}
    assert data["f1"]["termination"]["kill_count"] == 3
    assert (data["f3"]["state"], data["f3"]["exit_status"], data["f3"]["error"]) == (
        "finished",
        2 << 8,
        "boom",
    )
    assert data["f1"]["launcher_alive"] is True and data["f4"]["launcher_alive"] is False


def test_jobs_human(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert main(["jobs", "-c", cfg]) == 0
    assert capsys.readouterr().out == "no jobs recorded\n"
    _populate(tmp_path)
    with StateDB.open(str(tmp_path / "state")) as db:
        db.add_job(_job("f4", launcher_pid=_dead_pid()))
    assert main(["jobs", "-c", cfg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "JOBID", "STATE", "SERVICE", "PID", "LAUNCHER", "CREATED", "STATUS", "UNIT",
    ]  # fmt: skip
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert set(by_id) == {"f1", "f2", "f3", "f4"}
    assert "exit 2" in by_id["f3"] and by_id["f3"].endswith("shell-0-f3.service  error: boom")
    assert "(gone)" in by_id["f4"] and "(gone)" not in by_id["f1"]
    assert " 4242 " in by_id["f1"]


def test_describe_status() -> None:
    assert describe_status(_job("a")) == "-"
    assert describe_status(_job("a", exit_status=0)) == "exit 0"
    assert describe_status(_job("a", exit_status=7 << 8)) == "exit 7"
    assert describe_status(_job("a", exit_status=9)) == "signal 9"
