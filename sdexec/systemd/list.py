"""The list operation: which of our units systemd has (ListUnitsByPatterns).

Every job shell is ``shell-RANK-JOBID.service`` or, for a guest through the IMP,
``imp-shell-RANK-JOBID.service`` (``sdexec.systemd.unitname``): the patterns live here, once,
for the orphan report, the sweep and the epilog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sdexec.systemd.bus import Manager

SHELL_PATTERNS = ("shell-*.service", "imp-shell-*.service")


@dataclass(frozen=True)
class ListedUnit:
    """One entry of systemd's unit list (the fields we read of its ``a(ssssssouso)``)."""

    name: str
    load_state: str
    active_state: str
    sub_state: str


async def list_units(
    manager: Manager, patterns: Sequence[str] = SHELL_PATTERNS, states: Sequence[str] = ()
) -> list[ListedUnit]:
    """The units systemd has loaded whose names match ``patterns`` (in any state unless
    ``states`` narrows it), whether or not any record of ours knows them."""
    (listed,) = await manager.call("ListUnitsByPatterns", "asas", [list(states), list(patterns)])
    return [ListedUnit(str(u[0]), str(u[2]), str(u[3]), str(u[4])) for u in listed]
