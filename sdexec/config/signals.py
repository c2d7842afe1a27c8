"""Signal names and numbers as config files spell them: ``"SIGTERM"``, ``"TERM"``, ``15``.

Real-time signals have no fixed number across platforms, so they are named relative to
``SIGRTMIN``/``SIGRTMAX`` (``"SIGRTMIN+2"``), as ``kill -l`` does.
"""

from __future__ import annotations

import re
import signal

from sdexec.config.show import show_value

__all__ = ["parse_signal", "signal_name"]

EXAMPLES = '(e.g. "SIGTERM", "TERM" or 15)'
_NSIG = int(getattr(signal, "NSIG", 65))
_RTMIN = int(getattr(signal, "SIGRTMIN", 0)) or None
_RTMAX = int(getattr(signal, "SIGRTMAX", 0)) or None
_RT_RE = re.compile(r"SIGRT(?P<base>MIN|MAX)(?:(?P<sign>[+-])(?P<off>[0-9]+))?")


def _by_name(name: str) -> int | None:
    upper = name.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    m = _RT_RE.fullmatch(upper)
    if m is not None:
        if _RTMIN is None or _RTMAX is None:
            return None
        base = _RTMIN if m.group("base") == "MIN" else _RTMAX
        offset = int(m.group("off") or 0)
        n = base + offset if m.group("sign") == "+" else base - offset
        return n if _RTMIN <= n <= _RTMAX else None
    member = signal.Signals.__members__.get(upper)
    return int(member) if member is not None else None


def parse_signal(value: str | int) -> int:
    """A signal number, from a name (any case, with or without ``SIG``) or a number."""
    error = ValueError(f"{show_value(value)} is not a signal {EXAMPLES}")
    if isinstance(value, bool):
        raise error
    if isinstance(value, int):
        n: int | None = value
    elif isinstance(value, str):
        text = value.strip()
        n = int(text) if re.fullmatch(r"[0-9]{1,4}", text) else _by_name(text)
    else:
        raise error
    if n is None or not 1 <= n < _NSIG:
        raise error
    return n


def signal_name(signum: int) -> str:
    """The canonical name of ``signum`` ("SIGTERM", "SIGRTMIN+2"), or the number as text."""
    if _RTMIN is not None and _RTMAX is not None and _RTMIN < signum < _RTMAX:
        return f"SIGRTMIN+{signum - _RTMIN}"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
