"""The ``[exec]`` table of Flux (flux-config-exec(5)) plus our own ``[sdexec]`` site table.

A Flux conf.d can be pointed at as is: other top-level tables are Flux's business and ignored.
Every problem is collected before raising, so one ``sdexec config check`` shows them all.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import string
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sdexec.config.duration import DurationError, format_fsd, parse_fsd
from sdexec.config.memory import NEVER_SCALED, SCALABLE
from sdexec.config.properties import (
    ENFORCED,
    UnitProperty,
    collect_properties,
    combine_errors,
    is_protected,
)
from sdexec.config.show import dotted, show_value
from sdexec.config.signals import parse_signal, signal_name
from sdexec.errors import ConfigError

__all__ = [
    "DEFAULT_CONF_DIR",
    "DEFAULT_CONF_FILE",
    "DRAIN_PLACEHOLDERS",
    "ExecConfig",
    "SiteConfig",
    "TestexecConfig",
    "default_state_dir",
    "load_config",
    "parse_config",
]

log = logging.getLogger(__name__)

DEFAULT_CONF_DIR = "/etc/sdexec/conf.d"
DEFAULT_CONF_FILE = "/etc/sdexec/exec.toml"
ENV_VAR = "SDEXEC_CONFIG"
SERVICES = ("rexec", "sdexec")
DRAIN_PLACEHOLDERS = ("hostname", "reason", "jobid", "unit")

EXEC_KEYS = (
    "imp",
    "service",
    "service-override",
    "job-shell",
    "sdexec-properties",
    "sdexec-stop-timer-sec",
    "sdexec-stop-timer-signal",
    "kill-timeout",
    "kill-shell-delay",
    "max-term-count",
    "max-kill-count",
    "max-kill-timeout",
    "term-signal",
    "kill-signal",
    "barrier-timeout",
    "testexec",
)
SDEXEC_KEYS = (
    "state-dir",
    "drain-command",
    "slice",
    "allow-properties",
    "allow-unenforced",
    "bind-scale-memory",
    "stdio-eof-timeout",
    "start-timeout",
    "max-connections",
    "max-connections-per-user",
    "request-timeout",
    "guest-credentials",
    "allocation-memory",
)
GUEST_CREDENTIALS = ("imp", "systemd")
MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few KiB: a bigger one (or /dev/zero) is a mistake, not something to read."""
TESTEXEC_KEYS = ("allow-guests",)
MAX_CONNECTIONS = 1 << 18
"""A quarter of Linux's largest descriptor table (fs.nr_open's ceiling is 2**20)."""
OUR_TABLES = ("exec", "sdexec")
# Flux's own tables: never mistaken for a misspelt [exec] even if they look alike.
FLUX_TABLES = frozenset(
    {
        "access", "archive", "bootstrap", "broker", "content", "cron", "heartbeat", "ingest",
        "job-manager", "job-ingest", "kvs", "policy", "queues", "resource", "systemd", "tbon",
        "sched-fluxion-qmanager", "sched-fluxion-resource",
    }
)  # fmt: skip

Path = tuple[str, ...]
FileOf = Callable[[Path], str | None]


def default_state_dir() -> str:
    """Where drain records and job state live when the config does not say."""
    if os.geteuid() == 0:
        return "/var/lib/sdexec"
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "sdexec")


@dataclass(frozen=True)
class TestexecConfig:
    """``[exec.testexec]``: the simulated-job implementation."""

    __test__ = False  # not a pytest test class, despite the name

    allow_guests: bool = False


