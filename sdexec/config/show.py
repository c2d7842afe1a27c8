"""Values as they appear in messages and printed TOML: quoted, escaped, one line.

Error messages quote what the user wrote; what the user wrote can hold newlines, terminal
escape sequences or 10 KB strings. Every module quotes through here, so no message can break
the one-line rule or write control bytes to a terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
SHOW_MAX = 60


def toml_string(s: str) -> str:
    """A TOML basic string: control, non-printable and unpaired surrogate characters escaped."""
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(f"\\U{ord(ch):08X}")
    return '"' + "".join(out) + '"'


def show_value(value: object) -> str:
    """A value as TOML would spell it, shortened when long, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > SHOW_MAX:
            return toml_string(value[: SHOW_MAX - 3]) + f"... ({len(value)} characters)"
        return toml_string(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, int) and abs(value) > 10**30:
        return f"a {len(str(abs(value)))}-digit number"
    text = repr(value)
    return text if len(text) <= SHOW_MAX else text[: SHOW_MAX - 3] + "..."


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """One key as TOML writes it: bare when it may be, else quoted and escaped."""
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def dotted(path: Sequence[str]) -> str:
    """A key path as TOML writes it: bare keys as they are, others quoted and escaped."""
    return ".".join(toml_key(k) for k in path)
