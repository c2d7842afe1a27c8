"""``[exec.sdexec-properties]``: string values from the config, typed for StartTransientUnit.

Only properties we know how to convert are accepted. An arbitrary property could change who
the job runs as or what it may touch, so anything else needs the site's explicit consent
(``[sdexec] allow-properties``), and the properties sdexec sets itself are never overridable.
Allowed raw properties are sent as D-Bus strings, as the reference does, so only properties
systemd types as strings (DevicePolicy, ManagedOOMSwap...) work that way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdexec.config import memory
from sdexec.config.duration import DurationError, parse_fsd
from sdexec.config.show import dotted, show_value
from sdexec.errors import ConfigError

__all__ = [
    "ENFORCED",
    "MEMORY_PROPERTIES",
    "PROTECTED_PROPERTIES",
    "SUPPORTED_PROPERTIES",
    "UnitProperty",
    "collect_properties",
    "combine_errors",
    "convert_properties",
    "dbus_problem",
    "is_protected",
]

TABLE = "exec.sdexec-properties"
MEMORY_PROPERTIES = frozenset(
    {"MemoryMax", "MemoryHigh", "MemoryMin", "MemoryLow", "MemorySwapMax"}
)
CPUSET_PROPERTIES = frozenset({"AllowedCPUs", "AllowedMemoryNodes"})
ENFORCED = MEMORY_PROPERTIES | CPUSET_PROPERTIES | {"TasksMax", "DeviceAllow", "DevicePolicy"}
"""Limits the kernel enforces, so a host that cannot (cgroup v1) must refuse them unless the site
allows it ([sdexec] allow-unenforced); ``sdexec.systemd.enforce`` reads back each one it can."""
SUPPORTED_PROPERTIES = frozenset(
    MEMORY_PROPERTIES
    | CPUSET_PROPERTIES
    | {"SendSIGKILL", "TimeoutStopUSec", "OOMScoreAdjust", "DeviceAllow", "TasksMax"}
    | {"RuntimeMaxSec"}
)
# Set by sdexec for every unit: letting the config replace them would break supervision or
# change the job's identity, so they are refused even when a site allows raw properties.
PROTECTED_PROPERTIES = frozenset(
    {
        "ExecStart",
        "ExecStartEx",
        "User",
        "Group",
        "DynamicUser",
        "Type",
        "KillMode",
        "Environment",
        "WorkingDirectory",
        "RemainAfterExit",
        "Description",
        "Slice",
        "CollectMode",
        "IgnoreSIGPIPE",
    }
)
_PROTECTED_PREFIXES = ("Standard",)  # StandardInput, StandardOutputFileDescriptor, ...
_NAME_RE = re.compile(r"[A-Z][A-Za-z0-9]*")
_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")
UINT64_MAX = memory.UINT64_MAX
MAX_CPU = 8191  # systemd refuses larger CPU numbers in a CPU set


@dataclass(frozen=True)
class UnitProperty:
    """One ``(sv)`` entry of StartTransientUnit: name, D-Bus signature of value, value.

    ``value`` is in the Python form dbus-fast marshals (arrays are lists, structs lists), so
    it may be unhashable: it takes no part in the hash.
    """

    name: str
    signature: str
    value: Any = field(hash=False)


def dbus_problem(name: str, signature: str, value: object) -> str | None:
    """Why ``value`` cannot be sent as a ``signature`` property ``name`` (None: it can).

    dbus-fast checks a value against its signature only when it marshals the message, deep
    inside the StartTransientUnit call; marshalling the one property alone here turns what
    would be a traceback there into a line naming the property, at config load already.
    """
    from dbus_fast import Message, Variant

    try:
        msg = Message(
            path="/", member="Check", signature="a(sv)", body=[[[name, Variant(signature, value)]]]
        )
        msg._marshall(False)  # the marshaller StartTransientUnit goes through
    except Exception as e:  # dbus-fast raises several kinds (signature, struct, encoding)
        detail = " ".join(str(e).split()) or type(e).__name__
        return f"cannot be sent to systemd as D-Bus {signature!r}: {detail}"
    return None


def is_protected(name: str) -> bool:
    """True for the properties sdexec sets itself, which no config may override."""
    return name in PROTECTED_PROPERTIES or name.startswith(_PROTECTED_PREFIXES)


def combine_errors(errors: Sequence[ConfigError]) -> ConfigError:
    """One error for many: one line per problem, so a user fixes them all in one pass."""
    if len(errors) == 1:
        return errors[0]
    combined = ConfigError(None, "\n".join(str(e) for e in errors))
    combined.key = errors[0].key
    combined.file = errors[0].file
    return combined


def parse_bool(value: str) -> bool:
    """systemd's spelling of booleans (also what job attributes use)."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{show_value(value)} is not a boolean (yes/no, true/false, on/off, 1/0)")


