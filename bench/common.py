"""Shared pieces of the benchmarks: the raw dbus-fast baseline client, host facts, cleanup.

The raw client is the yardstick. It makes the fewest bus calls that run a unit the way the
launcher does (match rule before the start, exit seen through ``PropertiesChanged``, stop or
reset-failed, match removed) with no job model on top, so whatever the launcher costs beyond
it is the library's own overhead. It is kept in one process with the launcher's runs, on the
same systemd, so both see the same machine at (nearly) the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
UNIT_NAMESPACE = "/org/freedesktop/systemd1/unit"

# every unit a benchmark starts has "bench-" right after its rank: these find the leftovers
UNIT_PATTERNS = ("shell-*-bench-*.service", "imp-shell-*-bench-*.service")
CLD_CODES = (1, 2, 3)  # ExecMainCode: exited, killed, dumped


def log(msg: str) -> None:
    """Progress goes to stderr: stdout carries exactly one JSON object."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class LogCounter(logging.Handler):
    """Counts the library's log records by message template, passing only the first few on.

    A burst of failures would log one line per unit: the counts go into the JSON instead.
    """

    def __init__(self, show: int = 3) -> None:
        super().__init__(logging.DEBUG)
        self.show = show
        self.counts: dict[str, int] = {}
        self._out = logging.StreamHandler(sys.stderr)
        self._out.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name} {record.levelname}: {record.msg}"
        n = self.counts[key] = self.counts.get(key, 0) + 1
        if n <= self.show:
            self._out.emit(record)
        elif n == self.show + 1:
            sys.stderr.write(f"{record.name}: ... more of {record.msg!r} counted, not shown\n")

    @classmethod
    def install(cls, level: int = logging.WARNING) -> LogCounter:
        handler = cls()
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level)
        return handler


