"""The node's persistent state: job records and drain records, in one SQLite file.

Several ``sdexec run`` processes on one node share it, ``sdexec stats``/``attach`` read it, and
it outlives a launcher crash so a job can be re-attached. SQLite in WAL mode with a busy timeout
and ``BEGIN IMMEDIATE`` write transactions makes concurrent writers safe without a daemon.
The state directory must be local (WAL does not work over NFS) and private to its owner, since
whoever can write it can drain the node or make it refuse jobs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sdexec.errors import LaunchError, RefusedError, SdexecError

log = logging.getLogger(__name__)

DB_NAME = "state.sqlite3"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_SEC = 10.0
# WAL checkpoints (the only writes that fsync with synchronous=NORMAL) run on a thread of their
# own, at most this often and only after a write: a server's event loop never waits for one.
CHECKPOINT_INTERVAL_SEC = 1.0
# The WAL is rewritten from its start once a checkpoint has copied it all, but its file keeps
# the size of the largest burst it ever held (5 MB after a few thousand jobs at concurrency
# 32) unless SQLite is told to cut it back: then it does, each time it starts over.
WAL_SIZE_LIMIT = 1 << 20
FINAL_STATES = frozenset({"finished", "abandoned"})
JOB_STATES = frozenset({"starting", "running", "terminating", *FINAL_STATES})
# A launcher that started this long after its record's launcher_since is a recycled pid.
_PID_REUSE_SLACK_SEC = 2.0

_JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    jobid TEXT NOT NULL,
    rank INTEGER NOT NULL,
    unit TEXT NOT NULL,
    service TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    manager TEXT NOT NULL,
    launcher_pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    pid INTEGER,
    termination TEXT,
    exit_status INTEGER,
    error TEXT,
    updated_at REAL NOT NULL,
    launcher_since REAL NOT NULL,
    PRIMARY KEY (jobid, rank)
)"""
_SCHEMA = (
    _JOBS_TABLE
    + """;
CREATE TABLE IF NOT EXISTS drains (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reason TEXT NOT NULL,
    jobid TEXT,
    unit TEXT,
    created_at REAL NOT NULL,
    hostname TEXT NOT NULL
);
"""
)


def short_hostname() -> str:
    """The name a resource manager knows this node by (``flux resource drain``, Slurm)."""
    return socket.gethostname().split(".", 1)[0]


def launcher_alive(pid: int, since: float | None = None) -> bool:
    """Whether ``pid`` is still the launcher that wrote a record at wall time ``since``.

    A zombie, or a process started after ``since`` (a recycled pid), is not.
    """
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return False
    state, started = stat
    if state in ("Z", "X"):
        return False
    return not (since is not None and started > since + _PID_REUSE_SLACK_SEC)


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """A process's state letter and start (wall clock) from /proc: all the launcher check
    needs, without a compiled dependency for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or ")"
    fields = text[text.rindex(")") + 2 :].split()
    start_ticks = int(fields[19])  # field 22 of stat(5), counted from the state (field 3)
    return fields[0], _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class JobRecord:
    """One job launched on this node, as shared between launcher processes."""

    jobid: str
    unit: str
    service: str  # "sdexec" | "rexec" | "testexec"
    owner_uid: int
    manager: str  # "system" | "user"
    launcher_pid: int
    state: str  # "starting" | "running" | "terminating" | "finished" | "abandoned"
    created_at: float  # wall clock
    pid: int | None = None
    termination: dict[str, object] | None = None  # Termination.stats()
    exit_status: int | None = None  # wait status, once known
    error: str | None = None
    updated_at: float = 0.0
    # wall time launcher_pid was recorded: tells a live launcher from a recycled pid
    launcher_since: float = 0.0
    rank: int = 0  # the shell's rank: a record is one shell, keyed (jobid, rank)

    @property
    def live(self) -> bool:
        return self.state not in FINAL_STATES

    def launcher_alive(self) -> bool:
        return launcher_alive(self.launcher_pid, self.launcher_since or self.created_at)

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class DrainRecord:
    """Why this node refuses new jobs, until ``sdexec drain clear``."""

    reason: str
    jobid: str | None
    unit: str | None
    created_at: float
    hostname: str

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


_JOB_COLUMNS = [f.name for f in dataclasses.fields(JobRecord)]
_UPDATABLE = frozenset(_JOB_COLUMNS) - {"jobid", "rank"}


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _one_line(text: str) -> str:
    """Drain reasons end up in one-line error messages and site commands' argv."""
    return " ".join(text.split())


