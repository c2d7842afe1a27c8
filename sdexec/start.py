"""What goes into ``StartTransientUnit``: pure, so every property is checked without a bus.

The choices here are the reference's (``../shared/notes/flux-behaviour.md``, "The unit") with
the lessons of the container notes: ``ExecStartEx`` with ``no-env-expand`` so a ``$`` in an
argument reaches the program literally, and a systemd stop timeout longer than our own stop
timer so that ours decides and systemd's is only the backstop.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CommandNotExecutable, CommandNotFound, UsageError
from .show import show_value

USEC = 1_000_000
INFINITY_USEC = 2**64 - 1
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class UnitPlan:
    """Everything the launcher needs to start one unit, as plain data."""

    name: str
    argv: tuple[str, ...]  # argv[0] is the absolute path systemd executes
    env: Mapping[str, str]
    cwd: str
    type: str = "exec"
    kill_mode: str = "control-group"
    timeout_stop_usec: int = INFINITY_USEC
    description: str = "User workload"
    slice: str | None = None
    extra: tuple[tuple[str, str, Any], ...] = ()  # (name, D-Bus signature, value)
    fds: tuple[int, int, int] | None = None  # stdin, stdout, stderr (indices into unix_fds)
    expand_env: bool = False  # True only for the ExecStart fallback (old systemd)


def resolve_program(program: str, env: Mapping[str, str], cwd: str) -> str:
    """Find the program as a shell would, before anything starts (as systemd-run does).

    systemd only takes absolute paths; resolving here also lets a missing program fail fast
    with a clear message and exit code 127 rather than a failed unit.
    """
    if not program:
        raise UsageError("the command is empty (usage: sdexec run [OPTIONS] -- CMD [ARG...])")
    if "/" in program:
        path = program if os.path.isabs(program) else os.path.normpath(os.path.join(cwd, program))
        if not os.path.exists(path):
            raise CommandNotFound(f"{program}: no such file or directory")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise CommandNotExecutable(f"{program}: permission denied (not an executable file)")
        return path
    found = shutil.which(program, path=env.get("PATH", DEFAULT_PATH))
    if found is None:
        raise CommandNotFound(f"{program}: command not found")
    return os.path.abspath(found)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_environment(env: Mapping[str, str], origin: str = "the job's environment") -> None:
    """systemd refuses malformed assignments with an opaque InvalidArgs: say which one."""
    for key, value in env.items():
        if not key or "=" in key or not key.isprintable() or not _utf8(key):
            raise UsageError(
                f"{origin}: {show_value(key)} is not a valid variable name (e.g. FOO=bar)"
            )
        if "\0" in value or not _utf8(value):
            raise UsageError(
                f"{origin}: the value of {show_value(key)} contains a NUL byte or is not UTF-8"
            )


def check_command(argv: Sequence[str], cwd: str) -> None:
    """NUL bytes and non-UTF-8 text cannot cross D-Bus or exec(): refuse them up front."""
    for arg in argv:
        if "\0" in arg or not _utf8(arg):
            raise UsageError(f"the command: {show_value(arg)} contains a NUL byte or is not UTF-8")
    if "\0" in cwd or not _utf8(cwd):
        raise UsageError(f"--cwd: {show_value(cwd)} contains a NUL byte or is not UTF-8")


def escape_dollars(arg: str) -> str:
    """For systemd without ExecStartEx, where ``$`` in ExecStart is always expanded."""
    return arg.replace("$", "$$")


def properties(plan: UnitPlan) -> list[tuple[str, tuple[str, Any]]]:
    """The ``a(sv)`` property list, as (name, (signature, value)) pairs."""
    path = plan.argv[0]
    argv = list(plan.argv)
    props: list[tuple[str, tuple[str, Any]]] = [
        ("Description", ("s", plan.description)),
    ]
    if plan.expand_env:
        props.append(("ExecStart", ("a(sasb)", [[path, [escape_dollars(a) for a in argv], False]])))
    else:
        props.append(("ExecStartEx", ("a(sasas)", [[path, argv, ["no-env-expand"]]])))
    props += [
        ("WorkingDirectory", ("s", plan.cwd)),
        ("Environment", ("as", [f"{k}={v}" for k, v in plan.env.items()])),
        ("RemainAfterExit", ("b", True)),
        ("Type", ("s", plan.type)),
        ("KillMode", ("s", plan.kill_mode)),
        ("TimeoutStopUSec", ("t", plan.timeout_stop_usec)),
    ]
    if plan.slice:
        props.append(("Slice", ("s", plan.slice)))
    if plan.fds is not None:
        stdin, stdout, stderr = plan.fds
        props += [
            ("StandardInputFileDescriptor", ("h", stdin)),
            ("StandardOutputFileDescriptor", ("h", stdout)),
            ("StandardErrorFileDescriptor", ("h", stderr)),
        ]
    props += [(name, (sig, value)) for name, sig, value in plan.extra]
    return props


def stop_timeout_usec(stop_timer_sec: float, *, via_imp: bool) -> int:
    """systemd's own stop timeout: infinite through the IMP (as the reference), else a backstop.

    Our stop timer signals at T and abandons at 2T; systemd's SIGKILL then comes at 2T + 5 s
    so a unit we abandoned is still cleaned up by systemd if it can be.
    """
    if via_imp:
        return INFINITY_USEC
    usec = (2 * stop_timer_sec + 5) * USEC
    return INFINITY_USEC if usec >= INFINITY_USEC else int(usec)  # also for inf


def verify_applied(wanted: Sequence[tuple[str, str, Any]], actual: Mapping[str, Any]) -> list[str]:
    """Properties systemd silently did not apply (Flux #7292): (name, wanted, actual) lines."""
    problems = []
    for name, _sig, value in wanted:
        if name not in actual:
            continue  # not readable back on this systemd: nothing to compare
        got = actual[name]
        want = value
        if isinstance(value, bytes | bytearray):
            # a CPU bitmap: systemd pads it with zero bytes (to 8 on x86-64), compare the sets
            want = list(value.rstrip(b"\0"))
            if isinstance(got, bytes | bytearray | list):
                got = list(bytes(got).rstrip(b"\0"))
        if got != want:
            problems.append(f"{name}={want!r} was not applied (systemd reports {got!r})")
    return problems
