"""``sdexec serve``: the node's resident launcher, as Flux runs sdexec inside its broker.

One process keeps one bus connection and tracks every job of the node; ``sdexec run`` (see
``client.py``) hands it the job and its own stdio, so a job's start costs a socket round trip
instead of a Python start-up with asyncio, dbus-fast and a bus connection. Everything else is
the in-process path's: the same argument parsing, policy (``select_service``), records,
termination, stop timer and drain; and the server re-attaches, when it starts, to jobs whose
launcher died (a crashed ``sdexec run``, or the previous server).

Who the job belongs to comes from the socket (SO_PEERCRED), never from the request: a caller
other than the server's own user is a guest (run only through ``exec.imp``), and only root
may name another owner.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import logging
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import replace
from typing import Any

from sdexec.config.table import ExecConfig
from sdexec.errors import LaunchError, RefusedError, SdexecError, UsageError
from sdexec.exec.aio import first_completed
from sdexec.exec.launcher import Launcher
from sdexec.exec.statedb import StateDB
from sdexec.jobexec.attach import attach_job, check_attach, is_stranger
from sdexec.jobexec.handle import Handle
from sdexec.jobexec.policy import owner_uid, select_service
from sdexec.jobexec.records import db_remove, open_db
from sdexec.jobexec.shells import start_job
from sdexec.protocol.endpoint import socket_path
from sdexec.protocol.request import build_request, outcome
from sdexec.server.admission import Admission, Limits, fds_needed, raise_fd_limit
from sdexec.systemd.unitname import check_jobid

log = logging.getLogger(__name__)

MAX_REQUEST = 4 << 20
SD_LISTEN_FDS_START = 3
FD_SIZE = array.array("i").itemsize
LISTEN_BACKLOG = 4096
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
REFUSAL_LOG_EVERY = 10.0
KEEP_UNCLAIMED_SEC = 24 * 3600
UNSTARTED_MAX = 4096
UNSTARTED_KEEP_SEC = 600.0  # well past a client's CONNECT_PATIENCE (and its retries)
"""How long a finished job's status waits for ``sdexec attach`` when its client went away."""


def _listen_socket(path: str) -> socket.socket:
    """The socket systemd passed us (socket activation), else our own at ``path``."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
        return socket.socket(fileno=SD_LISTEN_FDS_START)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier server
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o666)  # anyone may ask; who they are decides what they get
    sock.listen(LISTEN_BACKLOG)  # the kernel caps it at net.core.somaxconn
    return sock


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _owner(peer_uid: int, asked: str | None) -> str | None:
    """The job's owner: the caller, or whom root names."""
    me = os.getuid()
    if peer_uid == me:
        return asked
    if asked is not None and peer_uid != 0 and owner_uid(asked) != peer_uid:
        raise RefusedError("--owner: only the instance owner (root) may run jobs for other users")
    return asked if peer_uid == 0 else str(peer_uid)


