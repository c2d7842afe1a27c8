"""Flux Standard Duration (RFC 23): ``"5s"``, ``"0.5m"``, ``"2h"``, ``"inf"``.

Config files and job attributes spell durations this way, so the parser and the printer live
together: :func:`format_fsd` is used to show the effective config, and what it prints must read
back to the very same float.
"""

from __future__ import annotations

import math
import re

from sdexec.config.show import show_value

__all__ = ["DurationError", "format_fsd", "format_seconds", "parse_fsd"]

_UNITS: dict[str, float] = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_FSD_RE = re.compile(
    r"(?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(?P<unit>ms|s|m|h|d)?"
)
_INFINITY = ("inf", "infinity")
EXAMPLES = '(e.g. "5s", "0.5m", "2h")'


class DurationError(ValueError):
    """A value that is not a duration; ``key`` lets a caller name what was being parsed."""

    def __init__(self, message: str, key: str = "duration") -> None:
        super().__init__(message)
        self.key = key


def parse_fsd(value: str | int | float, key: str = "duration") -> float:
    """Seconds from an FSD string, or from a TOML number taken as seconds.

    ``key`` is carried on the :class:`DurationError` so callers can name the setting; the
    message itself only shows the value and the accepted form.
    """
    error = DurationError(f"{show_value(value)} is not a duration {EXAMPLES}", key)
    if isinstance(value, bool):  # bool is an int: true is not "1 second"
        raise error
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # a TOML integer of hundreds of digits
            raise error from None
        if math.isnan(seconds) or seconds < 0:
            raise error
        return seconds + 0.0  # -0.0 -> 0.0
    if not isinstance(value, str):
        raise error
    text = value.strip()
    if text.lower() in _INFINITY:
        return math.inf
    m = _FSD_RE.fullmatch(text)
    if m is None:
        raise error
    number = float(m.group("num"))
    unit = m.group("unit") or ""
    # dividing by 1000 is exact where multiplying by 0.001 is not ("250ms" == 0.25)
    seconds = number / 1000.0 if unit == "ms" else number * _UNITS[unit]
    if math.isinf(seconds):  # "1e400s": an overflow, not a deliberate infinity
        raise error
    return seconds


def _number(x: float) -> str:
    if x == int(x) and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _parses_to(text: str, seconds: float) -> bool:
    try:
        return parse_fsd(text) == seconds
    except DurationError:  # e.g. a huge value overflows once multiplied back by its unit
        return False


def format_fsd(seconds: float) -> str:
    """The shortest FSD string that parses back to exactly ``seconds``.

    Ties go to a whole number ("250ms" over "0.25s"), then to the larger unit.
    """
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{seconds!r} is not a duration (must be >= 0)")
    if math.isinf(seconds):
        return "inf"
    if seconds == 0:
        return "0"
    scaled = [(seconds / f, u) for u, f in (("d", 86400.0), ("h", 3600.0), ("m", 60.0))]
    scaled += [(seconds, "s"), (seconds * 1000.0, "ms")]
    candidates = [_number(x) + unit for x, unit in scaled if math.isfinite(x)]
    exact = [c for c in candidates if _parses_to(c, seconds)]
    if not exact:  # cannot happen for "s" in practice, but never print an inexact value
        return repr(seconds) + "s"
    # stable sort: among equals, the candidate order above (larger unit first) wins
    return min(exact, key=lambda c: (len(c), "." in c or "e" in c))


def format_seconds(seconds: float) -> str:
    """Short, stable seconds for messages: ``940``, ``0.5`` (no float noise like 60.0000001)."""
    text = f"{seconds:.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
