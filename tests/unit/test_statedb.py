"""StateDB: job and drain records shared by several launcher processes."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sdexec.errors import LaunchError, RefusedError
from sdexec.exec.statedb import (
    DB_NAME,
    SCHEMA_VERSION,
    WAL_SIZE_LIMIT,
    JobRecord,
    StateDB,
    launcher_alive,
)


def _job(jobid: str, **kw: Any) -> JobRecord:
    base: dict[str, Any] = {
        "jobid": jobid,
        "unit": f"shell-0-{jobid}.service",
        "service": "sdexec",
        "owner_uid": os.getuid(),
        "manager": "system",
        "launcher_pid": os.getpid(),
        "state": "starting",
        "created_at": time.time(),
    }
    base.update(kw)
    return JobRecord(**base)


@pytest.fixture
def db(tmp_path: Path) -> Any:
    d = StateDB.open(str(tmp_path / "state"))
    yield d
    d.close()


def _dead_pid() -> int:
    """A pid that certainly belonged to a process that is gone (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- opening ------------------------------------------------------------------------------


def test_open_creates_private_dir_and_wal_db(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    db = StateDB.open(str(state))
    db.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    dbfile = state / DB_NAME
    assert stat.S_IMODE(dbfile.stat().st_mode) == 0o600
    conn = sqlite3.connect(dbfile)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_open_creates_dir_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        StateDB.open(str(tmp_path / "state")).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_open_twice_keeps_data(tmp_path: Path) -> None:
    with StateDB.open(str(tmp_path / "s")) as db:
        db.add_job(_job("f1"))
    with StateDB.open(str(tmp_path / "s")) as db:
        rec = db.get_job("f1")
        assert rec is not None and rec.unit == "shell-0-f1.service"


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_open_refuses_group_or_other_writable_dir(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(RefusedError, match=r"writable by group or others .*chmod go-w"):
        StateDB.open(str(state))
    assert not (state / DB_NAME).exists()


def test_open_accepts_readable_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    StateDB.open(str(state)).close()


def test_open_refuses_dir_not_owned_by_us(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(state).st_uid + 4242)
    with pytest.raises(RefusedError, match=r"owned by uid \d+, not by us"):
        StateDB.open(str(state))


def test_open_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "state"
    f.write_text("")
    with pytest.raises(RefusedError, match="not a directory"):
        StateDB.open(str(f))


def test_open_refuses_symlinked_db_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / DB_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RefusedError, match="cannot open state database"):
        StateDB.open(str(state))
    assert not (tmp_path / "elsewhere").exists()


def test_open_refuses_newer_schema(tmp_path: Path) -> None:
    StateDB.open(str(tmp_path / "s")).close()
    conn = sqlite3.connect(tmp_path / "s" / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RefusedError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        StateDB.open(str(tmp_path / "s"))


def test_open_corrupt_file_is_a_clean_error(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(LaunchError, match="state database"):
        StateDB.open(str(state))


# --- jobs ---------------------------------------------------------------------------------


def test_job_roundtrip_and_update(db: StateDB) -> None:
    db.add_job(_job("f1", service="rexec"))
    rec = db.get_job("f1")
    assert rec is not None
    assert rec.service == "rexec" and rec.state == "starting" and rec.pid is None
    assert rec.updated_at > 0 and rec.launcher_since > 0
    term = {"kill_count": 2, "exception_in_progress": True, "kill_timeout": 5.0}
    db.update_job("f1", 0, state="terminating", pid=1234, termination=term)
    rec = db.get_job("f1")
    assert rec is not None
    assert (rec.state, rec.pid, rec.termination) == ("terminating", 1234, term)
    db.update_job("f1", 0, state="finished", exit_status=9, error="killed")
    rec = db.get_job("f1")
    assert rec is not None and (rec.exit_status, rec.error, rec.live) == (9, "killed", False)
    assert db.get_job("nope") is None


def test_update_rejects_unknown_field_and_state(db: StateDB) -> None:
    db.add_job(_job("f1"))
    with pytest.raises(TypeError, match="bogus"):
        db.update_job("f1", 0, bogus=1)
    with pytest.raises(ValueError, match="invalid job state"):
        db.update_job("f1", 0, state="sleeping")


def test_update_missing_job_is_logged_not_raised(
    db: StateDB, caplog: pytest.LogCaptureFixture
) -> None:
    db.update_job("ghost", 0, state="running")
    assert "no record of job ghost" in caplog.text
    assert db.get_job("ghost") is None


def test_list_and_remove(db: StateDB) -> None:
    t = time.time()
    db.add_job(_job("a", created_at=t))
    db.add_job(_job("b", created_at=t + 1, state="running"))
    db.add_job(_job("c", created_at=t + 2, state="finished"))
    db.add_job(_job("d", created_at=t + 3, state="abandoned"))
    assert [j.jobid for j in db.list_jobs()] == ["a", "b", "c", "d"]
    assert [j.jobid for j in db.list_jobs(live_only=True)] == ["a", "b"]
    db.remove_job("b")
    db.remove_job("b")  # idempotent
    assert [j.jobid for j in db.list_jobs()] == ["a", "c", "d"]


def test_add_refuses_live_duplicate(db: StateDB) -> None:
    db.add_job(_job("f1"))
    msg = r"job f1 is already running on this node \(unit shell-0-f1\.service\)"
    with pytest.raises(RefusedError, match=msg):
        db.add_job(_job("f1", unit="other.service"))
    rec = db.get_job("f1")
    assert rec is not None and rec.unit == "shell-0-f1.service"


def test_add_replaces_stale_record(db: StateDB, caplog: pytest.LogCaptureFixture) -> None:
    db.add_job(_job("f1", launcher_pid=_dead_pid(), state="running"))
    db.add_job(_job("f1", unit="new.service"))
    rec = db.get_job("f1")
    assert rec is not None and rec.unit == "new.service" and rec.launcher_pid == os.getpid()
    assert "stale record of job f1" in caplog.text


def test_add_replaces_finished_record(db: StateDB) -> None:
    db.add_job(_job("f1", state="finished"))
    db.add_job(_job("f1", unit="again.service"))
    rec = db.get_job("f1")
    assert rec is not None and rec.unit == "again.service" and rec.state == "starting"


def test_recycled_launcher_pid_is_stale(db: StateDB) -> None:
    # our parent is alive and started before "now": a genuine live launcher
    db.add_job(_job("f1", launcher_pid=os.getppid(), launcher_since=time.time()))
    with pytest.raises(RefusedError):
        db.add_job(_job("f1"))
    # the same live pid, claimed before it was even started: a recycled pid, so stale
    db.add_job(_job("f2", launcher_pid=os.getppid(), launcher_since=1.0))  # claimed in 1970
    db.add_job(_job("f2", unit="mine.service"))
    rec = db.get_job("f2")
    assert rec is not None and rec.unit == "mine.service"


def test_update_of_launcher_pid_restamps_launcher_since(db: StateDB) -> None:
    db.add_job(_job("f1", launcher_pid=_dead_pid(), launcher_since=5.0))
    db.update_job("f1", 0, launcher_pid=os.getpid())  # re-attach
    rec = db.get_job("f1")
    assert rec is not None and rec.launcher_since > 5.0 and rec.launcher_alive()


def test_launcher_alive() -> None:
    assert launcher_alive(os.getpid())
    assert not launcher_alive(0)
    assert not launcher_alive(-5)
    assert not launcher_alive(_dead_pid())
    assert launcher_alive(os.getppid(), time.time())
    assert not launcher_alive(os.getppid(), 1.0)


def test_zombie_launcher_is_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 5
    import psutil

    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    try:
        assert not launcher_alive(proc.pid)
    finally:
        proc.wait()


# --- drain --------------------------------------------------------------------------------


def test_drain_records_and_refuses(db: StateDB) -> None:
    db.check_not_drained()
    assert db.drains() == []
    rec = db.drain("unkillable user processes\nfor job f1", jobid="f1", unit="u.service")
    assert rec.reason == "unkillable user processes for job f1"
    assert rec.hostname and "." not in rec.hostname
    db.drain("second")
    drains = db.drains()
    assert [d.reason for d in drains] == [rec.reason, "second"]
    assert (drains[0].jobid, drains[0].unit) == ("f1", "u.service")
    with pytest.raises(RefusedError) as exc:
        db.check_not_drained()
    msg = str(exc.value)
    assert msg.startswith("node is drained: unkillable user processes for job f1 (since ")
    assert msg.endswith("(and 1 more); run 'sdexec drain clear'")
    assert "\n" not in msg
    assert db.clear_drain() == 2
    assert db.clear_drain() == 0
    db.check_not_drained()


def test_drain_visible_to_other_handle(tmp_path: Path) -> None:
    a = StateDB.open(str(tmp_path / "s"))
    b = StateDB.open(str(tmp_path / "s"))
    try:
        b.check_not_drained()
        a.drain("by a")
        with pytest.raises(RefusedError, match="by a"):
            b.check_not_drained()
    finally:
        a.close()
        b.close()


# --- concurrency --------------------------------------------------------------------------

_WORKERS = 4
_OPS = 50

# Separate interpreters, not fork(): a forked pytest process inherits other tests' threads and
# locks, and a worker stuck on one would hang the whole run.
_WORKER = """
import json, os, sys, time
from sdexec.errors import RefusedError
from sdexec.exec.statedb import JobRecord, StateDB

state_dir, n, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def job(jobid, **kw):
    return JobRecord(jobid=jobid, unit=kw.pop("unit", jobid + ".service"), service="sdexec",
                     owner_uid=os.getuid(), manager="system", launcher_pid=os.getpid(),
                     state="starting", created_at=time.time(), **kw)

db = StateDB.open(state_dir)
print("ready", flush=True)
sys.stdin.readline()  # start together
try:
    db.add_job(job("shared", unit=f"w{n}.service"))
    print("shared-ok", flush=True)
except RefusedError:
    print("shared-refused", flush=True)
errors = []
try:
    for i in range(ops):
        jobid = f"w{n}-{i}"
        db.add_job(job(jobid))
        db.update_job(jobid, 0, state="running", pid=1000 + i, termination={"i": i})
        if i % 2:
            db.remove_job(jobid)
except Exception as e:
    errors.append(repr(e))
print(json.dumps(errors), flush=True)
sys.stdin.read()  # stay alive (a live launcher) until every worker tried "shared"
db.close()
"""


def test_concurrent_writers(tmp_path: Path) -> None:
    state_dir = str(tmp_path / "s")
    StateDB.open(state_dir).close()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, state_dir, str(n), str(_OPS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(_WORKERS)
    ]

    def kill_all() -> None:
        for p in procs:
            p.kill()

    watchdog = threading.Timer(30, kill_all)
    watchdog.start()
    try:

        def line(p: subprocess.Popen[str]) -> str:
            assert p.stdout is not None
            text = p.stdout.readline().strip()
            if not text:  # died: show why
                _, err = p.communicate(timeout=5)
                pytest.fail(f"worker exited early (rc={p.returncode}): {err}")
            return text

        assert [line(p) for p in procs] == ["ready"] * _WORKERS
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        shared = [line(p) for p in procs]
        errors = [json.loads(line(p)) for p in procs]
        outs = [p.communicate(timeout=10) for p in procs]
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * _WORKERS, [err for _, err in outs]
    assert errors == [[]] * _WORKERS
    assert sorted(shared) == ["shared-ok"] + ["shared-refused"] * (_WORKERS - 1)
    with StateDB.open(state_dir) as db:
        jobs = {j.jobid: j for j in db.list_jobs()}
    expected = {f"w{n}-{i}" for n in range(_WORKERS) for i in range(0, _OPS, 2)} | {"shared"}
    assert set(jobs) == expected
    winner = shared.index("shared-ok")
    assert jobs["shared"].unit == f"w{winner}.service"
    assert jobs["shared"].launcher_pid == procs[winner].pid
    for jobid, j in jobs.items():
        if jobid != "shared":
            i = int(jobid.split("-")[1])
            assert (j.state, j.pid, j.termination) == ("running", 1000 + i, {"i": i})


# --- records are (job id, rank), and a job id belongs to one user (issue 9, M3/M4/M8) -----


def test_job_and_rank_are_separate_keys(db: StateDB) -> None:
    """Job 7 with two shells and job 7.1 coexist (a "7.1" key used to mean both)."""
    db.add_job(_job("7", unit="shell-0-7.service"))
    db.add_job(_job("7", rank=1, unit="shell-1-7.service"))
    db.add_job(_job("7.1", unit="shell-0-7.1.service"))
    assert sorted((r.jobid, r.rank) for r in db.list_jobs()) == [("7", 0), ("7", 1), ("7.1", 0)]
    assert [r.rank for r in db.list_jobs(jobid="7")] == [0, 1]
    db.update_job("7", 1, state="running")
    assert db.get_job("7", 1).state == "running"  # type: ignore[union-attr]
    assert db.get_job("7").state == "starting"  # type: ignore[union-attr]
    db.remove_job("7", 1)
    assert db.get_job("7", 1) is None and db.get_job("7.1") is not None


def test_another_users_job_id_is_refused_even_when_stale(db: StateDB) -> None:
    db.add_job(_job("rootD", owner_uid=0, launcher_pid=_dead_pid()))
    with pytest.raises(RefusedError, match="in use on this node by another user"):
        db.add_job(_job("rootD", owner_uid=1500))
    db.update_job("rootD", 0, state="finished")  # a kept status is still someone's
    with pytest.raises(RefusedError, match="another user"):
        db.add_job(_job("rootD", owner_uid=1500, rank=1))
    assert db.get_job("rootD").owner_uid == 0  # type: ignore[union-attr]


def test_a_record_whose_removal_failed_is_stale_for_its_own_launcher(
    db: StateDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the removal fails, the record says "running" under our own (live) pid;
    the same job id must run again, and the removal is done once writing works again."""
    db.add_job(_job("full1"))
    real = db._write

    def full() -> Any:
        raise LaunchError("state database x: database or disk is full")

    monkeypatch.setattr(db, "_write", full)
    with pytest.raises(LaunchError):
        db.remove_job("full1")
    monkeypatch.setattr(db, "_write", real)
    assert db.get_job("full1") is not None
    db.add_job(_job("other"))  # the next write flushes the pending removal...
    assert db.get_job("full1") is None
    db.add_job(_job("full1"))  # ...and the id runs again
    with pytest.raises(RefusedError, match="already running"):
        db.add_job(_job("full1"))  # while it is ours and live, it is refused


def test_v1_database_is_migrated_with_ranks_from_unit_names(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(
        "CREATE TABLE jobs (jobid TEXT PRIMARY KEY, unit TEXT NOT NULL, service TEXT NOT NULL,"
        " owner_uid INTEGER NOT NULL, manager TEXT NOT NULL, launcher_pid INTEGER NOT NULL,"
        " state TEXT NOT NULL, created_at REAL NOT NULL, pid INTEGER, termination TEXT,"
        " exit_status INTEGER, error TEXT, updated_at REAL NOT NULL,"
        " launcher_since REAL NOT NULL)"
    )
    conn.execute(
        "CREATE TABLE drains (id INTEGER PRIMARY KEY AUTOINCREMENT, reason TEXT NOT NULL,"
        " jobid TEXT, unit TEXT, created_at REAL NOT NULL, hostname TEXT NOT NULL)"
    )
    rows = [
        ("8.1", "shell-0-8.1.service"),  # job "8.1", one shell: NOT job 8 rank 1
        ("7.0", "shell-0-7.service"),  # job 7, shells 0 and 1
        ("7.1", "shell-1-7.service"),
        ("9", "imp-shell-0-9.service"),
        ("t.2", "rexec-2-t"),
    ]
    for key, unit in rows:
        conn.execute(
            "INSERT INTO jobs VALUES (?, ?, 'sdexec', 0, 'system', 1, 'running', 1.0,"
            " NULL, NULL, NULL, NULL, 1.0, 1.0)",
            (key, unit),
        )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with StateDB.open(str(state)) as db:
        got = sorted((r.jobid, r.rank, r.unit) for r in db.list_jobs())
    assert got == [
        ("7", 0, "shell-0-7.service"),
        ("7", 1, "shell-1-7.service"),
        ("8.1", 0, "shell-0-8.1.service"),
        ("9", 0, "imp-shell-0-9.service"),
        ("t", 2, "rexec-2-t"),
    ]


def test_writes_never_run_a_checkpoint_and_the_thread_does(tmp_path: Path) -> None:
    """A commit only appends to the WAL; the checkpoint (the fsyncs) is the thread's.

    Proof by the database file itself: an ``immutable`` reader ignores the WAL, so it sees a
    record only once a checkpoint copied it there. SQLite's own autocheckpoint would not have
    (it waits for 1000 WAL pages), and with ours off a commit never does.
    """
    with StateDB.open(str(tmp_path / "state"), background_checkpoint=True) as db:
        assert db._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        path = tmp_path / "state" / DB_NAME

        def in_the_file() -> list[Any]:
            ro = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
            try:
                return ro.execute("SELECT jobid FROM jobs").fetchall()
            except sqlite3.DatabaseError:  # no schema yet, or a page torn by a checkpoint under
                return []  # way (an immutable reader takes no lock): the next look settles it
            finally:
                ro.close()

        db.add_job(_job("cp1"))
        # the checkpoint under way may have begun before this commit: the next one has it
        for _ in range(5):
            done = db.checkpoints()  # before looking: one that ends meanwhile still counts
            if in_the_file():
                break
            assert db.wait_checkpoint(done, timeout=30), "no checkpoint"
        assert in_the_file() == [("cp1",)]


def test_close_stops_the_checkpoint_thread(tmp_path: Path) -> None:
    db = StateDB.open(str(tmp_path / "state"), background_checkpoint=True)
    thread = db._checkpointer
    assert thread is not None and thread.is_alive()
    db.add_job(_job("cp2"))
    db.close()
    assert not thread.is_alive()  # joined: nothing of the db outlives close()


def test_a_short_lived_process_gets_no_checkpoint_thread(tmp_path: Path) -> None:
    """Only the server asks for it: a CLI's db keeps SQLite's own checkpoint policy."""
    with StateDB.open(str(tmp_path / "state")) as db:
        assert db._checkpointer is None
        assert db._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        db.add_job(_job("cp3"))


def test_the_wal_file_is_cut_back_after_a_burst(tmp_path: Path) -> None:
    """Every resource clients can make the server hold is bounded: disk too. A burst of jobs
    (here: while a reader keeps the WAL from starting over, so it must grow) leaves a WAL file
    of its size; once checkpointed and started over, SQLite cuts it back to the limit."""
    state = tmp_path / "state"
    with StateDB.open(str(state), background_checkpoint=True) as db:
        wal = state / (DB_NAME + "-wal")
        reader = sqlite3.connect(str(state / DB_NAME), isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM jobs").fetchall()  # holds its snapshot
            for i in range(600):
                db.add_job(_job(f"burst{i}"))
            assert wal.stat().st_size > 2 * WAL_SIZE_LIMIT
        finally:
            reader.close()
        for i in range(20):  # a checkpoint that copies it all, then a write starts it over
            done = db.checkpoints()
            assert db.wait_checkpoint(done, timeout=30), "no checkpoint"
            db.update_job(f"burst{i}", 0, state="running")
            if wal.stat().st_size <= WAL_SIZE_LIMIT:
                break
        assert wal.stat().st_size <= WAL_SIZE_LIMIT
        assert len(db.list_jobs()) == 600