class Server:
    def __init__(self, cfg: ExecConfig, *, user: bool = False) -> None:
        self.cfg = cfg
        self.user = user
        self.launcher = Launcher(cfg, user=user)
        self._tasks: set[asyncio.Task[None]] = set()
        self.adopted: dict[str, asyncio.Future[tuple[Handle, asyncio.Task[int | None]]]] = {}
        # jobs of connected clients (by job id): an attach for one waits for its end
        self.running: dict[str, asyncio.Future[tuple[Handle, int | None]]] = {}
        # Re-adopted jobs found never started (a server killed between the record and the
        # unit): no record is kept for them (a client never told of the job never asks), but
        # a client that was told comes back, maybe after the record went: it must hear "not
        # started", not "no record". Bounded, and forgotten after the clients' patience.
        self.unstarted: collections.OrderedDict[str, tuple[frozenset[int], str, float]] = (
            collections.OrderedDict()
        )
        from sdexec.protocol.args import build_parser

        self.parser = build_parser("run", served=True)  # slow to build: once, not per job
        self.db: StateDB | None = None
        self._db_error: str | None = None
        try:
            self.db = open_db(cfg, background_checkpoint=True)
        except SdexecError as e:
            # The server stays up to say so to every client, rather than dying at each
            # socket activation until systemd gives up on the socket.
            self._db_error = str(e)
            log.error("the node's state database cannot be used: %s", e)
        site = cfg.sdexec
        self.admission = Admission(
            Limits(total=site.max_connections, per_user=site.max_connections_per_user),
            exempt=frozenset({0, os.getuid()}),
        )
        self.accept_errors = 0
        self._refusal_logged = -REFUSAL_LOG_EVERY

    def _state(self) -> StateDB:
        """The node's database, opened again if it could not be before (an admin fixed it)."""
        if self.db is None:
            try:
                self.db = open_db(self.cfg, background_checkpoint=True)
            except SdexecError as e:
                self._db_error = str(e)
                raise LaunchError(
                    f"the node's state database cannot be used: {e} (ask the node's administrator)"
                ) from None
            log.info("the state database is usable again")
        return self.db

    async def serve(self, path: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._check_fd_limit()
        await self.launcher.connect()
        listener = _listen_socket(path or socket_path(self.user))
        listener.setblocking(False)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self._spawn(self.readopt())
        log.info("serving on %s", listener.getsockname())
        accept: asyncio.Task[Any] | None = None
        backoff = ACCEPT_BACKOFF_MIN
        try:
            while not stop.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                done = await first_completed(accept, stop.wait())
                if accept not in done:
                    continue
                task, accept = accept, None
                try:
                    conn, _addr = task.result()
                except OSError as e:
                    # EMFILE/ENFILE/ENOBUFS/ENOMEM (a shortage) or ECONNABORTED/EPROTO (a client
                    # gone): never a reason to stop serving everyone. A shortage leaves the
                    # listener readable, so wait a little before the next try, or spin.
                    self.accept_errors += 1
                    log.warning("accept: %s; retrying in %.2fs", e, backoff)
                    await _sleep_unless(stop, backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                    continue
                backoff = ACCEPT_BACKOFF_MIN
                self._admit(conn)
        finally:
            if accept is not None:
                accept.cancel()
            for entry in self.adopted.values():
                if entry.done() and not entry.cancelled() and entry.exception() is None:
                    entry.result()[1].cancel()
            listener.close()
            # Jobs go on in their units; their records let the next server (or `sdexec
            # attach`) take them over.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.launcher.close()
            if self.db is not None:
                self.db.close()

    def _check_fd_limit(self) -> None:
        """Say at start when the caps allow more connections than the fd limit can hold."""
        limit = raise_fd_limit()
        need = fds_needed(self.admission.limits)
        log.info("descriptor limit %d (the connection caps need up to %d)", limit, need)
        if limit < need:
            log.warning(
                "descriptor limit %d is below the %d that [sdexec] max-connections = %d may "
                "need: raise LimitNOFILE= in sdexec.service or lower max-connections",
                limit, need, self.admission.limits.total,
            )  # fmt: skip

    def _admit(self, conn: socket.socket) -> None:
        """Serve ``conn``, or refuse it at once (125, "busy") if its user holds too many."""
        try:
            uid = _peer_uid(conn)
        except OSError as e:  # the client is already gone
            log.debug("SO_PEERCRED: %s", e)
            conn.close()
            return
        refusal = self.admission.admit(uid)
        if refusal is not None:
            now = time.monotonic()
            if now - self._refusal_logged >= REFUSAL_LOG_EVERY:  # they can come by thousands
                self._refusal_logged = now
                log.warning("%s (uid %d; %d refused so far)", refusal, uid, self.admission.refused)
            try:  # the socket is new and empty: one line fits, a non-blocking send never waits
                conn.send(_line({"exit": LaunchError.exit_code, "stderr": [f"sdexec: {refusal}"]}))
            except OSError:
                pass
            conn.close()
            return
        self._spawn(self._serve_admitted(conn, uid))

    async def _serve_admitted(self, conn: socket.socket, uid: int) -> None:
        try:
            await self.handle(conn)
        finally:
            self.admission.release(uid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def readopt(self) -> None:
        """Take over jobs whose launcher died, so none is left unwatched; drop statuses that
        waited too long for an attach."""
        manager = "user" if self.user else "system"
        try:
            db = self._state()
            records = db.list_jobs()
        except SdexecError as e:
            log.error("cannot re-attach to jobs: %s", e)
            return
        now = time.time()
        for r in records:
            if r.state == "finished" and now - r.updated_at > KEEP_UNCLAIMED_SEC:
                log.info("job %s: nobody collected its status in a day; dropping it", r.jobid)
                db_remove(db, r.jobid, r.rank)
        orphans = {
            r.jobid
            for r in records
            if r.live and r.service == "sdexec" and r.manager == manager and not r.launcher_alive()
        }
        for jobid in sorted(orphans):
            try:
                await self.adopt(jobid)
            except SdexecError as e:
                log.warning("could not re-attach to job %s: %s", jobid, e)

    async def adopt(self, jobid: str) -> tuple[Handle, asyncio.Task[int | None]]:
        """Track a job whose launcher died, once, however many ask (start-up, clients)."""
        entry = self.adopted.get(jobid)
        if entry is not None:
            return await asyncio.shield(entry)
        entry = self.adopted[jobid] = asyncio.get_running_loop().create_future()
        try:
            handle = await attach_job(
                self.cfg, jobid, user_manager=self.user, db=self._state(), launcher=self.launcher
            )
        except BaseException as e:
            del self.adopted[jobid]
            if isinstance(e, Exception):
                entry.set_exception(e)
                entry.exception()  # marked retrieved: nobody else may be waiting
            else:
                entry.cancel()
            raise
        log.info("re-attached to job %s", jobid)
        # Its status must reach someone: an attach waiting now claims it, else the record
        # keeps it for the client that will come back (or 'sdexec attach').
        handle.keep_records = True
        task = asyncio.ensure_future(self._finish_adopted(handle))

        def ended(_t: object) -> None:
            # once it ended, its status is given (once) and the entry goes: nothing piles up
            self.adopted.pop(jobid, None)
            if handle.jobs and all(j.result == "not-started" for j in handle.jobs):
                error = next((j.error for j in handle.jobs if j.error), None)
                self._remember_unstarted(jobid, handle.owner_uids, error or "was not started")

        task.add_done_callback(ended)
        entry.set_result((handle, task))
        return handle, task

    def _remember_unstarted(self, jobid: str, owners: set[int], error: str) -> None:
        now = time.monotonic()
        self.unstarted[jobid] = (frozenset(owners), error, now)
        self.unstarted.move_to_end(jobid)
        while self.unstarted and (
            len(self.unstarted) > UNSTARTED_MAX
            or now - next(iter(self.unstarted.values()))[2] > UNSTARTED_KEEP_SEC
        ):
            self.unstarted.popitem(last=False)

    def _unstarted(self, jobid: str, peer: int) -> str | None:
        """What a re-attaching client hears of a job found never started, if it is its own."""
        entry = self.unstarted.get(jobid)
        if entry is None or time.monotonic() - entry[2] > UNSTARTED_KEEP_SEC:
            return None
        owners, error, _ = entry
        if is_stranger(peer) and owners != {peer}:
            return None
        del self.unstarted[jobid]  # told once, like a kept status
        return error

    async def _finish_adopted(self, handle: Handle) -> int | None:
        kill = True
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            kill = False
            raise
        finally:
            await handle.close(kill=kill)

    async def handle(self, conn: socket.socket) -> None:
        """One client: whatever it sends, it gets one answer line, and the server goes on."""
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        handle: Handle | None = None
        kill = True
        try:
            conn.setblocking(False)
            request, fds, rest = await self._receive(conn)
            peer = _peer_uid(conn)
            if request["op"] == "attach":
                code, lines, done = await self._attach(request, peer)
            else:
                code, lines, handle = await self._run(conn, request, fds, rest, peer)
                done = handle
            # the last message: what the client prints and exits with, and the job's report
            # (the --json line's object, accounting included) for clients that read it;
            # clients ignore keys they do not know
            final = {"exit": code, "stderr": lines, "report": done.report()}
            await loop.sock_sendall(conn, _line(final))
        except SdexecError as e:
            await _send_quietly(conn, {"exit": e.exit_code, "stderr": [f"sdexec: {e}"]})
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            await _send_quietly(conn, {"exit": 2, "stderr": [f"sdexec: bad request: {e}"]})
        except OSError as e:
            log.info("client went away: %s", e)
        except asyncio.CancelledError:
            kill = False  # the server stops: the job goes on, the next server takes it over
            raise
        except Exception:  # a bug must cost one request, never the server
            log.exception("request failed")
            await _send_quietly(
                conn,
                {"exit": 125, "stderr": ["sdexec: internal error (see the sdexec server's log)"]},
            )
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if handle is not None:
                await handle.close(kill=kill)
            conn.close()

    async def _receive(self, conn: socket.socket) -> tuple[dict[str, Any], list[int], bytes]:
        """The request line and the client's three stdio fds (sent with its first bytes).

        Bounded by ``[sdexec] request-timeout``: a connection that sends nothing (or half a
        line) is answered 125 and closed rather than held forever (issue 9, H2).
        """
        timeout = self.cfg.sdexec.request_timeout
        fds: list[int] = []
        try:
            async with asyncio.timeout(timeout):
                return await self._receive_request(conn, fds)
        except BaseException as e:
            _close_all(fds)  # a request refused after its fds arrived must not leak them
            if isinstance(e, TimeoutError):
                raise LaunchError(
                    f"no complete request within {timeout:g}s ([sdexec] request-timeout); "
                    "closing the connection"
                ) from None
            raise

    async def _receive_request(
        self, conn: socket.socket, fds: list[int]
    ) -> tuple[dict[str, Any], list[int], bytes]:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()

        def ready() -> None:  # may fire again before the reader is removed
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(conn.fileno(), ready)
        try:
            await readable
        finally:
            loop.remove_reader(conn.fileno())
        data, truncated = _recv_with_fds(conn, fds)
        if truncated and len(fds) < 3:
            # The kernel could not install the client's descriptors here (EMFILE: the server
            # is at its fd limit) and dropped them: a shortage, not the client's mistake.
            raise LaunchError(
                "the sdexec server is short of file descriptors and could not receive this "
                "client's stdin, stdout and stderr; retry"
            )
        if truncated:
            raise UsageError(
                "expected the client's stdin, stdout and stderr (and a PMI socket), got more fds"
            )
        while b"\n" not in data:
            if len(data) > MAX_REQUEST:
                raise UsageError("the request is too large")
            more = await loop.sock_recv(conn, 65536)
            if not more:
                raise UsageError("the request ended early")
            data += more
        line, _, rest = data.partition(b"\n")
        request = decode_request(line)
        # stdin, stdout, stderr, and the PMI socket of a task of a resource manager's step
        wanted = 4 if request.get("pmi_fd") is True else 3
        if request["op"] == "run" and len(fds) != wanted:  # the caller closes them
            raise UsageError(f"expected the client's stdin, stdout and stderr, got {len(fds)} fds")
        return request, list(fds), rest

    async def _attach(self, request: dict[str, Any], peer: int) -> tuple[int, list[str], Handle]:
        """A client asks for a job's end: its own run's after losing the server, or any job
        of its owner (``sdexec attach``). Ownership is checked before anything is touched."""
        jobid = request.get("jobid")
        if not isinstance(jobid, str):
            raise UsageError("bad request: attach needs a job id (a string)")
        check_jobid(jobid)
        json_out = request.get("json") is True
        verbose = request.get("verbose") is True
        db = self._state()
        recs = db.list_jobs(jobid=jobid)
        if not recs and jobid not in self.adopted:
            error = self._unstarted(jobid, peer)
            if error is not None:
                raise LaunchError(f"job {jobid}: {error}; it did not run")
        check_attach(recs, jobid, peer)
        running = self.running.get(jobid)
        if running is not None:  # a client of ours that went away: its job is still ours
            handle, rc = await asyncio.shield(running)
        else:
            handle, task = await self.adopt(jobid)
            rc = await asyncio.shield(task)
        for r in db.list_jobs(jobid=jobid):  # the status goes to this attacher, once
            if r.state == "finished":
                db_remove(db, r.jobid, r.rank)
        code, lines = outcome(handle, rc, json_out=json_out, verbose=verbose)
        return code, lines, handle

    def _parse(self, argv: Any) -> Any:
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise UsageError("bad request: argv must be a list of strings")
        args = self.parser.parse_args(["run", *argv])
        if args.config is not None:
            raise UsageError(
                "--config: the sdexec server runs the node's configuration; to try another, "
                "run in-process: SDEXEC_NO_SERVER=1 sdexec run --config PATH ..."
            )
        if args.user != self.user:
            which = "user" if self.user else "system"
            raise UsageError(f"--user: this sdexec server runs jobs of the {which} manager")
        return args

    async def _run(
        self,
        conn: socket.socket,
        request: dict[str, Any],
        fds: list[int],
        rest: bytes,
        peer: int,
    ) -> tuple[int, list[str], Handle]:
        loop = asyncio.get_running_loop()
        args = self._parse(request.get("argv"))
        env, cwd = request.get("env"), request.get("cwd")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise UsageError("bad request: env must be an object of strings")
        if not isinstance(cwd, str):
            raise UsageError("bad request: cwd must be a string")
        owner = _owner(peer, args.owner)
        req = build_request(args, env, cwd, owner, caller_uid=peer)
        if req.pmi is not None:  # the barrier speaks on (a dup of) the client's PMI socket
            req.pmi = replace(req.pmi, fd=fds[3] if len(fds) == 4 else None)
        service = select_service(self.cfg, req)
        if req.jobid in self.running:
            raise RefusedError(f"job {req.jobid} is already running on this node")
        done: asyncio.Future[tuple[Handle, int | None]] = loop.create_future()
        self.running[req.jobid] = done

        async def accepted() -> None:
            # the job id before anything starts: a client that loses us can follow the job
            await loop.sock_sendall(conn, _line({"accepted": req.jobid}))

        try:
            handle = await start_job(
                self.cfg, req, service, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                launcher=self.launcher if service == "sdexec" else None, db=self._state(),
                on_accepted=accepted,
            )  # fmt: skip
        except BaseException as e:
            del self.running[req.jobid]
            if isinstance(e, Exception):
                done.set_exception(e)
                done.exception()  # nobody may be waiting: marked retrieved
            else:
                done.cancel()
            raise
        for fd in fds:  # the unit (or the process) holds its own copies now
            os.close(fd)
        fds.clear()
        timer = None
        if req.time_limit:
            timer = loop.call_later(req.time_limit, handle.cancel, "timeout")
        listener = asyncio.ensure_future(self._listen(conn, handle, rest))
        try:
            await _send_quietly(conn, {"started": req.jobid})
            rc = await handle.wait()
            done.set_result((handle, rc))
        except asyncio.CancelledError:
            done.cancel()
            await handle.close(kill=False)
            raise
        finally:
            self.running.pop(req.jobid, None)
            listener.cancel()
            if timer is not None:
                timer.cancel()
        verbose = bool(getattr(args, "verbose", 0))
        code, lines = outcome(handle, rc, json_out=args.json is True, verbose=verbose)
        return code, lines, handle

    async def _listen(self, conn: socket.socket, handle: Handle, pending: bytes) -> None:
        """Cancels from the client (its Ctrl-C); its going away does not end the job."""
        loop = asyncio.get_running_loop()
        buf = pending
        while True:
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if _is_cancel(line):
                    log.info("job %s: cancelled by the client", handle.jobid)
                    handle.cancel("cancel")
            if len(buf) > 4096:
                buf = b""  # a client sends only cancels: anything else is dropped, bounded
            try:
                more = await loop.sock_recv(conn, 4096)
            except OSError:
                more = b""
            if not more:
                # Nobody will read the status when the job ends: keep it for 'sdexec attach'
                # (M2: the README's recovery after the client was killed).
                log.info("job %s: its client went away; the job goes on", handle.jobid)
                handle.keep_records = True
                return
            buf += more


def _recv_with_fds(conn: socket.socket, fds: list[int]) -> tuple[bytes, bool]:
    """One ``recvmsg``: the bytes, the fds appended to ``fds`` (close-on-exec), and whether
    the kernel truncated the fds (``MSG_CTRUNC``: more than fit, or none could be installed)."""
    space = socket.CMSG_SPACE(4 * FD_SIZE)  # stdio, and a resource manager's PMI socket
    data, ancdata, flags, _addr = conn.recvmsg(65536, space, socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return data, bool(flags & socket.MSG_CTRUNC)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


async def _sleep_unless(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        pass


def _is_cancel(line: bytes) -> bool:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(msg, dict) and msg.get("op") == "cancel"


def decode_request(line: bytes) -> dict[str, Any]:
    """One request line as a JSON object of known shape, else a UsageError (a reply, exit 2)."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"bad request: not JSON ({e})") from None
    if not isinstance(request, dict):
        raise UsageError("bad request: not a JSON object")
    if request.get("op") not in ("run", "attach"):
        raise UsageError(f"unknown request {str(request.get('op'))[:40]!r}")
    return request


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode() + b"\n"


async def _send_quietly(conn: socket.socket, msg: dict[str, Any]) -> None:
    try:
        await asyncio.get_running_loop().sock_sendall(conn, _line(msg))
    except OSError:
        pass


def main(args: Any) -> int:
    from sdexec.config.table import load_config

    cfg = load_config(args.config)
    asyncio.run(Server(cfg, user=args.user).serve(args.socket))
    return 0