def _check_private(path: str, what: str, *, is_dir: bool) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise RefusedError(f"cannot use {what} {path}: {e.strerror}") from None
    if is_dir and not stat.S_ISDIR(st.st_mode):
        raise RefusedError(f"{what} {path} exists and is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise RefusedError(
            f"{what} {path} is owned by uid {st.st_uid}, not by us (uid {uid}); "
            "refusing to trust it (set [sdexec] state-dir to a directory we own)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RefusedError(
            f"{what} {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to trust it "
            f"(fix with: chmod go-w {path})"
        )


def _migrate_v1(c: sqlite3.Connection) -> None:
    """Version 1 keyed a record by one string, ``JOBID`` or ``JOBID.RANK`` for a job of several
    shells, which job ``8.1`` could not be told from (job 8, rank 1). The rank is in the unit
    name (``shell-RANK-...``): the old key is split only where the unit name confirms it."""
    from sdexec.systemd.unitname import unit_name

    c.execute("ALTER TABLE jobs RENAME TO jobs_v1")
    c.execute(_JOBS_TABLE)
    old_columns = [n for n in _JOB_COLUMNS if n != "rank"]
    rows = c.execute(f"SELECT {', '.join(old_columns)} FROM jobs_v1").fetchall()
    for row in rows:
        values = dict(zip(old_columns, row, strict=True))
        key, unit = str(values["jobid"]), str(values["unit"])
        m = re.match(r"(?:imp-shell|shell|rexec|testexec)-(\d+)-", unit)
        rank = int(m.group(1)) if m else 0
        job, dot, suffix = key.rpartition(".")
        if dot and suffix == str(rank) and job:
            try:
                if unit.endswith(".service"):
                    named = unit_name(job, rank, guest=unit.startswith("imp-shell-")) == unit
                else:  # rexec-RANK-JOBID, testexec-RANK-JOBID
                    named = unit.endswith(f"-{rank}-{job}")
            except SdexecError:
                named = False
            if named:
                key = job
        values.update(jobid=key, rank=rank)
        names = ", ".join(values)
        marks = ", ".join("?" * len(values))
        c.execute(f"INSERT OR REPLACE INTO jobs ({names}) VALUES ({marks})", list(values.values()))
    c.execute("DROP TABLE jobs_v1")


Key = tuple[str, int]