@dataclass(frozen=True)
class SiteConfig:
    """``[sdexec]``: site settings that Flux's ``[exec]`` has no room for."""

    state_dir: str | None = None
    drain_command: tuple[str, ...] = ()
    slice: str | None = None
    allow_properties: tuple[str, ...] = ()
    allow_unenforced: tuple[str, ...] = ()  # limits this host may accept but not enforce
    bind_scale_memory: tuple[str, ...] = SCALABLE  # scaled by a bound job's share of CPUs
    stdio_eof_timeout: float = 10.0
    start_timeout: float = 30.0
    max_connections: int = 4096
    max_connections_per_user: int = 256
    request_timeout: float = 10.0
    # How a guest's job gets the guest's credentials: through exec.imp (the reference's only
    # way), or from systemd itself (the unit's User=/Group=/SupplementaryGroups=; a root
    # launcher on the system manager), where systemd drops privileges before chdir and exec.
    guest_credentials: str = "imp"
    # the resource manager's memory allocation (Slurm's SLURM_MEM_PER_NODE / _PER_CPU) becomes
    # the unit's MemoryMax, never above the site's own sdexec-properties MemoryMax
    allocation_memory: bool = False

    def resolved_state_dir(self) -> str:
        return self.state_dir if self.state_dir is not None else default_state_dir()


@dataclass(frozen=True)
class ExecConfig:
    """The effective ``[exec]`` configuration, defaults filled in."""

    imp: str | None = None
    service: str = "rexec"
    service_override: bool = False
    job_shell: str | None = None
    sdexec_properties: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    unit_properties: tuple[UnitProperty, ...] = ()
    sdexec_stop_timer_sec: float = 30
    sdexec_stop_timer_signal: int = 10
    sdexec_stop_timer_signal_set: bool = False
    kill_timeout: float = 5.0
    kill_shell_delay: float | None = None
    max_term_count: int = 2
    max_kill_count: int = 8
    max_kill_timeout: float | None = None
    term_signal: int = 15
    kill_signal: int = 9
    barrier_timeout: float = 1800.0
    testexec: TestexecConfig = field(default_factory=TestexecConfig)
    sdexec: SiteConfig = field(default_factory=SiteConfig)
    # provenance, not configuration: the same settings read from elsewhere are equal
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def effective_kill_shell_delay(self) -> float:
        """kill-shell-delay, or the reference's hard-coded 5 x kill-timeout when unset."""
        if self.kill_shell_delay is not None:
            return self.kill_shell_delay
        return 5 * self.kill_timeout

    def to_dict(self) -> dict[str, Any]:
        """The config as TOML would spell it; reading this back gives an equal config.

        Optional keys left unset are omitted rather than shown with a default, because setting
        them changes behaviour (an explicit stop-timer signal, a fixed kill-shell-delay that no
        longer follows kill-timeout).
        """
        ex: dict[str, Any] = {}
        if self.imp is not None:
            ex["imp"] = self.imp
        ex["service"] = self.service
        ex["service-override"] = self.service_override
        if self.job_shell is not None:
            ex["job-shell"] = self.job_shell
        ex["sdexec-stop-timer-sec"] = self.sdexec_stop_timer_sec
        if self.sdexec_stop_timer_signal_set:
            ex["sdexec-stop-timer-signal"] = signal_name(self.sdexec_stop_timer_signal)
        ex["kill-timeout"] = format_fsd(self.kill_timeout)
        if self.kill_shell_delay is not None:
            ex["kill-shell-delay"] = format_fsd(self.kill_shell_delay)
        ex["max-term-count"] = self.max_term_count
        ex["max-kill-count"] = self.max_kill_count
        if self.max_kill_timeout is not None:
            ex["max-kill-timeout"] = format_fsd(self.max_kill_timeout)
        ex["term-signal"] = signal_name(self.term_signal)
        ex["kill-signal"] = signal_name(self.kill_signal)
        ex["barrier-timeout"] = format_fsd(self.barrier_timeout)
        if self.sdexec_properties:
            ex["sdexec-properties"] = dict(self.sdexec_properties)
        ex["testexec"] = {"allow-guests": self.testexec.allow_guests}

        site = self.sdexec
        sd: dict[str, Any] = {}
        if site.state_dir is not None:
            sd["state-dir"] = site.state_dir
        if site.drain_command:
            sd["drain-command"] = list(site.drain_command)
        if site.slice is not None:
            sd["slice"] = site.slice
        if site.allow_properties:
            sd["allow-properties"] = list(site.allow_properties)
        if site.allow_unenforced:
            sd["allow-unenforced"] = list(site.allow_unenforced)
        if site.bind_scale_memory != SCALABLE:
            sd["bind-scale-memory"] = list(site.bind_scale_memory)
        sd["stdio-eof-timeout"] = format_fsd(site.stdio_eof_timeout)
        sd["start-timeout"] = format_fsd(site.start_timeout)
        sd["max-connections"] = site.max_connections
        sd["max-connections-per-user"] = site.max_connections_per_user
        sd["request-timeout"] = format_fsd(site.request_timeout)
        sd["guest-credentials"] = site.guest_credentials
        if site.allocation_memory:
            sd["allocation-memory"] = True
        return {"exec": ex, "sdexec": sd}


