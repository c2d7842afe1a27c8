"""End-of-job accounting: what a shell used (wall and CPU time, memory, IO, tasks), and where
each figure came from.

systemd-run prints such figures only as text, and on this project's hosts it has few to give:
systemd 252 prunes an exited unit's cgroup at once (``RemainAfterExit`` keeps the unit, not its
cgroup files), has no ``MemoryPeak`` (254+), and on hybrid hosts whose ``cpuacct`` is not
mounted with ``cpu`` its ``CPUUsageNSec`` is never set. So when a job asks for accounting
(``sdexec run --json``/``-v``, ``JobSpec(accounting=True)``), its unit's main process is the
built-in job shell, which measures from inside the unit, after its command exited and while
the cgroup still exists because the shell is still in it:

- CPU time user/system: the command's ``wait4()`` rusage (the command and every descendant it
  reaped; the shell's own start-up is not counted);
- memory peak, IO bytes, tasks peak: the unit's cgroup files (v2 ``memory.peak``, ``io.stat``,
  ``pids.peak``; v1 ``memory.max_usage_in_bytes``, ``blkio.throttle.io_service_bytes``,
  ``pids.peak``), which include the shell (a few MiB, one task); where the cgroup has no such
  file, the rusage's ``ru_maxrss`` (the largest single process) and ``ru_inblock``/``ru_oublock``.

It hands them to the launcher as the unit's ``STATUS=`` (``NotifyAccess=main``: only the main
process is heard), with a notify barrier so systemd has them before it sees the exit. The
launcher reads them, with systemd's own figures where systemd has them (``MemoryPeak``,
``IO*Bytes``: they win, being the host's; ``CPUUsageNSec`` only where there is no user/system
split, since it counts the shell's own start-up), in one ``GetAll`` at the exit event, before
it stops or resets the unit. A figure nobody could give is ``None`` (JSON
``null``), never 0. Through the IMP the IMP is the main process: it reports the same way if it
can (the test IMP does); a guest's shell is not heard there, since ``NotifyAccess=all`` would
let any of a guest's processes send notify messages (``STOPPING=1``, ``MAINPID=``) for a unit
whose main process is root's. With ``guest-credentials = "systemd"`` our shell is the main
process and runs as the guest: its figures are the guest's own claim about its own job.

The shell's part imports nothing beyond ``os`` (it runs at the end of every such job); the
launcher's part is pure and takes the properties as a mapping.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # the job shell imports this module: typing costs it ~1 ms
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

ENV_VAR = "SDEXEC_ACCOUNTING"
"""Set to ``1`` in a unit's environment: its main process (our shell, or the IMP) reports."""
STATUS_PREFIX = "sdexec-accounting"
"""How a ``StatusText`` carrying figures starts (a unit's status is anyone's to read anyway)."""

FIGURES = (
    "wall_time",
    "cpu_time",
    "cpu_user",
    "cpu_system",
    "memory_peak",
    "io_read_bytes",
    "io_write_bytes",
    "tasks_peak",
)
"""The keys of every report, in order; seconds (floats) for times, bytes/counts (ints) else."""
_FLOATS = frozenset({"wall_time", "cpu_time", "cpu_user", "cpu_system"})

SYSTEMD_PROPERTIES = frozenset(
    {
        "StatusText", "CPUUsageNSec", "MemoryPeak", "IOReadBytes", "IOWriteBytes",
        "TasksPeak", "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic",
    }
)  # fmt: skip
"""What the launcher reads of a finished unit (the Service interface, one GetAll)."""
SIGNALLED = frozenset(
    {"StatusText", "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic"}
)
"""Those that systemd sends in PropertiesChanged too (the launcher keeps them as they come)."""
# Copies, on purpose, of config.memory.UINT64_MAX and systemd.cgroup.CGROUP_ROOT: the job
# shell imports this module at the end of every accounted job and must pay for ``os`` only
# (config.memory compiles regexes, systemd.cgroup imports signal's enums).
_UNSET = (1 << 64) - 1  # systemd's "[not set]" for a uint64 figure
_CGROUP_ROOT = "/sys/fs/cgroup"