def _u64_infinity(value: str) -> int:
    v = value.strip()
    if v == "infinity":
        return UINT64_MAX
    if re.fullmatch(r"[0-9]{1,20}", v) and int(v) <= UINT64_MAX:
        return int(v)
    raise ValueError(
        f"{show_value(value)} is not a time in microseconds "
        '(an integer, e.g. "90000000", or "infinity")'
    )


def _tasks_max(value: str) -> int:
    v = value.strip()
    if v == "infinity":
        return UINT64_MAX
    if re.fullmatch(r"[0-9]{1,19}", v) and int(v) > 0:
        return int(v)
    raise ValueError(
        f'{show_value(value)} is not a task count (a positive integer, e.g. "4096", or "infinity")'
    )


def _runtime_usec(value: str) -> int:
    v = value.strip()
    if v == "infinity":
        return UINT64_MAX
    try:
        seconds = parse_fsd(v, "RuntimeMaxSec")
    except DurationError:
        seconds = -1.0
    if not 0 < seconds < UINT64_MAX / 1e6:
        raise ValueError(
            f'{show_value(value)} is not a run time (an FSD > 0, e.g. "120", "2m", or "infinity")'
        )
    return int(seconds * 1_000_000)


def _oom_score(value: str) -> int:
    v = value.strip()
    if re.fullmatch(r"[+-]?[0-9]{1,5}", v) and -1000 <= int(v) <= 1000:
        return int(v)
    raise ValueError(
        f'{show_value(value)} is not an OOM score adjustment (-1000 to 1000, e.g. "500")'
    )


