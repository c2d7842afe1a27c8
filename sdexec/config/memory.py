"""Memory limits for MemoryMax/High/Min/Low: bytes with a 1024-based suffix, a percentage, or
``"infinity"``.

We convert to D-Bus values ourselves rather than pass strings, because systemd only accepts
these properties as integers (``t`` bytes, or ``u`` for the ``*Scale`` percentage form).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sdexec.config.show import show_value

__all__ = [
    "INFINITY",
    "NEVER_SCALED",
    "SCALABLE",
    "UINT64_MAX",
    "MemoryBytes",
    "MemoryPercent",
    "MemoryValue",
    "format_memory",
    "parse_memory",
    "to_property",
]

UINT64_MAX = 2**64 - 1
"""systemd's "infinity" for every u64 property (bytes, microseconds, counts): one definition."""
INFINITY = UINT64_MAX
UINT32_MAX = 2**32 - 1
EXAMPLES = '(e.g. "512M", "4G", "90%", "infinity")'
_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[kKMGTPE]?)")
_PERCENT_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]{1,2})?)%")


@dataclass(frozen=True)
class MemoryBytes:
    """An absolute size; :data:`INFINITY` means no limit."""

    bytes: int


@dataclass(frozen=True)
class MemoryPercent:
    """A share of physical memory, in 1/100 of a percent (systemd's "permyriad")."""

    permyriad: int


MemoryValue = MemoryBytes | MemoryPercent

# A job bound to part of a node gets the limits that cap it scaled by its share of the CPUs;
# the protections (Min/Low) are guarantees the site gave, never scaled (a fraction of a
# guarantee is none).
SCALABLE = ("MemoryHigh", "MemoryMax", "MemorySwapMax")
NEVER_SCALED = ("MemoryMin", "MemoryLow")


def parse_memory(value: str) -> MemoryValue:
    """Parse a memory value; fractional sizes ("1.5G") are floored to whole bytes."""
    if not isinstance(value, str):
        raise ValueError(f"{show_value(value)} is not a memory size {EXAMPLES}")
    text = value.strip()
    if len(text) > 64:  # no size is that long; and int() of 5000 digits is an error of its own
        raise ValueError(f"{show_value(value)} is not a memory size {EXAMPLES}")
    if text == "infinity":
        return MemoryBytes(INFINITY)
    if text.endswith("%"):
        m = _PERCENT_RE.fullmatch(text)
        permyriad = int(Fraction(m.group("num")) * 100) if m else None
        if permyriad is None or permyriad > 10000:
            raise ValueError(
                f"{show_value(value)} is not a memory size "
                '(a percentage is 0% to 100% with up to 2 decimals, e.g. "90%" or "12.5%")'
            )
        return MemoryPercent(permyriad)
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{show_value(value)} is not a memory size {EXAMPLES}")
    n = int(Fraction(m.group("num")) * _SUFFIXES[m.group("suffix").upper()])
    if n > INFINITY:
        raise ValueError(
            f'{show_value(value)} is not a memory size (less than 16E, e.g. "512M", or "infinity")'
        )
    return MemoryBytes(n)


def to_property(name: str, value: MemoryValue) -> tuple[str, str, int]:
    """The D-Bus property (name, signature, value) systemd expects for ``name`` = ``value``.

    A percentage becomes ``<name>Scale``, scaled so that 100% is 2**32-1, floored as Flux's
    sdexec does (current systemd rounds to nearest instead; the two differ by at most 1/2**32).
    """
    if isinstance(value, MemoryPercent):
        return (name + "Scale", "u", value.permyriad * UINT32_MAX // 10000)
    return (name, "t", value.bytes)


def format_memory(value: MemoryValue) -> str:
    """The shortest spelling that :func:`parse_memory` reads back to ``value``."""
    if isinstance(value, MemoryPercent):
        whole, frac = divmod(value.permyriad, 100)
        return f"{whole}%" if frac == 0 else f"{whole}.{frac:02d}".rstrip("0") + "%"
    n = value.bytes
    if n == INFINITY:
        return "infinity"
    if n == 0:
        return "0"
    for suffix in ("E", "P", "T", "G", "M", "K"):
        factor = _SUFFIXES[suffix]
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def cap_memory_max(
    extra: Sequence[tuple[str, str, Any]], limit: int, physical: int
) -> tuple[tuple[str, str, Any], ...]:
    """The unit's properties with ``MemoryMax`` = the smaller of ``limit`` (bytes: a job's
    allocation) and the site's own (bytes, or a share of ``physical`` memory): an allocation
    lowers the site's bound, never raises it."""
    site: int | None = None
    rest = []
    for name, sig, value in extra:
        if name == "MemoryMax":
            site = int(value)
        elif name == "MemoryMaxScale":
            site = int(value) * physical // UINT32_MAX
        else:
            rest.append((name, sig, value))
    chosen = limit if site is None else min(limit, site)
    return (*rest, ("MemoryMax", "t", chosen))