def emit(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def run_prefix() -> str:
    """Job ids unique per run, and all matched by UNIT_PATTERNS."""
    return f"bench-{os.getpid()}-{os.urandom(2).hex()}"


# --- statistics ---------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def p90(xs: Sequence[float]) -> float:
    """Nearest-rank 90th percentile: with 30 samples, the 27th smallest."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, -(-9 * len(s) // 10) - 1)
    return float(s[k])


def rnd(x: float, nd: int = 3) -> float:
    return round(x, nd)


# --- host facts ---------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0].strip() if out.stdout else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pids_limit() -> tuple[int | None, int | None]:
    """(pids.max, pids.current) of this container's cgroup: it caps concurrent units."""
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        mx, cur = _read(f"{base}/pids.max"), _read(f"{base}/pids.current")
        if mx is not None:
            return (None if mx == "max" else int(mx)), (int(cur) if cur else None)
    return None, None


def host_facts() -> dict[str, Any]:
    model = None
    cpuinfo = _read("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    pmax, pcur = pids_limit()
    return {
        "systemd": _first_line(["systemctl", "--version"]),
        "dbus_daemon": _first_line(["dbus-daemon", "--version"]),
        "virtualization": _first_line(["systemd-detect-virt"]),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "dbus_fast": _version("dbus-fast"),
        "psutil": _version("psutil"),
        "sdexec": _version("sdexec"),
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_mb": mem_kb // 1024 if mem_kb else None,
        "cgroup": "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1",
        "pids_max": pmax,
        "pids_current": pcur,
        "nofile": [soft, hard],
        "loadavg": list(os.getloadavg()),
    }


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise the soft fd limit towards ``wanted`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class CpuMeter:
    """CPU seconds spent by us, systemd (PID 1) and dbus-daemon over an interval.

    The launcher's cost is not only its own CPU: extra calls show up in systemd and the bus.
    """

    def __init__(self) -> None:
        import psutil

        self._ps = psutil
        self._pid1 = psutil.Process(1)
        self._bus: Any = None
        # the system bus's daemon: a user's session bus (left by a test) is another one
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.info["name"] == "dbus-daemon" and "--system" in (p.info["cmdline"] or []):
                self._bus = p
                break
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        def cpu(p: Any) -> float:
            if p is None:
                return float("nan")
            try:
                t = p.cpu_times()
                return float(t.user + t.system)
            except self._ps.Error:
                return float("nan")

        return time.process_time(), cpu(self._pid1), cpu(self._bus)

    def per_unit_ms(self, units: int) -> dict[str, float]:
        end = self._sample()
        d = [(b - a) * 1000 / max(units, 1) for a, b in zip(self._start, end, strict=True)]
        return {"self_cpu_ms": rnd(d[0]), "systemd_cpu_ms": rnd(d[1]), "dbus_cpu_ms": rnd(d[2])}


# --- the raw client -----------------------------------------------------------------------


class RawCallError(Exception):
    def __init__(self, member: str, name: str, text: str) -> None:
        super().__init__(f"{member}: {text} ({name})")
        self.member = member
        self.name = name
        self.text = text


def unit_object_path(name: str) -> str:
    """systemd's bus path of a unit: every byte outside [A-Za-z0-9] becomes _xx."""
    out = "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in name.encode()
    )
    return f"{UNIT_NAMESPACE}/{out}"


@dataclass(slots=True, eq=False)
class RawUnit:
    """Only what the raw client needs to know about a unit: state, exit, three events."""

    name: str
    path: str
    active: str = ""
    sub: str = ""
    code: int = 0
    status: int = 0
    was_active: bool = False
    failed: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, changed: Mapping[str, Variant]) -> None:
        v = changed.get("ActiveState")
        if v is not None:
            self.active = str(v.value)
        v = changed.get("SubState")
        if v is not None:
            self.sub = str(v.value)
        v = changed.get("ExecMainCode")
        if v is not None:
            self.code = int(v.value)
        v = changed.get("ExecMainStatus")
        if v is not None:
            self.status = int(v.value)
        if self.active in ("activating", "active", "deactivating", "failed"):
            self.was_active = True
        if self.active == "active":
            self.started.set()
        if self.code in CLD_CODES and self.active == "active" and self.sub == "exited":
            self.exited.set()  # RemainAfterExit kept it: ours to stop
        if self.active in ("inactive", "failed") and self.was_active:
            self.failed = self.active == "failed"
            self.started.set()
            self.exited.set()
            self.gone.set()


class RawClient:
    """A minimal systemd client on dbus-fast: what a hand-written launcher would do."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: bool = True,
        getall: bool = False,
        max_in_flight: int = 64,
    ) -> None:
        self.env = [f"{k}={v}" for k, v in (os.environ if env is None else env).items()]
        self.pass_fds = pass_fds
        self.getall = getall
        self.units: dict[str, RawUnit] = {}
        self.matched: set[str] = set()
        self.namespace_match_at: int | None = None  # matches held when the limit was hit
        self.systemd_left_bus = 0  # times systemd's connection went away while we watched
        self.systemd_left_after: int | None = None  # our calls sent when it first did
        self.calls_sent = 0
        self._slots = asyncio.Semaphore(max_in_flight)  # the bus caps pending replies at 128
        self._switch = asyncio.Lock()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._namespace_rule = (
            f"type='signal',sender='{SYSTEMD}',path_namespace='{UNIT_NAMESPACE}',"
            f"interface='{PROPS_IFACE}',member='PropertiesChanged'"
        )
        self._bus: MessageBus | None = None

    async def connect(self) -> None:
        bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        await bus.connect()
        bus.add_message_handler(self._on_message)
        self._bus = bus
        await self._dbus(
            "AddMatch",
            f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',"
            f"arg0='{SYSTEMD}'",
        )
        await self.call("Subscribe")

    async def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        destination: str = SYSTEMD,
        unix_fds: Sequence[int] = (),
    ) -> list[Any]:
        assert self._bus is not None, "not connected"
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            unix_fds=list(unix_fds),
        )
        async with self._slots:
            self.calls_sent += 1
            reply = await self._bus.call(msg)
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise RawCallError(member, reply.error_name or "", text)
        return list(reply.body)

    def _rule(self, path: str) -> str:
        return (
            f"type='signal',sender='{SYSTEMD}',path='{path}',"
            f"interface='{PROPS_IFACE}',member='PropertiesChanged'"
        )

    async def _dbus(self, member: str, rule: str) -> None:
        await self.call(member, "s", [rule], path=DBUS_PATH, interface=DBUS, destination=DBUS)

    async def _match(self, path: str) -> None:
        if self.namespace_match_at is not None:
            return
        try:
            await self._dbus("AddMatch", self._rule(path))
            self.matched.add(path)
        except RawCallError as e:
            if "LimitsExceeded" not in e.name:
                raise
            await self._switch_to_namespace()

    async def watch_all_units(self) -> None:
        """One rule for every unit from the start, so the match-rule cap is not in play."""
        if self.namespace_match_at is None:
            await self._dbus("AddMatch", self._namespace_rule)
            self.namespace_match_at = len(self.matched)

    async def _switch_to_namespace(self) -> None:
        """Past dbus-daemon's match-rule cap: one rule for every unit, filtered here.

        The cap is already reached, so the wider rule only fits once one of ours is gone:
        drop a per-unit rule, add the namespace rule (again if a racing AddMatch took the
        slot), then re-read the dropped units, whose signals in between may be lost.
        """
        async with self._switch:
            if self.namespace_match_at is not None:
                return
            held = len(self.matched)
            dropped: list[str] = []
            while True:
                if not self.matched:
                    raise RawCallError("AddMatch", "LimitsExceeded", "no rule of ours to drop")
                victim = self.matched.pop()
                await self._dbus("RemoveMatch", self._rule(victim))
                dropped.append(victim)
                try:
                    await self._dbus("AddMatch", self._namespace_rule)
                    break
                except RawCallError as e:
                    if "LimitsExceeded" not in e.name:
                        raise
            self.namespace_match_at = held
            for path in dropped:
                unit = self.units.get(path)
                if unit is not None:
                    props = await self.call("GetAll", "s", [""], path=path, interface=PROPS_IFACE)
                    unit.update(props[0])

    async def _unmatch(self, path: str) -> None:
        if path in self.matched:
            self.matched.discard(path)
            await self._dbus("RemoveMatch", self._rule(path))

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == SYSTEMD:
            if not msg.body[2]:
                self.systemd_left_bus += 1
                if self.systemd_left_after is None:
                    self.systemd_left_after = self.calls_sent
                log(f"systemd left the bus (after {self.calls_sent} calls of ours)")
            else:  # back: re-subscribe (systemd 252 may still remember us: AlreadySubscribed)
                task = asyncio.ensure_future(self.call("Subscribe"))
                self._tasks.add(task)
                task.add_done_callback(self._subscribed)
            return
        if msg.member != "PropertiesChanged":
            return
        unit = self.units.get(msg.path or "")
        if unit is not None and len(msg.body) > 1:
            unit.update(msg.body[1])

    def _subscribed(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log(f"re-Subscribe: {task.exception()}")

    async def start(self, jobid: str, argv: Sequence[str]) -> RawUnit:
        """Match, StartTransientUnit (same properties as the launcher's), until active or gone."""
        name = f"shell-0-{jobid}.service"
        unit = RawUnit(name, unit_object_path(name))
        self.units[unit.path] = unit
        await self._match(unit.path)
        props: list[list[Any]] = [
            ["Description", Variant("s", f"User workload (job {jobid})")],
            ["ExecStart", Variant("a(sasb)", [[argv[0], list(argv), False]])],
            ["WorkingDirectory", Variant("s", os.getcwd())],
            ["Environment", Variant("as", self.env)],
            ["RemainAfterExit", Variant("b", True)],
            ["Type", Variant("s", "exec")],
        ]
        fds: list[int] = []
        try:
            if self.pass_fds:
                fds = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]
                props += [
                    ["StandardInputFileDescriptor", Variant("h", 0)],
                    ["StandardOutputFileDescriptor", Variant("h", 1)],
                    ["StandardErrorFileDescriptor", Variant("h", 2)],
                ]
            await self.call(
                "StartTransientUnit",
                "ssa(sv)a(sa(sv))",
                [name, "fail", props, []],
                unix_fds=fds,
            )
        except BaseException:
            self.units.pop(unit.path, None)
            await self._unmatch(unit.path)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        await unit.started.wait()
        if self.getall:
            await self.call("GetAll", "s", [""], path=unit.path, interface=PROPS_IFACE)
        return unit

    async def finish(self, unit: RawUnit) -> None:
        """Stop a unit whose main process exited (unless it failed), reset it, drop the match.

        Only a unit in active/exited is stopped: one that is dying of a signal ends by itself,
        and a stop job for it would only add to systemd's pending jobs.
        """
        if not unit.gone.is_set() and unit.active == "active" and unit.sub == "exited":
            with contextlib.suppress(RawCallError):
                await self.call("StopUnit", "ss", [unit.name, "fail"])
        await unit.gone.wait()
        if unit.failed:
            with contextlib.suppress(RawCallError):
                await self.call("ResetFailedUnit", "s", [unit.name])
        self.units.pop(unit.path, None)
        await self._unmatch(unit.path)

    async def run(self, jobid: str, argv: Sequence[str]) -> int:
        """One unit from start to gone; its exit status (or -signal)."""
        unit = await self.start(jobid, argv)
        await unit.exited.wait()
        await self.finish(unit)
        return unit.status if unit.code == 1 else -unit.status

    async def kill(self, unit: RawUnit, signum: int = signal.SIGKILL) -> None:
        if not unit.gone.is_set():
            with contextlib.suppress(RawCallError):
                await self.call("KillUnit", "ssi", [unit.name, "all", int(signum)])
        await unit.exited.wait()
        await self.finish(unit)


# --- cleanup ------------------------------------------------------------------------------


async def cleanup_units(patterns: Iterable[str] = UNIT_PATTERNS, give_up_s: float = 60.0) -> int:
    """Kill and reset-failed every bench unit left; how many there were.

    A fresh connection, so it still works when the benchmark's own one is what broke. It
    lists units only here, at the end, never as a way of watching them. SIGKILL and
    ResetFailedUnit create no systemd jobs; the few units that need a StopUnit get one at a
    time per slot, each awaited to its JobRemoved: hundreds of pending jobs from one client
    make systemd track that client once per job, past its own match-rule cap (see README).
    """
    pats = list(patterns)
    bus = MessageBus(bus_type=BusType.SYSTEM)
    await bus.connect()
    slots = asyncio.Semaphore(32)
    removed: set[str] = set()
    waiting: dict[str, asyncio.Future[None]] = {}

    def on_message(msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.member == "JobRemoved":
            job = str(msg.body[1])
            fut = waiting.pop(job, None)
            if fut is None:
                removed.add(job)
            elif not fut.done():
                fut.set_result(None)

    async def call(
        member: str,
        sig: str,
        body: list[Any],
        *,
        path: str = MANAGER_PATH,
        iface: str = MANAGER_IFACE,
        dest: str = SYSTEMD,
    ) -> list[Any]:
        msg = Message(
            destination=dest,
            path=path,
            interface=iface,
            member=member,
            signature=sig,
            body=body,
        )
        reply = await bus.call(msg)
        if reply.message_type == MessageType.ERROR:
            raise RawCallError(member, reply.error_name or "", str(reply.body[0]))
        return list(reply.body)

    async def stop(name: str) -> None:
        async with slots:
            job = str((await call("StopUnit", "ss", [name, "replace"]))[0])
            if job in removed:
                return
            fut = asyncio.get_running_loop().create_future()
            waiting[job] = fut
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, 30)

    async def dispose(name: str, active: str, sub: str) -> None:
        with contextlib.suppress(RawCallError):
            async with slots:
                if active == "failed":
                    await call("ResetFailedUnit", "s", [name])
                    return
                if sub != "exited":
                    await call("KillUnit", "ssi", [name, "all", int(signal.SIGKILL)])
                    return
            await stop(name)  # nothing left to kill (RemainAfterExit): only a stop ends it

    bus.add_message_handler(on_message)
    found: set[str] = set()
    deadline = time.monotonic() + give_up_s
    try:
        await call("Subscribe", "", [])
        await call(
            "AddMatch",
            "s",
            [f"type='signal',sender='{SYSTEMD}',interface='{MANAGER_IFACE}',member='JobRemoved'"],
            path=DBUS_PATH,
            iface=DBUS,
            dest=DBUS,
        )
        while True:
            units = (await call("ListUnitsByPatterns", "asas", [[], pats]))[0]
            left = [(u[0], u[3], u[4]) for u in units if u[3] != "inactive"]
            found.update(n for n, _, _ in left)
            if not left or time.monotonic() > deadline:
                if left:
                    log(f"cleanup: {len(left)} bench units still there after {give_up_s:g}s")
                break
            await asyncio.gather(*(dispose(*u) for u in left))
            await asyncio.sleep(0.3)
    finally:
        bus.disconnect()
    if found:
        log(f"cleanup: disposed of {len(found)} leftover bench unit(s)")
    return len(found)


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the main task like Ctrl-C does, so ``finally`` cleans up."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def workers(count: int, concurrency: int, one: Callable[[int], Any]) -> list[BaseException]:
    """Run ``one(i)`` for i in range(count), ``concurrency`` at a time; the errors raised."""
    it = iter(range(count))
    errors: list[BaseException] = []

    async def worker() -> None:
        for i in it:
            try:
                await one(i)
            except Exception as e:
                errors.append(e)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return errors


def error_summary(errors: Sequence[BaseException], limit: int = 5) -> dict[str, int]:
    """Distinct error messages and their counts: a limit hit shows up here verbatim."""
    out: dict[str, int] = {}
    for e in errors:
        key = f"{type(e).__name__}: {e}"[:300]
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:limit])


# --- a raw client of the sdexec server ----------------------------------------------------

SERVER_SOCKET = "/run/sdexec/sdexec.sock"


def server_socket() -> str:
    return os.environ.get("SDEXEC_SOCKET") or SERVER_SOCKET


# The least a Python client program of the server can be (argv: socket, job id, command...):
# the interpreter's start, C modules only, the request with its three fds, the exit read from
# the last line. 32 of these in flight are the floor of 32 `sdexec run` processes: what any
# client written in Python would cost the node's CPUs.
MINIMAL_CLIENT = r"""
import _socket, os, sys
sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
sock.connect(sys.argv[1])
argv = ", ".join('"%s"' % a for a in ["--job", sys.argv[2], "--", *sys.argv[3:]])
req = '{"op": "run", "argv": [%s], "env": {"PATH": "/usr/bin:/bin"}, "cwd": "/"}\n' % argv
fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
sock.sendmsg([req.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
data = b""
while chunk := sock.recv(65536):
    data += chunk
tail = data.rpartition(b'{"exit": ')[2]
os._exit(int(tail.split(b",")[0]) if tail[:1].isdigit() else 125)
"""


def _server_request(jobid: str, argv: Sequence[str]) -> bytes:
    """What ``sdexec run --job JOBID -- ARGV`` sends, with a small fixed environment."""
    request = {
        "op": "run",
        "argv": ["--job", jobid, "--", *argv],
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "cwd": "/",
    }
    return json.dumps(request).encode() + b"\n"


def _server_exit(data: bytes) -> int:
    for line in data.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and "exit" in msg:
            return int(msg["exit"])
    return -1


def server_run_sync(jobid: str, argv: Sequence[str] = ("/bin/true",)) -> int:
    """One job through the sdexec server, without a client program: connect, the request
    with /dev/null as the three stdio fds, read to the end. The server's own cost per job."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server_socket())
            socket.send_fds(sock, [_server_request(jobid, argv)], [null, null, null])
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    finally:
        os.close(null)
    return _server_exit(b"".join(chunks))


async def server_run(jobid: str, argv: Sequence[str] = ("/bin/true",)) -> int:
    """:func:`server_run_sync` on the event loop (many in flight from one process)."""
    loop = asyncio.get_running_loop()
    null = os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        await loop.sock_connect(sock, server_socket())
        # a request of ~150 bytes on a new socket: one sendmsg takes it whole
        socket.send_fds(sock, [_server_request(jobid, argv)], [null, null, null])
        os.close(null)
        null = -1
        chunks = []
        while chunk := await loop.sock_recv(sock, 65536):
            chunks.append(chunk)
    finally:
        sock.close()
        if null >= 0:
            os.close(null)
    return _server_exit(b"".join(chunks))
