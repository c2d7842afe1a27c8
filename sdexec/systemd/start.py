"""The start operation: what goes into ``StartTransientUnit`` (pure data, from a
:class:`UnitPlan`), and the call that sends it.

The choices are the reference's (Flux's sdexec; ``docs/design-notes.md``, "The unit") with
what systemd taught us: ``ExecStartEx`` with ``no-env-expand`` so a ``$`` in an argument
reaches the program literally, and a systemd stop timeout longer than our own stop timer so
that ours decides and systemd's is only the backstop. The command itself is checked before
it gets here (``sdexec.exec.command``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdexec.config.memory import UINT64_MAX
from sdexec.errors import UsageError

if TYPE_CHECKING:
    from sdexec.systemd.bus import Manager

USEC = 1_000_000
INFINITY_USEC = UINT64_MAX


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
    user: tuple[int, int, tuple[int, ...]] | None = None  # uid, gid, supplementary gids


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
        # systemd ignores SIGPIPE in services by default: a job would see `yes | head` end
        # with "Broken pipe" (exit 1) instead of dying of SIGPIPE (141) as in a shell
        ("IgnoreSIGPIPE", ("b", False)),
    ]
    if plan.slice:
        props.append(("Slice", ("s", plan.slice)))
    if plan.user is not None:
        uid, gid, groups = plan.user
        props += [
            ("User", ("s", str(uid))),
            ("Group", ("s", str(gid))),
            ("SupplementaryGroups", ("as", [str(g) for g in groups])),
        ]
    if plan.fds is not None:
        stdin, stdout, stderr = plan.fds
        props += [
            ("StandardInputFileDescriptor", ("h", stdin)),
            ("StandardOutputFileDescriptor", ("h", stdout)),
            ("StandardErrorFileDescriptor", ("h", stderr)),
        ]
    props += [(name, (sig, _dbus_value(value))) for name, sig, value in plan.extra]
    return props


def _dbus_value(value: Any) -> Any:
    """dbus-fast wants lists for arrays and structs: config values are tuples (immutable)."""
    if isinstance(value, tuple | list):
        return [_dbus_value(v) for v in value]
    return value


def stop_timeout_usec(stop_timer_sec: float, *, via_imp: bool) -> int:
    """systemd's own stop timeout: infinite through the IMP (as the reference), else a backstop.

    Our stop timer signals at T and abandons at 2T; systemd's SIGKILL then comes at 2T + 5 s
    so a unit we abandoned is still cleaned up by systemd if it can be.
    """
    if via_imp:
        return INFINITY_USEC
    usec = (2 * stop_timer_sec + 5) * USEC
    return INFINITY_USEC if usec >= INFINITY_USEC else int(usec)  # also for inf


def _comparable(value: Any) -> Any:
    """Structs come back from the bus as tuples, were sent as lists; bytes as int lists."""
    if isinstance(value, bytes | bytearray):
        return list(value)
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    return value


def verify_applied(wanted: Sequence[tuple[str, str, Any]], actual: Mapping[str, Any]) -> list[str]:
    """Properties systemd silently did not apply (Flux #7292): (name, wanted, actual) lines."""
    problems = []
    for name, _sig, value in wanted:
        if name not in actual:
            continue  # not readable back on this systemd: nothing to compare
        got = _comparable(actual[name])
        want = _comparable(value)
        if isinstance(value, bytes | bytearray) and isinstance(got, list):
            # a CPU set comes back padded to whole machine words: trailing zero bytes
            while len(got) > len(want) and got[-1] == 0:
                got.pop()
        if got != want:
            problems.append(f"{name}={want!r} was not applied (systemd reports {got!r})")
    return problems


def refuse_unmarshallable(plan: UnitPlan) -> None:
    """Raise a one-line error naming the first property D-Bus cannot carry, if there is one:
    dbus-fast checks values only as it marshals a call, and its own exception would reach the
    user as a traceback."""
    from sdexec.config.properties import dbus_problem

    for name, (sig, value) in properties(plan):
        problem = dbus_problem(name, sig, value)
        if problem is not None:
            raise UsageError(f"unit property {name}: {problem}")


async def start_transient_unit(manager: Manager, plan: UnitPlan, fds: Sequence[int]) -> str:
    """Send ``StartTransientUnit`` for ``plan`` with ``fds`` (its stdio, by index) and return
    the start job's path; the caller follows that job to its JobRemoved."""
    from dbus_fast import Variant

    props = [[k, Variant(sig, v)] for k, (sig, v) in properties(plan)]
    return await manager.job_call(
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        [plan.name, "fail", props, []],
        unix_fds=fds,
    )