class StateDB:
    """Handle on the node's state file; one per process, safe to share between threads."""

    def __init__(
        self, conn: sqlite3.Connection, path: str, *, background_checkpoint: bool = False
    ) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.RLock()
        # Records this process wrote and still runs: a record naming this process but not
        # in here is stale (a removal that failed, e.g. on a full disk) and may be replaced.
        self._mine: set[Key] = set()
        # Removals that failed (full disk, I/O error): done on the next write that succeeds.
        self._pending_removals: set[Key] = set()
        self._checkpointer: _Checkpointer | None = None
        self._background_checkpoint = background_checkpoint  # _init() starts the thread

    @classmethod
    def open(cls, state_dir: str, *, background_checkpoint: bool = False) -> StateDB:
        """Open (creating if needed) the node's state db in ``state_dir``.

        ``background_checkpoint``: WAL checkpoints (the only fsyncs with synchronous=NORMAL)
        run on a thread of the db's own instead of inside whichever commit crosses SQLite's
        1000-page mark, so no write ever waits for one: for the server, whose event loop
        serves every client. A short-lived process leaves SQLite's own policy (its close
        checkpoints anyway), so it pays for no thread and no second connection."""
        state_dir = os.path.abspath(state_dir)
        if not os.path.lexists(state_dir):
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
                os.chmod(state_dir, 0o700)  # whatever the umask
            except OSError as e:
                raise RefusedError(
                    f"cannot create state directory {state_dir}: {e.strerror}"
                ) from None
        _check_private(state_dir, "state directory", is_dir=True)
        path = os.path.join(state_dir, DB_NAME)
        if os.path.islink(path):
            raise RefusedError(f"cannot open state database {path}: it is a symbolic link")
        try:
            # Create it 0600 ourselves (SQLite's -wal and -shm files copy its mode), but only
            # when it is not there: closing any fd of the file drops every POSIX lock this
            # process holds on it, and a server with the database open would then let another
            # process checkpoint and delete the WAL under it (SQLite's "how to corrupt", 2.2).
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise RefusedError(f"cannot open state database {path}: {e.strerror}") from None
        _check_private(path, "state database", is_dir=False)
        try:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SEC, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise RefusedError(f"cannot open state database {path}: {e}") from None
        db = cls(conn, path, background_checkpoint=background_checkpoint)
        try:
            db._init()
        except BaseException:
            conn.close()
            raise
        return db

    def _init(self) -> None:
        with self._errors():
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SEC * 1000)}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("state database %s: journal mode is %s, not wal", self.path, mode)
            # WAL + NORMAL survives a crashed process (not a power loss: the last few
            # transactions may go, which re-adopting the units makes up for)
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            if self._background_checkpoint and str(mode).lower() == "wal":
                # Commits then only append to the WAL (no fsync); the checkpoint that copies
                # it into the database and fsyncs both is the checkpointer thread's, so no
                # write of ours (and no event loop calling it) pays for one.
                self._conn.execute("PRAGMA wal_autocheckpoint = 0")
                self._checkpointer = _Checkpointer.start_for(self.path)
        with self._write() as c:
            version = int(c.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RefusedError(
                    f"state database {self.path} has schema version {version}, newer than "
                    f"this sdexec understands ({SCHEMA_VERSION}); use a newer sdexec or "
                    "another [sdexec] state-dir"
                )
            if version == 1:
                _migrate_v1(c)
            if version < SCHEMA_VERSION:
                # one statement at a time: executescript() would COMMIT our transaction
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise LaunchError(f"state database {self.path}: {e}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front.

        A deferred transaction upgraded from read to write can fail at once with SQLITE_BUSY
        in WAL mode, ignoring the busy timeout; IMMEDIATE waits its turn instead.
        """
        with self._lock, self._errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        if self._checkpointer is not None:
            self._checkpointer.dirty.set()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            yield self._conn

    # --- jobs -----------------------------------------------------------------------------

    @staticmethod
    def _row_to_job(row: tuple[Any, ...]) -> JobRecord:
        values = dict(zip(_JOB_COLUMNS, row, strict=True))
        if values["termination"] is not None:
            values["termination"] = json.loads(values["termination"])
        return JobRecord(**values)

    @staticmethod
    def _encode(name: str, value: object) -> object:
        if name == "termination" and value is not None:
            return json.dumps(value, sort_keys=True)
        if name == "state" and value not in JOB_STATES:
            raise ValueError(f"invalid job state {value!r}")
        return value

    def _select_job(self, c: sqlite3.Connection, jobid: str, rank: int) -> JobRecord | None:
        row = c.execute(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE jobid = ? AND rank = ?",
            (jobid, rank),
        ).fetchone()
        return None if row is None else self._row_to_job(row)

    def _flush_removals(self, c: sqlite3.Connection) -> set[Key]:
        """Do the pending removals in this transaction; the caller forgets them (``done``)
        only once it committed: a failed commit must not lose them."""
        flushed = set(self._pending_removals)
        for jobid, rank in flushed:
            c.execute("DELETE FROM jobs WHERE jobid = ? AND rank = ?", (jobid, rank))
        return flushed

    def add_job(self, rec: JobRecord) -> None:
        """Record a shell; refuse if it is already running here, or if the job id is another
        user's: a record is someone's job until it is gone, and taking it over would make that
        job unrecoverable (and let a user learn or disturb another's)."""
        now = time.time()
        if not rec.updated_at:
            rec.updated_at = now
        if not rec.launcher_since:
            rec.launcher_since = now
        values = [self._encode(name, getattr(rec, name)) for name in _JOB_COLUMNS]
        key = (rec.jobid, rec.rank)
        with self._write() as c:
            flushed = self._flush_removals(c)
            others = c.execute(
                "SELECT DISTINCT owner_uid FROM jobs WHERE jobid = ? AND owner_uid != ?",
                (rec.jobid, rec.owner_uid),
            ).fetchall()
            if others:
                raise RefusedError(
                    f"job {rec.jobid}: this job id is in use on this node by another user "
                    "(choose another --job)"
                )
            old = self._select_job(c, rec.jobid, rec.rank)
            if old is not None and old.live:
                ours_stale = old.launcher_pid == os.getpid() and key not in self._mine
                if old.launcher_alive() and not ours_stale:
                    raise RefusedError(
                        f"job {rec.jobid} is already running on this node (unit {old.unit})"
                    )
                log.warning(
                    "replacing stale record of job %s rank %d (unit %s): its launcher "
                    "(pid %d) is gone",
                    old.jobid,
                    old.rank,
                    old.unit,
                    old.launcher_pid,
                )
            c.execute(
                f"INSERT OR REPLACE INTO jobs ({', '.join(_JOB_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_JOB_COLUMNS))})",
                values,
            )
        self._pending_removals -= flushed
        self._mine.add(key)

    def update_job(self, jobid: str, rank: int, **fields: object) -> None:
        """Change some fields of a record; ``updated_at`` follows unless given.

        A missing record is logged, not raised: losing the record must not kill a running job.
        """
        bad = set(fields) - _UPDATABLE
        if bad:
            raise TypeError(f"update_job: unknown field(s) {', '.join(sorted(bad))}")
        now = time.time()
        fields.setdefault("updated_at", now)
        if "launcher_pid" in fields:
            fields.setdefault("launcher_since", now)
            if fields["launcher_pid"] == os.getpid():
                self._mine.add((jobid, rank))
        names = sorted(fields)
        values = [self._encode(n, fields[n]) for n in names]
        with self._write() as c:
            cur = c.execute(
                f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} "
                "WHERE jobid = ? AND rank = ?",
                [*values, jobid, rank],
            )
            if cur.rowcount == 0:
                log.warning("state database: no record of job %s rank %d to update", jobid, rank)

    def get_job(self, jobid: str, rank: int = 0) -> JobRecord | None:
        with self._read() as c:
            return self._select_job(c, jobid, rank)

    def list_jobs(self, *, live_only: bool = False, jobid: str | None = None) -> list[JobRecord]:
        query = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
        where: list[str] = []
        args: list[object] = []
        if live_only:
            where.append(f"state NOT IN ({', '.join('?' * len(FINAL_STATES))})")
            args.extend(sorted(FINAL_STATES))
        if jobid is not None:
            where.append("jobid = ?")
            args.append(jobid)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_at, jobid, rank"
        with self._read() as c:
            return [self._row_to_job(row) for row in c.execute(query, args).fetchall()]

    def remove_job(self, jobid: str, rank: int = 0) -> None:
        """Forget a record; if the database cannot be written now (a full disk), the record
        is marked stale for this process and removed by the next write that succeeds."""
        self._mine.discard((jobid, rank))
        try:
            with self._write() as c:
                flushed = self._flush_removals(c)
                c.execute("DELETE FROM jobs WHERE jobid = ? AND rank = ?", (jobid, rank))
        except LaunchError:
            self._pending_removals.add((jobid, rank))
            raise
        self._pending_removals -= flushed | {(jobid, rank)}

    # --- drain ----------------------------------------------------------------------------

    def drain(
        self, reason: str, *, jobid: str | None = None, unit: str | None = None
    ) -> DrainRecord:
        rec = DrainRecord(
            reason=_one_line(reason) or "no reason given",
            jobid=jobid,
            unit=unit,
            created_at=time.time(),
            hostname=short_hostname(),
        )
        with self._write() as c:
            c.execute(
                "INSERT INTO drains (reason, jobid, unit, created_at, hostname) "
                "VALUES (?, ?, ?, ?, ?)",
                (rec.reason, rec.jobid, rec.unit, rec.created_at, rec.hostname),
            )
        return rec

    def drains(self) -> list[DrainRecord]:
        with self._read() as c:
            rows = c.execute(
                "SELECT reason, jobid, unit, created_at, hostname FROM drains ORDER BY id"
            ).fetchall()
        return [DrainRecord(*row) for row in rows]

    def clear_drain(self) -> int:
        with self._write() as c:
            return int(c.execute("DELETE FROM drains").rowcount)

    def check_not_drained(self) -> None:
        drains = self.drains()
        if not drains:
            return
        first = drains[0]
        more = f" (and {len(drains) - 1} more)" if len(drains) > 1 else ""
        raise RefusedError(
            f"node is drained: {first.reason} (since {format_time(first.created_at)}){more}; "
            "run 'sdexec drain clear'"
        )

    def checkpoints(self) -> int:
        """Checkpoints the background thread has completed."""
        return self._checkpointer.done if self._checkpointer is not None else 0

    def wait_checkpoint(self, after: int, timeout: float) -> bool:
        """Wait until more than ``after`` checkpoints are done (tests: an event, not a sleep)."""
        cp = self._checkpointer
        if cp is None:
            return False
        with cp.changed:
            return cp.changed.wait_for(lambda: cp.done > after, timeout)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()  # first: the last connection to close checkpoints
            self._checkpointer = None
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Checkpointer(threading.Thread):
    """Copies the WAL into the database off the caller's thread, on its own connection.

    PASSIVE checkpoints never block a writer (and a writer never waits for one); a checkpoint
    that meets a reader simply does less and the next one finishes. Without this, SQLite runs
    the checkpoint inside whichever commit crosses 1000 WAL pages: a stall of the server's
    whole event loop for two fsyncs, every so many jobs.
    """

    def __init__(self, path: str, conn: sqlite3.Connection) -> None:
        super().__init__(name="sdexec-statedb-checkpoint", daemon=True)
        self.path = path
        self.dirty = threading.Event()
        self.done = 0
        self.changed = threading.Condition()
        self._stopping = threading.Event()
        self._conn = conn  # opened by the caller: the db holds its fds once open() returns

    @classmethod
    def start_for(cls, path: str) -> _Checkpointer | None:
        try:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SEC, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            log.warning("state database %s: no checkpoint thread: %s", path, e)
            return None
        try:  # its files (-wal, -shm) open now, not at its first checkpoint: fds settle here
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}").fetchall()
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.Error as e:
            conn.close()
            log.warning("state database %s: no checkpoint thread: %s", path, e)
            return None
        cp = cls(path, conn)
        cp.start()
        return cp

    def run(self) -> None:
        conn = self._conn
        try:
            while not self._stopping.is_set():
                self.dirty.wait()
                if self._stopping.is_set():
                    break
                self.dirty.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:  # full disk, I/O error: the next write retries
                    log.warning("state database %s: checkpoint: %s", self.path, e)
                with self.changed:
                    self.done += 1
                    self.changed.notify_all()
                self._stopping.wait(CHECKPOINT_INTERVAL_SEC)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self.dirty.set()
        self.join()
