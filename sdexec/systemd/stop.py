"""The stop operations on a unit: StopUnit, KillUnit, ResetFailedUnit.

One module owns them (as Flux's libsdexec has one file per operation), so the launcher, the
job, the sweep of abandoned units and the epilog all stop, signal and reset a unit the same
way, with the same reading of systemd's refusals: a unit that is already gone is not an error
for any of them.
"""

from __future__ import annotations

import logging

from sdexec.errors import LaunchError
from sdexec.systemd.bus import BusCallError, Manager

log = logging.getLogger(__name__)


def is_gone(e: BusCallError) -> bool:
    """systemd's word that the unit (or its main process) is no longer there to act on."""
    return "NoSuchUnit" in e.name or "no main process" in e.text.lower()


async def stop_unit(manager: Manager, unit: str, mode: str = "fail", *, retry: bool = True) -> bool:
    """StopUnit, waiting for its job. False when it did not get through (the bus went away, or
    systemd refused): the caller's next re-read retries. A unit already gone counts as
    stopped."""
    try:
        await manager.job_call("StopUnit", "ss", [unit, mode], retry=retry)
    except BusCallError as e:
        if not is_gone(e):
            log.warning("%s: StopUnit: %s", unit, e)
            return False
    except LaunchError as e:  # the bus went away: the resync after reconnect retries
        log.warning("%s: StopUnit: %s", unit, e)
        return False
    return True


async def kill_unit(
    manager: Manager, unit: str, who: str, signum: int, *, retry: bool = True
) -> None:
    """KillUnit; raises :class:`BusCallError` for the caller to judge (see :func:`is_gone`):
    a refused signal (EPERM on a guest's processes) is the job's error, not ours to hide."""
    await manager.call("KillUnit", "ssi", [unit, who, int(signum)], retry=retry)


async def reset_failed(manager: Manager, unit: str, *, retry: bool = True) -> bool:
    """ResetFailedUnit, so systemd forgets a failed unit; False when that did not happen
    (a unit that is already gone counts as forgotten)."""
    try:
        await manager.call("ResetFailedUnit", "s", [unit], retry=retry)
    except BusCallError as e:
        if "NoSuchUnit" not in e.name:
            log.warning("%s: ResetFailedUnit: %s", unit, e)
            return False
    except LaunchError as e:
        log.warning("%s: ResetFailedUnit: %s", unit, e)
        return False
    return True
