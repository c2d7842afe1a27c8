"""``sdexec drain list|clear|set`` through the real CLI entry point."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from sdexec.cli.main import main
from sdexec.errors import RefusedError
from sdexec.exec.statedb import JobRecord, StateDB


def _config(tmp_path: Path, drain_command: list[str] | None = None) -> str:
    lines = ["[sdexec]", f"state-dir = {json.dumps(str(tmp_path / 'state'))}"]
    if drain_command is not None:
        lines.append(f"drain-command = {json.dumps(drain_command)}")
    path = tmp_path / "exec.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_list_not_drained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert main(["drain", "list", "--config", cfg]) == 0
    assert capsys.readouterr().out == "not drained\n"
    assert main(["drain", "list", "--config", cfg, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_set_list_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert main(["drain", "set", "--config", cfg, "bad  disk\non sda"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("drained ") and out.endswith(": bad disk on sda\n")

    with StateDB.open(str(tmp_path / "state")) as db:
        db.drain("unkillable user processes for job f7", jobid="f7", unit="shell-0-f7.service")
        with pytest.raises(RefusedError, match="node is drained: bad disk on sda"):
            db.check_not_drained()

    assert main(["drain", "list", "-c", cfg]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SINCE", "HOST", "JOBID", "UNIT", "REASON"]
    assert lines[1].endswith("  -      -                   bad disk on sda")
    assert lines[2].endswith("  f7     shell-0-f7.service  unkillable user processes for job f7")

    assert main(["drain", "list", "-c", cfg, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["reason"], r["jobid"], r["unit"]) for r in records] == [
        ("bad disk on sda", None, None),
        ("unkillable user processes for job f7", "f7", "shell-0-f7.service"),
    ]
    assert all(isinstance(r["created_at"], float) and r["hostname"] for r in records)

    assert main(["drain", "clear", "-c", cfg]) == 0
    assert capsys.readouterr().out == "cleared 2 drain records\n"
    assert main(["drain", "clear", "-c", cfg]) == 0
    assert capsys.readouterr().out == "node was not drained\n"
    with StateDB.open(str(tmp_path / "state")) as db:
        db.check_not_drained()


def test_set_runs_site_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "argv.json"
    script = tmp_path / "drain-node"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    script.chmod(0o755)
    cfg = _config(tmp_path, [str(script), "{hostname}", "Reason={reason}"])
    assert main(["drain", "set", "-c", cfg, "by hand"]) == 0
    hostname = capsys.readouterr().out.split()[1].rstrip(":")
    assert json.loads(out.read_text()) == [hostname, "Reason=by hand"]


def test_set_empty_reason_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["drain", "set", "-c", cfg, "  "]) == 2
    assert "REASON must not be empty" in capsys.readouterr().err
    with StateDB.open(str(tmp_path / "state")) as db:
        assert db.drains() == []


def test_unsafe_state_dir_is_refused_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state").chmod(0o777)
    assert main(["drain", "list", "-c", cfg]) == 125
    err = capsys.readouterr().err
    assert err.startswith("sdexec: state directory ") and "writable by group or others" in err
    assert err.count("\n") == 1


def test_clear_resets_abandoned_units_best_effort(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import sdexec.jobexec.sweep

    calls: list[bool] = []

    async def fake_sweep(cfg: object, db: StateDB, *, user_manager: bool = False) -> list[str]:
        calls.append(user_manager)
        if user_manager:
            raise OSError("no user bus")
        db.remove_job("f1")
        return ["shell-0-f1.service"]

    monkeypatch.setattr(sdexec.jobexec.sweep, "sweep_abandoned", fake_sweep)
    cfg = _config(tmp_path)
    with StateDB.open(str(tmp_path / "state")) as db:
        for jobid, manager in (("f1", "system"), ("f2", "user")):
            db.add_job(
                JobRecord(jobid, f"shell-0-{jobid}.service", "sdexec", os.getuid(), manager,
                          os.getpid(), "abandoned", time.time())
            )  # fmt: skip
        db.drain("processes did not respond to SIGKILL; abandoning unit", jobid="f1")
    assert main(["drain", "clear", "-c", cfg]) == 0
    out = capsys.readouterr().out
    assert out == (
        "cleared 1 drain record\nreset 1 unit(s) of abandoned jobs: shell-0-f1.service\n"
    )
    assert "could not reset the units of abandoned jobs (user manager): no user bus" in caplog.text
    assert sorted(calls) == [False, True]
    with StateDB.open(str(tmp_path / "state")) as db:
        assert db.drains() == []
        assert [j.jobid for j in db.list_jobs()] == ["f2"]


def test_clear_without_abandoned_jobs_touches_no_bus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdexec.jobexec.sweep

    async def no_sweep(*args: object, **kw: object) -> list[str]:
        raise AssertionError("sweep must not run without abandoned jobs")

    monkeypatch.setattr(sdexec.jobexec.sweep, "sweep_abandoned", no_sweep)
    assert main(["drain", "clear", "-c", _config(tmp_path)]) == 0
    assert capsys.readouterr().out == "node was not drained\n"