# --- inside the unit (the job shell, the test IMP) ---------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def own_cgroups(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; ``""`` is the unified (v2) hierarchy.

    A v1 controller systemd did not realize for the unit shows a path above the unit's own
    (e.g. ``/``): its figures would be a slice's or the machine's, so it is left out.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            out[name.removeprefix("name=")] = path
    unit = out.get("", out.get("systemd", ""))
    if not unit or unit == "/":
        return {}
    return {name: path for name, path in out.items() if path == unit}


def _v2_dir(root: str) -> str | None:
    for base in (root, os.path.join(root, "unified")):
        if os.path.exists(os.path.join(base, "cgroup.controllers")):
            return base
    return None


def _io_v2(lines: Iterable[str]) -> tuple[int, int] | None:
    read = write = 0
    seen = False
    for line in lines:
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if value.isdigit() and key in ("rbytes", "wbytes"):
                seen = True
                if key == "rbytes":
                    read += int(value)
                else:
                    write += int(value)
    return (read, write) if seen else None


def _io_v1(lines: Iterable[str]) -> tuple[int, int] | None:
    read = write = 0
    seen = False
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():  # "MAJ:MIN Op bytes"; "Total N" has two
            seen = True
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                write += int(parts[2])
    return (read, write) if seen else None


def cgroup_figures(proc_self_cgroup: str, root: str = _CGROUP_ROOT) -> dict[str, int]:
    """What the unit's own cgroup says of its peaks and IO, read from inside it (v2 or v1)."""
    groups = own_cgroups(proc_self_cgroup)
    out: dict[str, int] = {}
    if not groups:
        return out
    v2 = _v2_dir(root)
    if v2 is not None and "" in groups:
        unified = os.path.join(v2, groups[""].lstrip("/"))
        peak = _read_int(os.path.join(unified, "memory.peak"))
        if peak is not None:
            out["memory_peak"] = peak
        tasks = _read_int(os.path.join(unified, "pids.peak"))
        if tasks is not None:
            out["tasks_peak"] = tasks
        io = _io_v2(_read_lines(os.path.join(unified, "io.stat")))
        if io is not None:
            out["io_read_bytes"], out["io_write_bytes"] = io
    v1 = {  # the v1 controllers systemd realized for this unit (hybrid hosts)
        name: os.path.join(root, name, path.lstrip("/"))
        for name, path in groups.items()
        if name in ("memory", "pids", "blkio")
    }
    if "memory_peak" not in out and "memory" in v1:
        peak = _read_int(os.path.join(v1["memory"], "memory.max_usage_in_bytes"))
        if peak is not None:
            out["memory_peak"] = peak
    if "tasks_peak" not in out and "pids" in v1:
        tasks = _read_int(os.path.join(v1["pids"], "pids.peak"))
        if tasks is not None:
            out["tasks_peak"] = tasks
    if "io_read_bytes" not in out and "blkio" in v1:
        io = _io_v1(_read_lines(os.path.join(v1["blkio"], "blkio.throttle.io_service_bytes")))
        if io is not None:
            out["io_read_bytes"], out["io_write_bytes"] = io
    return out


def measure(rusage: Any, wall_time: float, proc_self_cgroup: str | None = None) -> str:
    """The ``STATUS=`` text for a command that ran ``wall_time`` seconds and was reaped with
    ``rusage`` (``os.wait4``'s): ``sdexec-accounting KEY=VALUE/SOURCE ...``, plain text so
    ``systemctl status`` shows it readably and the shell needs no json."""
    if proc_self_cgroup is None:
        try:
            with open("/proc/self/cgroup") as f:
                proc_self_cgroup = f.read()
        except OSError:
            proc_self_cgroup = ""
    figures: dict[str, tuple[float | int, str]] = {
        "wall_time": (wall_time, "shell"),
        "cpu_user": (float(rusage.ru_utime), "rusage"),
        "cpu_system": (float(rusage.ru_stime), "rusage"),
    }
    for key, value in cgroup_figures(proc_self_cgroup).items():
        figures[key] = (value, "cgroup")
    # ru_maxrss is in KiB on Linux; ru_inblock/ru_oublock count 512-byte blocks
    figures.setdefault("memory_peak", (int(rusage.ru_maxrss) * 1024, "rusage"))
    figures.setdefault("io_read_bytes", (int(rusage.ru_inblock) * 512, "rusage"))
    figures.setdefault("io_write_bytes", (int(rusage.ru_oublock) * 512, "rusage"))
    fields = [
        f"{key}={value:.6f}/{source}" if isinstance(value, float) else f"{key}={value}/{source}"
        for key, (value, source) in figures.items()
    ]
    return " ".join([STATUS_PREFIX, *fields])