def cpuset_bitmap(value: str) -> bytes:
    """A CPU/NUMA-node list ("0-3,5") as systemd's D-Bus bitmap: byte i bit j is CPU 8i+j."""
    error = ValueError(
        f'{show_value(value)} is not a CPU list (numbers and ranges up to {MAX_CPU}, e.g. "0-3,5")'
    )
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):  # Flux idset form "[0-3]"
        text = text[1:-1]
    ids: set[int] = set()
    for part in re.split(r"[,\s]+", text):
        if not part:
            continue
        m = re.fullmatch(r"([0-9]{1,7})(?:-([0-9]{1,7}))?", part)
        if m is None:
            raise error
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi or hi > MAX_CPU:
            raise error
        ids.update(range(lo, hi + 1))
    bitmap = bytearray((max(ids) + 8) // 8 if ids else 0)
    for cpu in ids:
        bitmap[cpu // 8] |= 1 << (cpu % 8)
    return bytes(bitmap)


def _device_allow(value: str) -> list[list[str]]:
    """``a(ss)``: dbus-fast wants a list (the array) of lists (the structs), never tuples."""
    pairs: list[list[str]] = []
    for entry in value.split(","):
        fields = entry.split()
        if len(fields) != 2 or not re.fullmatch(r"[rwm]+", fields[1]):
            raise ValueError(
                f"{show_value(value)} is not a device list "
                '(comma-separated "SPECIFIER PERMS", e.g. "/dev/nvidiactl rw")'
            )
        pairs.append([fields[0], fields[1]])
    return pairs


def convert_one(name: str, value: str) -> UnitProperty:
    """Type one supported property; raises ValueError naming the accepted form."""
    if name in MEMORY_PROPERTIES:
        n, sig, v = memory.to_property(name, memory.parse_memory(value))
        return UnitProperty(n, sig, v)
    if name in CPUSET_PROPERTIES:
        return UnitProperty(name, "ay", cpuset_bitmap(value))
    if name == "SendSIGKILL":
        return UnitProperty(name, "b", parse_bool(value))
    if name == "TimeoutStopUSec":
        return UnitProperty(name, "t", _u64_infinity(value))
    if name == "OOMScoreAdjust":
        return UnitProperty(name, "i", _oom_score(value))
    if name == "TasksMax":
        return UnitProperty(name, "t", _tasks_max(value))
    if name == "DeviceAllow":
        return UnitProperty(name, "a(ss)", _device_allow(value))
    if name == "RuntimeMaxSec":  # systemd's own bound on a unit's run time (D-Bus: in usec)
        return UnitProperty("RuntimeMaxUSec", "t", _runtime_usec(value))
    raise ValueError(f"{name} is not a supported property")


def _unsupported(name: str) -> str:
    import difflib  # only for an error's suggestion

    known = ", ".join(sorted(SUPPORTED_PROPERTIES))
    close = difflib.get_close_matches(name, sorted(SUPPORTED_PROPERTIES), n=1, cutoff=0.75)
    if not close:
        lowered = {p.lower(): p for p in SUPPORTED_PROPERTIES}
        close = [lowered[name.lower()]] if name.lower() in lowered else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"not a supported property{hint} (one of {known}; "
        "a site may allow others with [sdexec] allow-properties)"
    )


def collect_properties(
    table: Mapping[str, object],
    allow_raw: Collection[str] = (),
    file_of: Callable[[str], str | None] = lambda _key: None,
) -> tuple[list[UnitProperty], list[ConfigError]]:
    """Convert what can be converted and gather every error, for a config check to report all.

    ``file_of(name)`` names the file each property came from (conf.d fragments differ).
    """
    props: list[UnitProperty] = []
    errors: list[ConfigError] = []
    for name, value in table.items():
        key = dotted((*TABLE.split("."), name))
        file = file_of(name)
        if not isinstance(value, str):
            problem = (
                f'{show_value(value)} is not a string (values are strings, e.g. "1024" or "512M")'
            )
            errors.append(ConfigError(key, problem, file))
            continue
        if "\0" in value:
            errors.append(ConfigError(key, "contains a NUL character (not allowed)", file))
            continue
        if is_protected(name):
            problem = "is set by sdexec itself and cannot be overridden"
            errors.append(ConfigError(key, problem, file))
            continue
        prop: UnitProperty | None = None
        if name in SUPPORTED_PROPERTIES:
            try:
                prop = convert_one(name, value)
            except ValueError as e:
                errors.append(ConfigError(key, str(e), file))
        elif name in allow_raw:
            if not _NAME_RE.fullmatch(name):
                errors.append(
                    ConfigError(key, "is not a systemd property name (e.g. DevicePolicy)", file)
                )
            else:
                prop = UnitProperty(name, "s", value)
        else:
            errors.append(ConfigError(key, _unsupported(name), file))
        if prop is not None:
            refused = dbus_problem(prop.name, prop.signature, prop.value)
            if refused is not None:
                errors.append(ConfigError(key, refused, file))
            else:
                props.append(prop)
    return props, errors


def convert_properties(
    table: Mapping[str, object],
    allow_raw: Collection[str] = (),
    file: str | None = None,
) -> list[UnitProperty]:
    """Typed unit properties for ``[exec.sdexec-properties]``; raises one ConfigError for all."""
    props, errors = collect_properties(table, allow_raw, lambda _key: file)
    if errors:
        raise combine_errors(errors)
    return props