# --- validation ---------------------------------------------------------------------------


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str | None:
    normalized = word.replace("_", "-").lower()
    if normalized in choices:
        return normalized
    import difflib  # only for an error's suggestion

    close = difflib.get_close_matches(normalized, choices, n=1, cutoff=0.6)
    return close[0] if close else None


class _Checker:
    """Reads typed values out of the TOML data, recording problems instead of stopping."""

    def __init__(self, file_of: FileOf) -> None:
        self.file_of = file_of
        self.errors: list[ConfigError] = []

    def error(self, path: Path, message: str) -> None:
        self.errors.append(ConfigError(dotted(path), message, self.file_of(path)))

    def table(self, data: Mapping[str, Any], path: Path, example: str) -> Mapping[str, Any]:
        value = data.get(path[-1], {})
        if not isinstance(value, Mapping):
            self.error(path, f"{show_value(value)} is not a table (e.g. {example})")
            return {}
        return value

    def unknown_keys(self, table: Mapping[str, Any], path: Path, known: tuple[str, ...]) -> None:
        for key in table:
            if key in known:
                continue
            guess = _did_you_mean(key, known)
            if guess is not None:
                self.error((*path, key), f"unknown key; did you mean '{guess}'?")
            else:
                self.error((*path, key), f"unknown key (known keys: {', '.join(sorted(known))})")

    def path(self, table: Mapping[str, Any], path: Path, example: str) -> str | None:
        if path[-1] not in table:
            return None
        value = table[path[-1]]
        if not isinstance(value, str) or not value:
            self.error(
                path, f'{show_value(value)} is not a path (an absolute path, e.g. "{example}")'
            )
        elif not os.path.isabs(value):
            self.error(path, f'{show_value(value)} is not an absolute path (e.g. "{example}")')
        elif "\0" in value:
            self.error(path, f"{show_value(value)} contains a NUL character (not allowed)")
        else:
            return value
        return None

    def boolean(self, table: Mapping[str, Any], path: Path, default: bool) -> bool:
        value = table.get(path[-1], default)
        if not isinstance(value, bool):
            self.error(path, f"{show_value(value)} is not a boolean (true or false)")
            return default
        return value

    def count(self, table: Mapping[str, Any], path: Path, default: int) -> int:
        value = table.get(path[-1], default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.error(path, f"{show_value(value)} is not a positive integer (e.g. {default})")
            return default
        return value

    def duration(
        self,
        table: Mapping[str, Any],
        path: Path,
        default: float | None,
        *,
        positive: bool = False,
        finite: bool = False,
        example: str = "5s",
    ) -> float | None:
        if path[-1] not in table:
            return default
        value = table[path[-1]]
        try:
            seconds = parse_fsd(value, dotted(path))
        except DurationError as e:
            self.error(path, str(e))
            return default
        if positive and seconds <= 0:
            self.error(path, f'{show_value(value)} is not a positive duration (e.g. "{example}")')
            return default
        if finite and math.isinf(seconds):
            self.error(path, f'{show_value(value)} is not a finite duration (e.g. "{example}")')
            return default
        return seconds

    def signal(self, table: Mapping[str, Any], path: Path, default: int) -> int:
        if path[-1] not in table:
            return default
        try:
            return parse_signal(table[path[-1]])
        except ValueError as e:
            self.error(path, str(e))
            return default

    def strings(
        self, table: Mapping[str, Any], path: Path, example: str, default: Sequence[str] = ()
    ) -> tuple[str, ...]:
        value = table.get(path[-1], list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(path, f"{show_value(value)} is not an array of strings (e.g. {example})")
            return ()
        if any("\0" in v for v in value):
            self.error(path, "contains a NUL character (not allowed)")
            return ()
        return tuple(value)


def _check_top_level(data: Mapping[str, Any], c: _Checker) -> None:
    for key in data:
        if key in OUR_TABLES or key in FLUX_TABLES:
            continue
        import difflib  # only for an error's suggestion

        close = difflib.get_close_matches(key.lower(), OUR_TABLES, n=1, cutoff=0.75)
        if close:
            c.error((key,), f"unknown table; did you mean [{close[0]}]?")


def _check_drain_command(argv: tuple[str, ...], path: Path, c: _Checker) -> tuple[str, ...]:
    if argv and not argv[0]:
        c.error(path, '"" is not a program (e.g. ["/usr/sbin/drain-node", "{reason}"])')
        return ()
    accepted = ", ".join("{" + p + "}" for p in DRAIN_PLACEHOLDERS)
    for arg in argv:
        try:
            ok = all(
                name is None or (name in DRAIN_PLACEHOLDERS and not spec and conv is None)
                for _, name, spec, conv in string.Formatter().parse(arg)
            )
        except ValueError:  # a lone "{" or "}"
            ok = False
        if not ok:
            c.error(
                path,
                f"{show_value(arg)} has an unknown placeholder (accepted: {accepted}; "
                "write {{ and }} for literal braces)",
            )
            return ()
    return argv


_SLICE_RE = re.compile(r"[A-Za-z0-9:_.\\-]+\.slice")


def _parse_site(data: Mapping[str, Any], c: _Checker) -> SiteConfig:
    P: Path = ("sdexec",)
    sd = c.table(data, P, "[sdexec]")
    c.unknown_keys(sd, P, SDEXEC_KEYS)
    state_dir = c.path(sd, (*P, "state-dir"), "/var/lib/sdexec")
    drain = _check_drain_command(
        c.strings(sd, (*P, "drain-command"), '["/usr/sbin/drain-node", "{hostname}", "{reason}"]'),
        (*P, "drain-command"),
        c,
    )
    slice_: str | None = None
    if "slice" in sd:
        value = sd["slice"]
        if isinstance(value, str) and _SLICE_RE.fullmatch(value) and len(value) <= 255:
            slice_ = value
        else:
            c.error((*P, "slice"), f'{show_value(value)} is not a slice name (e.g. "sdexec.slice")')
    allow: list[str] = []
    for name in c.strings(sd, (*P, "allow-properties"), '["DevicePolicy", "ManagedOOMSwap"]'):
        if is_protected(name):
            c.error(
                (*P, "allow-properties"),
                f"{show_value(name)} is set by sdexec itself and cannot be allowed",
            )
        elif not re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
            c.error(
                (*P, "allow-properties"),
                f'{show_value(name)} is not a systemd property name (e.g. "DevicePolicy")',
            )
        else:
            allow.append(name)
    unenforced: list[str] = []
    for name in c.strings(sd, (*P, "allow-unenforced"), '["MemoryHigh", "MemoryLow"]'):
        if name in ENFORCED:
            unenforced.append(name)
        else:
            known = ", ".join(sorted(ENFORCED))
            c.error(
                (*P, "allow-unenforced"),
                f"{show_value(name)} is not a limit the kernel enforces (one of {known})",
            )
    scale: list[str] = []
    key = (*P, "bind-scale-memory")
    for name in c.strings(sd, key, '["MemoryMax", "MemoryHigh"]', default=SCALABLE):
        if name in NEVER_SCALED:
            c.error(key, f"{show_value(name)} is a guarantee and is never scaled")
        elif name in SCALABLE:
            scale.append(name)
        else:
            c.error(key, f"{show_value(name)} is not scalable (one of {', '.join(SCALABLE)})")
    defaults = SiteConfig()
    stdio = c.duration(
        sd, (*P, "stdio-eof-timeout"), defaults.stdio_eof_timeout, positive=True, finite=True,
        example="10s",
    )  # fmt: skip
    start = c.duration(
        sd, (*P, "start-timeout"), defaults.start_timeout, positive=True, finite=True,
        example="30s",
    )  # fmt: skip
    request = c.duration(
        sd, (*P, "request-timeout"), defaults.request_timeout, positive=True, finite=True,
        example="10s",
    )  # fmt: skip
    assert stdio is not None and start is not None and request is not None
    total = c.count(sd, (*P, "max-connections"), defaults.max_connections)
    if total > MAX_CONNECTIONS:  # each needs a descriptor: no more than the kernel could give
        c.error(
            (*P, "max-connections"),
            f"{total} is too large (accepted: an integer from 1 to {MAX_CONNECTIONS})",
        )
        total = defaults.max_connections
    per_user = c.count(sd, (*P, "max-connections-per-user"), defaults.max_connections_per_user)
    if per_user > total:
        c.error(
            (*P, "max-connections-per-user"),
            f"{per_user} is more than max-connections ({total}); "
            f"accepted: an integer from 1 to {total}",
        )
        per_user = total
    guest_credentials = sd.get("guest-credentials", defaults.guest_credentials)
    if guest_credentials not in GUEST_CREDENTIALS:
        c.error(
            (*P, "guest-credentials"),
            f'{show_value(guest_credentials)} is not one of "imp" (through exec.imp) or '
            '"systemd" (the unit\'s User=, for a root launcher on the system manager)',
        )
        guest_credentials = defaults.guest_credentials
    return SiteConfig(
        guest_credentials=guest_credentials,
        state_dir=state_dir,
        drain_command=drain,
        slice=slice_,
        allow_properties=tuple(allow),
        allow_unenforced=tuple(unenforced),
        bind_scale_memory=tuple(scale),
        stdio_eof_timeout=stdio,
        start_timeout=start,
        max_connections=total,
        max_connections_per_user=per_user,
        request_timeout=request,
        allocation_memory=c.boolean(sd, (*P, "allocation-memory"), defaults.allocation_memory),
    )


def _parse(data: Mapping[str, Any], file_of: FileOf, sources: tuple[str, ...]) -> ExecConfig:
    c = _Checker(file_of)
    d = ExecConfig()
    _check_top_level(data, c)
    site_checker = _Checker(file_of)  # read first (allow-properties), reported last
    site = _parse_site(data, site_checker)

    P: Path = ("exec",)
    ex = c.table(data, P, "[exec]")
    c.unknown_keys(ex, P, EXEC_KEYS)
    imp = c.path(ex, (*P, "imp"), "/usr/libexec/flux/flux-imp")
    job_shell = c.path(ex, (*P, "job-shell"), "/usr/libexec/flux/flux-shell")

    service = d.service
    if "service" in ex:
        value = ex["service"]
        if value in SERVICES:
            service = value
        else:
            choices = ", ".join(f'"{s}"' for s in SERVICES)
            c.error((*P, "service"), f"{show_value(value)} is not a service (one of {choices})")
    service_override = c.boolean(ex, (*P, "service-override"), d.service_override)

    raw_props: dict[str, str] = {}
    unit_props: list[UnitProperty] = []
    if "sdexec-properties" in ex:
        table = c.table(ex, (*P, "sdexec-properties"), '[exec.sdexec-properties] MemoryMax = "90%"')
        unit_props, errors = collect_properties(
            table,
            site.allow_properties,
            lambda name: file_of((*P, "sdexec-properties", name)),
        )
        c.errors.extend(errors)
        raw_props = {k: v for k, v in table.items() if isinstance(v, str)}

    stop_sec: float = d.sdexec_stop_timer_sec
    if "sdexec-stop-timer-sec" in ex:
        value = ex["sdexec-stop-timer-sec"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not _finite(value)
            or value <= 0
        ):
            c.error(
                (*P, "sdexec-stop-timer-sec"),
                f"{show_value(value)} is not a number of seconds (a positive number, e.g. 30)",
            )
        else:
            stop_sec = value
    stop_signal = c.signal(ex, (*P, "sdexec-stop-timer-signal"), d.sdexec_stop_timer_signal)

    kill_timeout = c.duration(
        ex, (*P, "kill-timeout"), d.kill_timeout, positive=True, finite=True, example="5s"
    )
    kill_shell_delay = c.duration(ex, (*P, "kill-shell-delay"), None, finite=True, example="25s")
    max_kill_timeout = c.duration(
        ex, (*P, "max-kill-timeout"), None, positive=True, finite=True, example="10m"
    )
    barrier = c.duration(ex, (*P, "barrier-timeout"), d.barrier_timeout, example="30m")
    assert kill_timeout is not None and barrier is not None

    testexec_table = c.table(ex, (*P, "testexec"), "[exec.testexec] allow-guests = true")
    c.unknown_keys(testexec_table, (*P, "testexec"), TESTEXEC_KEYS)
    allow_guests = c.boolean(testexec_table, (*P, "testexec", "allow-guests"), False)

    config = ExecConfig(
        imp=imp,
        service=service,
        service_override=service_override,
        job_shell=job_shell,
        sdexec_properties=MappingProxyType(raw_props),
        unit_properties=tuple(unit_props),
        sdexec_stop_timer_sec=stop_sec,
        sdexec_stop_timer_signal=stop_signal,
        sdexec_stop_timer_signal_set="sdexec-stop-timer-signal" in ex,
        kill_timeout=kill_timeout,
        kill_shell_delay=kill_shell_delay,
        max_term_count=c.count(ex, (*P, "max-term-count"), d.max_term_count),
        max_kill_count=c.count(ex, (*P, "max-kill-count"), d.max_kill_count),
        max_kill_timeout=max_kill_timeout,
        term_signal=c.signal(ex, (*P, "term-signal"), d.term_signal),
        kill_signal=c.signal(ex, (*P, "kill-signal"), d.kill_signal),
        barrier_timeout=barrier,
        testexec=TestexecConfig(allow_guests=allow_guests),
        sdexec=site,
        sources=sources,
    )
    errors = [*c.errors, *site_checker.errors]
    if errors:
        raise combine_errors(errors)
    return config


def parse_config(data: Mapping[str, Any], file: str | None = None) -> ExecConfig:
    """Validate already-parsed TOML data; ``file`` names the source in error messages."""
    return _parse(data, lambda _path: file, (file,) if file else ())


# --- files --------------------------------------------------------------------------------

_TOML_POS_RE = re.compile(r"(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)")


def _read_bounded(file: str) -> bytes:
    """The file's bytes, if it is a regular file of sane size: a fifo would block forever,
    /dev/zero or a huge file would exhaust memory."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(None, "is not a regular file (a TOML file is expected)", file)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                None, f"is {st.st_size} bytes long (a config file is at most 1 MiB)", file
            )
        chunks = []
        left = MAX_CONFIG_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise ConfigError(None, "is longer than 1 MiB (a config file is at most 1 MiB)", file)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_toml(file: str) -> dict[str, Any]:
    try:
        return tomllib.loads(_read_bounded(file).decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS_RE.fullmatch(str(e))
        message = f"line {m['line']}, column {m['col']}: {m['msg']}" if m else str(e)
        raise ConfigError(None, message, file) from None
    except UnicodeDecodeError:
        raise ConfigError(None, "is not UTF-8 text (a TOML file must be)", file) from None
    except RecursionError:
        raise ConfigError(None, "arrays or tables are nested too deeply", file) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(None, f"a value cannot be read: {e}", file) from None
    except OSError as e:
        raise ConfigError(None, f"cannot read: {e.strerror or e}", file) from None


def _merge(
    dst: dict[str, Any],
    src: Mapping[str, Any],
    file: str,
    origins: dict[Path, str],
    prefix: Path,
    errors: list[ConfigError],
) -> None:
    """conf.d merge: tables combine across files, a key may be set by one file only."""
    for key, value in src.items():
        path = (*prefix, key)
        if key not in dst:
            dst[key] = value
            _record(value, path, file, origins)
        elif isinstance(dst[key], dict) and isinstance(value, Mapping):
            _merge(dst[key], value, file, origins, path, errors)
        elif path[0] in OUR_TABLES:
            errors.append(
                ConfigError(
                    dotted(path),
                    f"already set in {origins[path]} (a key may be set in only one file)",
                    file,
                )
            )


def _record(value: Any, path: Path, file: str, origins: dict[Path, str]) -> None:
    origins[path] = file
    if isinstance(value, Mapping):
        for k, v in value.items():
            _record(v, (*path, k), file, origins)


def _files(path: str) -> list[str]:
    """The files to read: a file as named, or a directory's ``*.toml`` in name order. An
    entry that is not a regular file (a dangling link, a fifo) is an error, never skipped:
    a silently ignored drop-in is a setting the site believes applies."""
    if os.path.isdir(path):
        import glob  # only for a conf.d directory

        pattern = os.path.join(glob.escape(path), "*.toml")
        found = sorted(glob.glob(pattern), key=os.path.basename)
        errors = []
        for f in found:
            if os.path.islink(f) and not os.path.exists(f):
                errors.append(ConfigError(None, "is a dangling symbolic link", f))
            elif not os.path.isfile(f):
                errors.append(ConfigError(None, "is not a regular file", f))
        if errors:
            raise combine_errors(errors)
        return found
    if os.path.exists(path):
        return [path]
    raise ConfigError(
        None, "no such file or directory (expected a TOML file or a directory of *.toml)", path
    )


def load_config(path: str | os.PathLike[str] | None = None) -> ExecConfig:
    """Read the config from ``path``, $SDEXEC_CONFIG, or the default locations.

    With no path and nothing at the default locations, the built-in defaults apply; a path
    that was named explicitly (argument or environment) must exist.
    """
    if path is None:
        env = os.environ.get(ENV_VAR)
        if env:
            path = env
        elif os.path.isdir(DEFAULT_CONF_DIR):
            path = DEFAULT_CONF_DIR
        elif os.path.exists(DEFAULT_CONF_FILE):
            path = DEFAULT_CONF_FILE
        else:
            log.debug("no config at %s or %s: using defaults", DEFAULT_CONF_DIR, DEFAULT_CONF_FILE)
            return ExecConfig()
    files = _files(os.fspath(path))
    merged: dict[str, Any] = {}
    origins: dict[Path, str] = {}
    errors: list[ConfigError] = []
    for file in files:
        try:
            data = _read_toml(file)
        except ConfigError as e:
            errors.append(e)
            continue
        _merge(merged, data, file, origins, (), errors)
    if errors:
        raise combine_errors(errors)
    log.debug("config read from %s", ", ".join(files) or "(empty directory)")

    def file_of(p: Path) -> str | None:
        for n in range(len(p), 0, -1):
            if p[:n] in origins:
                return origins[p[:n]]
        return files[0] if len(files) == 1 else None

    return _parse(merged, file_of, tuple(files))