def notify(state: str, timeout: float = 5.0) -> bool:
    """Send ``state`` to ``$NOTIFY_SOCKET``, then wait until systemd has read it (the
    ``BARRIER=1`` protocol: it closes the fd we pass once it has processed what came before):
    the status must be there before systemd handles our exit. False when nobody listens."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    import select
    import socket

    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)  # (socket.send_fds ignores an address)
            sock.send(state.encode())
            r, w = os.pipe()
            try:
                socket.send_fds(sock, [b"BARRIER=1"], [w])
                os.close(w)
                w = -1
                poller = select.poll()
                poller.register(r, select.POLLHUP)
                poller.poll(int(timeout * 1000))
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
    except OSError:
        return False
    return True


def report_from_unit(rusage: Any, wall_time: float) -> None:
    """The shell's (or the IMP's) part, when its unit asked for it: measure and tell systemd."""
    if os.environ.get(ENV_VAR) == "1":
        notify("STATUS=" + measure(rusage, wall_time))


# --- the launcher's part ----------------------------------------------------------------------


def parse_status(text: str) -> dict[str, tuple[float | int, str]]:
    """A ``StatusText`` written by :func:`measure`, as {figure: (value, source)}; anything else
    (another status, a malformed or hostile one) gives what is well-formed of it, or nothing."""
    if not isinstance(text, str) or not text.startswith(STATUS_PREFIX + " "):
        return {}
    out: dict[str, tuple[float | int, str]] = {}
    for field in text[len(STATUS_PREFIX) + 1 :].split()[: 2 * len(FIGURES)]:
        key, _, rest = field.partition("=")
        value, _, source = rest.partition("/")
        if key not in FIGURES or source not in ("shell", "rusage", "cgroup", "imp"):
            continue
        try:
            number: float | int = float(value) if key in _FLOATS else int(value)
        except ValueError:
            continue
        if not 0 <= number <= 1e18:  # negative, NaN or absurd
            continue
        out[key] = (number, source)
    return out


def _systemd_figures(props: Mapping[str, Any]) -> dict[str, tuple[float | int, str]]:
    def number(name: str) -> int | None:
        value = props.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value in (_UNSET, -1):
            return None
        return value if value >= 0 else None

    out: dict[str, tuple[float | int, str]] = {}
    cpu = number("CPUUsageNSec")
    if cpu is not None:
        out["cpu_time"] = (cpu / 1e9, "systemd")
    for key, name in (
        ("memory_peak", "MemoryPeak"),
        ("io_read_bytes", "IOReadBytes"),
        ("io_write_bytes", "IOWriteBytes"),
        ("tasks_peak", "TasksPeak"),
    ):
        value = number(name)
        if value is not None:
            out[key] = (value, "systemd")
    start = number("ExecMainStartTimestampMonotonic")
    end = number("ExecMainExitTimestampMonotonic")
    if start and end and end >= start:
        out["wall_time"] = ((end - start) / 1e6, "systemd")
    return out


class Accounting:
    """One shell's figures and their sources; ``None`` for what nobody could give."""

    def __init__(self) -> None:
        self.figures: dict[str, tuple[float | int, str]] = {}
        self.collected = False  # a finished unit's figures were read (or nothing was to read)

    def note_wall_time(self, seconds: float) -> None:
        """The launcher's own measure (start event to exit event), the fallback of all."""
        self.figures.setdefault("wall_time", (max(seconds, 0.0), "launcher"))

    def update_from_unit(self, props: Mapping[str, Any]) -> None:
        """A finished unit's Service properties: systemd's figures win over the shell's
        (the host's own accounting), the shell's over the launcher's wall time."""
        shell = parse_status(str(props.get("StatusText", "") or ""))
        systemd = _systemd_figures(props)
        merged = dict(self.figures)
        merged.update(shell)
        merged.update(systemd)
        if "cpu_user" in shell and "cpu_system" in shell:
            # the job's own CPU time, split, over the unit's total (CPUUsageNSec counts our
            # shell's start-up too: 0.85 s of 2.5 s under qemu TCG): cpu_time = user + system
            merged.pop("cpu_time", None)
        self.figures = merged
        self.collected = True

    def value(self, key: str) -> float | int | None:
        item = self.figures.get(key)
        if item is None:
            if key == "cpu_time":
                user, system = self.figures.get("cpu_user"), self.figures.get("cpu_system")
                if user is not None and system is not None:
                    return round(float(user[0]) + float(system[0]), 6)
            return None
        return round(float(item[0]), 6) if key in _FLOATS else int(item[0])

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (pinned by the tests): every figure key, and ``sources``."""
        out: dict[str, Any] = {key: self.value(key) for key in FIGURES}
        sources = {key: source for key, (_v, source) in self.figures.items()}
        if out["cpu_time"] is not None and "cpu_time" not in sources:
            sources["cpu_time"] = sources.get("cpu_user", "rusage")
        out["sources"] = {key: sources[key] for key in FIGURES if key in sources}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Accounting:
        """Back from a record (``sdexec attach`` of a job that ended with nobody there)."""
        acct = cls()
        if not isinstance(data, dict):
            return acct
        sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
        assert isinstance(sources, dict)
        for key in FIGURES:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                continue
            if key == "cpu_time" and "cpu_time" not in sources:
                continue  # derived from user + system again
            acct.figures[key] = (value, str(sources.get(key, "record")))
        acct.collected = True
        return acct


def format_bytes(n: float | None) -> str:
    """systemd's way: 1024-based, one decimal (``201.3M``)."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def format_timespan(s: float | None) -> str:
    """``141ms``, ``2.513s``, ``3min 2.100s`` (close to systemd's timespans)."""
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s * 1000:.0f}ms" if s >= 0.001 else f"{s * 1e6:.0f}us"
    if s < 60:
        return f"{s:.3f}s"
    minutes, rest = divmod(s, 60)
    if minutes < 60:
        return f"{int(minutes)}min {rest:.3f}s"
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes}min {rest:.0f}s"


def human_line(unit: str, result: str | None, status: str, acct: Mapping[str, Any]) -> str:
    """One line, like the lines ``systemd-run --wait`` prints at the end (``-v``)."""
    parts = [
        f"Finished with result: {result or 'unknown'}",
        f"Main process terminated with: {status}",
    ]
    parts.append(f"Service runtime: {format_timespan(acct.get('wall_time'))}")
    cpu = acct.get("cpu_time")
    text = f"CPU time consumed: {format_timespan(cpu)}"
    if acct.get("cpu_user") is not None and acct.get("cpu_system") is not None:
        user, system = format_timespan(acct["cpu_user"]), format_timespan(acct["cpu_system"])
        text += f" (user {user}, system {system})"
    parts.append(text)
    parts.append(f"Memory peak: {format_bytes(acct.get('memory_peak'))}")
    parts.append(
        f"IO bytes read: {format_bytes(acct.get('io_read_bytes'))}, "
        f"written: {format_bytes(acct.get('io_write_bytes'))}"
    )
    tasks = acct.get("tasks_peak")
    parts.append(f"Tasks peak: {tasks if tasks is not None else 'n/a'}")
    return f"sdexec: {unit}: " + "; ".join(parts)
