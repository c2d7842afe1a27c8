"""``sdexec drain list|clear|set``: this node's drain state, by hand.

A drain set automatically (unkillable processes, abandoned unit) stays until an admin looks
and clears it; clearing also resets the units kept for post-mortem. ``set`` runs the same path
as an automatic drain, site command included.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from sdexec.cli.cmd_stats import open_state
from sdexec.errors import UsageError

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig
    from sdexec.exec.statedb import StateDB

log = logging.getLogger(__name__)


def list_(args: argparse.Namespace) -> int:
    from sdexec.exec.statedb import format_time

    _, db = open_state(args)
    with db:
        drains = db.drains()
    if getattr(args, "json", False):
        json.dump([d.to_json() for d in drains], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not drains:
        print("not drained")
        return 0
    rows = [("SINCE", "HOST", "JOBID", "UNIT", "REASON")]
    rows += [
        (format_time(d.created_at), d.hostname, d.jobid or "-", d.unit or "-", d.reason)
        for d in drains
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False))
        print(f"{cells}  {row[-1]}")
    return 0


def clear(args: argparse.Namespace) -> int:
    import asyncio

    cfg, db = open_state(args)
    with db:
        n = db.clear_drain()
        print(f"cleared {n} drain record{'s' if n != 1 else ''}" if n else "node was not drained")
        managers = sorted({r.manager for r in db.list_jobs() if r.state == "abandoned"})
        for manager in managers:
            units = asyncio.run(_sweep(cfg, db, user_manager=manager == "user"))
            if units:
                print(f"reset {len(units)} unit(s) of abandoned jobs: {', '.join(units)}")
    return 0


async def _sweep(cfg: ExecConfig, db: StateDB, *, user_manager: bool) -> list[str]:
    """Reset the units left for post-mortem: the admin has looked, since they cleared the drain.

    Best effort: the drain is already cleared, and the next job on the node retries.
    """
    from sdexec.jobexec.sweep import sweep_abandoned

    try:
        return await sweep_abandoned(cfg, db, user_manager=user_manager)
    except Exception as e:
        manager = "user" if user_manager else "system"
        log.warning("could not reset the units of abandoned jobs (%s manager): %s", manager, e)
        return []


def set_(args: argparse.Namespace) -> int:
    import asyncio

    from sdexec.exec.drain import drain_node

    reason = " ".join(str(args.reason).split())
    if not reason:
        raise UsageError("drain set: REASON must not be empty (e.g. sdexec drain set 'bad disk')")
    cfg, db = open_state(args)
    with db:
        rec = asyncio.run(drain_node(db, cfg, reason, jobid=None, unit=None))
    print(f"drained {rec.hostname}: {rec.reason}")
    return 0
