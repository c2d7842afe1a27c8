"""drain_node: the local record always holds; the site command is best effort."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import psutil
import pytest

from sdexec.errors import LaunchError, RefusedError
from sdexec.exec.drain import drain_node, expand_drain_command
from sdexec.exec.statedb import DrainRecord, StateDB

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig


def _cfg(drain_command: tuple[str, ...] = ()) -> ExecConfig:
    return cast("ExecConfig", SimpleNamespace(sdexec=SimpleNamespace(drain_command=drain_command)))


@pytest.fixture
def db(tmp_path: Path) -> Any:
    d = StateDB.open(str(tmp_path / "state"))
    yield d
    d.close()


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "drain-cmd"
    path.write_text(f"#!{sys.executable}\nimport json, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _recorder(tmp_path: Path, exit_code: int = 0, stderr: str = "") -> tuple[str, Path]:
    out = tmp_path / "argv.json"
    body = (
        f"open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({exit_code})"
    )
    return _script(tmp_path, body), out


def test_expand_replaces_inside_words_with_format_quoting() -> None:
    rec = DrainRecord("a {reason}; rm -rf /", "f1", "shell-0-f1.service", 0.0, "node7")
    argv = expand_drain_command(
        ["scontrol", "NodeName={hostname}", "Reason={reason}", "{jobid}/{unit}", "{{lit}}"],
        rec,
    )
    assert argv == [
        "scontrol",
        "NodeName=node7",
        "Reason=a {reason}; rm -rf /",
        "f1/shell-0-f1.service",
        "{lit}",
    ]
    no_job = DrainRecord("r", None, None, 0.0, "n")
    assert expand_drain_command(["x{jobid}y", "{unit}"], no_job) == ["xy", ""]


def test_expand_keeps_what_it_does_not_know() -> None:
    rec = DrainRecord("r", None, None, 0.0, "n")
    words = ["{other}", "{}", "{reason!r}", "{hostname:>9}", "lone { brace", "}"]
    assert expand_drain_command(words, rec) == words


async def test_drain_without_command_records_and_logs(
    db: StateDB, caplog: pytest.LogCaptureFixture
) -> None:
    rec = await drain_node(db, _cfg(), "unkillable user processes for job f1", jobid="f1", unit="u")
    assert db.drains() == [rec]
    assert any(
        r.levelno == logging.ERROR and "unkillable user processes for job f1" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(RefusedError, match="node is drained: unkillable"):
        db.check_not_drained()


async def test_drain_runs_site_command_with_placeholders(db: StateDB, tmp_path: Path) -> None:
    script, out = _recorder(tmp_path)
    cfg = _cfg((script, "drain", "{hostname}", "Reason={reason}", "{jobid}", "{unit}"))
    rec = await drain_node(db, cfg, "it's stuck $(x)", jobid="f 1", unit="shell-0-f1.service")
    argv = json.loads(out.read_text())
    assert argv == ["drain", rec.hostname, "Reason=it's stuck $(x)", "f 1", "shell-0-f1.service"]


async def test_drain_command_failure_is_logged_with_stderr_tail(
    db: StateDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script, _ = _recorder(tmp_path, exit_code=3, stderr="noise\nflux: node unknown\n")
    rec = await drain_node(db, _cfg((script,)), "r", jobid=None, unit=None)
    assert db.drains() == [rec]  # the local drain holds regardless
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("exit status 3" in m and "flux: node unknown" in m for m in errors), errors


async def test_drain_command_missing_is_logged(
    db: StateDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-command")
    rec = await drain_node(db, _cfg((missing, "{reason}")), "r", jobid=None, unit=None)
    assert db.drains() == [rec]
    assert any("could not be run" in r.getMessage() for r in caplog.records)


async def test_drain_command_timeout_kills_its_process_group(
    db: StateDB, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "hang"
    # a grandchild holding stderr open must not make the timeout wait for it
    script.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nexec sleep 60\n")
    script.chmod(0o755)
    cfg = _cfg((str(script),))
    rec = await drain_node(db, cfg, "r", jobid=None, unit=None, command_timeout=0.2)
    assert db.drains() == [rec]
    assert any("timed out after 0.2s" in r.getMessage() for r in caplog.records)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        assert time.monotonic() < deadline, "grandchild survived the timeout"
        await asyncio.sleep(0.005)


async def test_site_command_runs_even_if_local_record_fails(
    db: StateDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kw: object) -> DrainRecord:
        raise LaunchError("state database x: database is locked")

    monkeypatch.setattr(db, "drain", broken)
    script, out = _recorder(tmp_path)
    with pytest.raises(LaunchError, match="database is locked"):
        await drain_node(
            db, _cfg((script, "{reason}", "{jobid}")), "stuck\tjob", jobid="f9", unit=None
        )
    assert json.loads(out.read_text()) == ["stuck job", "f9"]
