"""Units the node's records no longer explain: abandoned ones systemd has since stopped
(reset, so the drain can clear) and orphans (no record at all)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sdexec.config.table import ExecConfig

if TYPE_CHECKING:
    from sdexec.exec.statedb import StateDB

log = logging.getLogger(__name__)


async def sweep_abandoned(cfg: ExecConfig, db: StateDB, *, user_manager: bool = False) -> list[str]:
    """Reset the units of abandoned jobs that systemd has since stopped; return their names.

    An abandoned unit is left as it is for post-mortem (Flux #5960) while the node is
    drained; once systemd's own stop timeout has ended it, the next ``drain clear`` or the next
    job on the node resets it, so failed units never pile up.
    """
    manager_name = "user" if user_manager else "system"
    recs = [r for r in db.list_jobs() if r.state == "abandoned" and r.manager == manager_name]
    if not recs:
        return []
    from sdexec.systemd.bus import Manager
    from sdexec.systemd.stop import reset_failed
    from sdexec.systemd.unitname import object_path
    from sdexec.systemd.unitstate import ENDED, ActiveState

    cleaned = []
    manager = Manager(user=user_manager)
    await manager.connect()
    try:
        for rec in recs:
            props = await manager.get_all(object_path(rec.unit))
            state = props.get("ActiveState")
            if props.get("LoadState") == "loaded" and state not in ENDED:
                log.info("%s (abandoned job %s) is still %s", rec.unit, rec.jobid, state)
                continue
            if state == ActiveState.FAILED and not await reset_failed(
                manager, rec.unit, retry=False
            ):
                continue
            db.remove_job(rec.jobid, rec.rank)
            cleaned.append(rec.unit)
            log.info("cleaned up %s of abandoned job %s", rec.unit, rec.jobid)
    finally:
        await manager.close()
    return cleaned


async def orphan_units(known: set[str], *, user_manager: bool = False) -> list[str]:
    """Job units systemd has that no record names (Flux #6590): one call, never a poll loop."""
    from sdexec.systemd.bus import Manager
    from sdexec.systemd.list import list_units

    manager = Manager(user=user_manager)
    await manager.connect()
    try:
        units = await list_units(manager)
    finally:
        await manager.close()
    return sorted(u.name for u in units if u.name not in known)
