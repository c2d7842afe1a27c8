"""``sdexec stats`` and ``sdexec jobs``: what this node is doing, read from its state file.

``stats`` is our ``flux module stats job-exec``: the effective kill configuration and, per
live job, how far its termination has gone. ``jobs`` lists every record, finished or not, so
an admin can see which units were running before an unclean restart (Flux #6590).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig
    from sdexec.exec.statedb import JobRecord, StateDB

# job facts the state file knows better than a termination snapshot does
_JOB_KEYS = (
    "unit", "pid", "service", "state", "started", "running", "multiuser",
    "launcher_pid", "launcher_alive", "owner_uid", "created_at", "updated_at",
)  # fmt: skip

log = logging.getLogger(__name__)


def open_state(args: argparse.Namespace) -> tuple[ExecConfig, StateDB]:
    """The config named on the command line, and the node's state file it points at."""
    from sdexec.config.table import load_config
    from sdexec.exec.statedb import StateDB

    cfg = load_config(getattr(args, "config", None))
    return cfg, StateDB.open(cfg.sdexec.resolved_state_dir())


def config_stats(cfg: ExecConfig) -> dict[str, object]:
    from sdexec.config.signals import signal_name
    from sdexec.exec.termination import KillPolicy, policy_stats

    out = policy_stats(KillPolicy.from_config(cfg, via_imp=False))
    out["sdexec-stop-timer-sec"] = cfg.sdexec_stop_timer_sec
    out["sdexec-stop-timer-signal"] = signal_name(cfg.sdexec_stop_timer_signal)
    out["service"] = cfg.service
    out["state-dir"] = cfg.sdexec.resolved_state_dir()
    return out


def job_stats(rec: JobRecord, now: float | None = None) -> dict[str, object]:
    """One live job as ``flux module stats job-exec`` shows it, plus where it runs.

    The termination snapshot was taken when the launcher last wrote it, so the time left
    before the shell is signalled is aged to ``now``.
    """
    if now is None:
        now = time.time()
    out: dict[str, object] = {
        "jobid": rec.jobid,
        "rank": rec.rank,
        "unit": rec.unit,
        "pid": rec.pid,
        "service": rec.service,
        "state": rec.state,
        "started": rec.pid is not None or rec.state in ("running", "terminating"),
        "running": rec.state in ("running", "terminating"),
        "multiuser": rec.owner_uid != os.getuid(),
        "launcher_pid": rec.launcher_pid,
        "launcher_alive": rec.launcher_alive(),
        "owner_uid": rec.owner_uid,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }
    term = dict(rec.termination or {})
    remaining = term.get("kill_shell_delay_remaining")
    if (
        term.get("exception_in_progress")
        and isinstance(remaining, int | float)
        and rec.updated_at
        and rec.live
    ):
        term["kill_shell_delay_remaining"] = max(0.0, remaining - max(0.0, now - rec.updated_at))
    for key, value in term.items():
        out[f"termination_{key}" if key in _JOB_KEYS else key] = value
    return out


def stats(db: StateDB, cfg: ExecConfig) -> dict[str, object]:
    now = time.time()
    return {
        "config": config_stats(cfg),
        "drained": [d.to_json() for d in db.drains()],
        # keyed by job id as Flux's stats are; a node's further shells of one job by unit
        "jobs": {
            rec.jobid if rec.rank == 0 else rec.unit: job_stats(rec, now)
            for rec in db.list_jobs(live_only=True)
        },
    }


def _show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _print_stats(data: dict[str, object]) -> None:
    from sdexec.exec.statedb import format_time

    config = data["config"]
    assert isinstance(config, dict)
    print("config:")
    width = max(len(k) for k in config)
    for key, value in config.items():
        print(f"  {key:<{width}}  {_show(value)}")
    drained = data["drained"]
    assert isinstance(drained, list)
    if not drained:
        print("drained: no")
    for d in drained:
        print(f"drained: {d['reason']} (since {format_time(d['created_at'])})")
    jobs = data["jobs"]
    assert isinstance(jobs, dict)
    print(f"jobs: {len(jobs) or 'none'}")
    for jobid, job in jobs.items():
        fields = " ".join(f"{k}={_show(v)}" for k, v in job.items() if not k.endswith("_at"))
        print(f"  {jobid} {fields}")


def main(args: argparse.Namespace) -> int:
    cfg, db = open_state(args)
    with db:
        data = stats(db, cfg)
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_stats(data)
    return 0


def describe_status(rec: JobRecord) -> str:
    """A record's wait status as a person reads it in a table."""
    from sdexec.systemd.unitstate import describe_status as describe

    return "-" if rec.exit_status is None else describe(rec.exit_status, short=True)


def _orphans(known: set[str]) -> list[str]:
    """Units without a record, when systemd can be asked; else none (and say why at -v)."""
    import asyncio

    from sdexec.errors import SdexecError
    from sdexec.jobexec.sweep import orphan_units

    try:
        return asyncio.run(orphan_units(known))
    except (SdexecError, OSError) as e:
        log.info("cannot list job units from systemd: %s", e)
        return []


def jobs(args: argparse.Namespace) -> int:
    from sdexec.exec.statedb import format_time

    _, db = open_state(args)
    with db:
        records = db.list_jobs()
    # systemd lists every unit to anyone: only root (whose records are the node's) can tell
    # an orphan from another user's job
    orphans = _orphans({rec.unit for rec in records}) if os.geteuid() == 0 else []
    if getattr(args, "json", False):
        out = [{**rec.to_json(), "launcher_alive": rec.launcher_alive()} for rec in records]
        out += [{"jobid": None, "unit": unit, "state": "orphan"} for unit in orphans]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for unit in orphans:
        print(f"orphan unit (no record here): {unit}")
    if not records:
        print("no jobs recorded")
        return 0
    rows = [("JOBID", "STATE", "SERVICE", "PID", "LAUNCHER", "CREATED", "STATUS", "UNIT")]
    errors: dict[int, str] = {}
    for rec in records:
        launcher = str(rec.launcher_pid)
        if rec.live and not rec.launcher_alive():
            launcher += " (gone)"
        rows.append(
            (
                rec.jobid, rec.state, rec.service, _show(rec.pid), launcher,
                format_time(rec.created_at), describe_status(rec), rec.unit,
            )
        )  # fmt: skip
        if rec.error:
            errors[len(rows) - 1] = rec.error
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for n, row in enumerate(rows):
        line = "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False))
        print(f"{line}  {row[-1]}" + (f"  error: {errors[n]}" if n in errors else ""))
    return 0
