"""The unit-state model: systemd properties in, job events out.

Pure, so the subtle orderings (the Service interface's ExecMain* and the Unit interface's
ActiveState arrive in separate PropertiesChanged signals, in either order; a re-read after a
reconnect repeats what was already seen) are tested without a bus. Each event is emitted at
most once per unit, whatever the order or repetition of updates.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STATE_PROPERTIES = frozenset(
    {
        "ActiveState", "SubState", "LoadState", "Result", "ExecMainPID", "ExecMainCode",
        "ExecMainStatus", "ControlGroup",
    }
)  # fmt: skip
"""What the model (and the launcher) reads of a unit: all else is never unwrapped nor kept."""

# ExecMainCode values are siginfo si_code values (CLD_*)
CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3
EXIT_EXEC = 203  # systemd's status for "the exec() of the main process failed"
EXIT_CHDIR = 200


class ActiveState(enum.StrEnum):
    """systemd's ActiveState values (a StrEnum: equal to the strings D-Bus carries)."""

    ACTIVE = "active"
    RELOADING = "reloading"
    INACTIVE = "inactive"
    FAILED = "failed"
    ACTIVATING = "activating"
    DEACTIVATING = "deactivating"


ENDED = frozenset({ActiveState.INACTIVE, ActiveState.FAILED})
"""Nothing of the unit runs any more (a failed one waits for ResetFailedUnit)."""
RUNNING = frozenset({ActiveState.ACTIVE, ActiveState.RELOADING, ActiveState.DEACTIVATING})
"""The unit's processes run (deactivating: the main one ended, others outlive it)."""


class Phase(enum.Enum):
    NEW = "new"
    STARTED = "started"
    FINISHED = "finished"  # the main process has exited, the unit may still be there
    GONE = "gone"  # the unit is inactive or failed: nothing of the job runs any more


@dataclass(frozen=True)
class Started:
    pid: int


@dataclass(frozen=True)
class Finished:
    """The main process exited: ``wait_status`` is encoded as waitpid() would give it."""

    wait_status: int

    @property
    def returncode(self) -> int:
        """asyncio's convention: the exit code, or -N for death by signal N."""
        return os.waitstatus_to_exitcode(self.wait_status)


@dataclass(frozen=True)
class Deactivating:
    """The unit entered deactivating: the stop timer's cue."""


@dataclass(frozen=True)
class Gone:
    """The unit is inactive or failed; ``failed`` says whether it needs ResetFailedUnit."""

    failed: bool
    result: str


Event = Started | Finished | Deactivating | Gone


def wait_status(code: int, status: int) -> int:
    """Encode (ExecMainCode, ExecMainStatus) as a waitpid() status."""
    if code == CLD_EXITED:
        return (status & 0xFF) << 8
    if code == CLD_KILLED:
        return status & 0x7F
    if code == CLD_DUMPED:
        return (status & 0x7F) | 0x80
    raise ValueError(f"ExecMainCode {code} is not an exit")


def describe_status(ws: int, *, short: bool = False) -> str:
    """Human wording of a wait status, for logs and --json (``short``: a table's cell, like
    ``exit 3`` or ``signal 9``)."""
    if short:
        if os.WIFEXITED(ws):
            return f"exit {os.WEXITSTATUS(ws)}"
        if os.WIFSIGNALED(ws):
            return f"signal {os.WTERMSIG(ws)}"
        return f"status {ws}"
    rc = os.waitstatus_to_exitcode(ws)
    if rc >= 0:
        return f"exited with status {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    core = " (core dumped)" if ws & 0x80 else ""
    return f"killed by {name}{core}"


EXEC_FAILURES = {
    200: "the working directory could not be entered",
    203: "the program could not be executed",
    204: "the standard I/O could not be set up",
    216: "the group could not be set",
    217: "the user could not be set",
}
"""systemd's EXIT_* statuses of a main process that never ran the program (systemd.exec(5))."""


@dataclass
class UnitState:
    """Accumulates a unit's properties and yields each job event once."""

    name: str
    props: dict[str, Any] = field(default_factory=dict)
    phase: Phase = Phase.NEW
    pid: int | None = None
    status: int | None = None
    deactivating_seen: bool = False
    was_active: bool = False

    @property
    def active_state(self) -> str:
        return str(self.props.get("ActiveState", ""))

    def update(self, changed: Mapping[str, Any]) -> list[Event]:
        if changed.get("LoadState") in ("not-found", "error"):
            # The unit was already collected and systemd answered for a fresh stub of the
            # same name: its zeros must not overwrite what the signals told us.
            changed = {"ActiveState": "inactive", "SubState": "dead"}
        self.props.update(changed)
        events: list[Event] = []
        active = self.active_state
        main_pid = int(self.props.get("ExecMainPID", 0) or 0)
        code = int(self.props.get("ExecMainCode", 0) or 0)
        status = int(self.props.get("ExecMainStatus", 0) or 0)
        if active in ("activating", "active", "reloading", "deactivating", "failed"):
            self.was_active = True

        if self.pid is None and main_pid > 0 and (self.was_active or code):
            self.pid = main_pid
            if self.phase is Phase.NEW:
                self.phase = Phase.STARTED
            events.append(Started(main_pid))
        if self.status is None and code in (CLD_EXITED, CLD_KILLED, CLD_DUMPED):
            # may come after "gone": the Service interface's signal can follow the Unit's
            self.status = wait_status(code, status)
            if self.phase is not Phase.GONE:
                self.phase = Phase.FINISHED
            events.append(Finished(self.status))
        if active == "deactivating" and not self.deactivating_seen:
            self.deactivating_seen = True
            events.append(Deactivating())
        if active in ("inactive", "failed") and self.was_active and self.phase is not Phase.GONE:
            self.phase = Phase.GONE
            events.append(Gone(failed=active == "failed", result=str(self.props.get("Result", ""))))
        return events
