"""``sdexec epilog``: when a resource manager's job ends, end what is left of it on this node.

A Slurm step's tasks are our clients (``sdexec run``); their units are not their children.
``scancel``, an interrupted srun or the time limit send the clients SIGTERM (which they turn
into the job's termination sequence) and, after ``KillWait``, SIGKILL; a client may also die
at once (``KillOnBadExit``, OOM). Either way the units must not outlive the job, so the
site's ``Epilog`` (run as root on every node of the job, ``SLURM_JOB_ID`` set) runs
``sdexec epilog``: every unit of the job on this node (found by name, with or without a
record) gets the termination sequence (term-signal first), finished ones are cleaned up,
stale records are removed. Units that cannot be ended drain the node with sdexec's reason
(through the site's drain-command) and the command exits 1, so Slurm drains it too
("Epilog error", which never replaces a reason already set).

It works in-process against the node's state database and systemd, whether or not the
node's sdexec server also tracks the job (the server then sees its units end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from sdexec.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0


def main(args: argparse.Namespace) -> int:
    from sdexec.config.duration import parse_fsd
    from sdexec.config.table import load_config
    from sdexec.systemd.unitname import check_jobid

    jobid = args.job or os.environ.get("SLURM_JOB_ID")
    if not jobid:
        raise UsageError(
            "epilog: no job given (--job ID, or SLURM_JOB_ID as Slurm's Epilog sets it)"
        )
    check_jobid(jobid)
    timeout = DEFAULT_TIMEOUT
    if args.timeout is not None:
        try:
            timeout = parse_fsd(args.timeout, "--timeout")
        except ValueError as e:
            raise UsageError(f"epilog: --timeout: {e}") from None
        if not timeout > 0:
            raise UsageError("epilog: --timeout must be more than 0 (e.g. --timeout 5m)")
    cfg = load_config(args.config)
    report = asyncio.run(end_job_units(cfg, jobid, user_manager=args.user, bound=timeout))
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    for line in report["problems"]:
        sys.stderr.write(f"sdexec: epilog: job {jobid}: {line}\n")
    return 1 if report["problems"] else 0


async def end_job_units(
    cfg: Any, slurm_job: str, *, user_manager: bool = False, bound: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """End every unit of ``slurm_job`` here; what was ended, cleaned, and what could not be."""
    from sdexec.exec.drain import drain_node
    from sdexec.exec.launcher import Launcher
    from sdexec.jobexec.records import open_db
    from sdexec.jobexec.slurm import belongs_to, job_of_unit
    from sdexec.systemd.list import list_units
    from sdexec.systemd.unitname import unit_name
    from sdexec.systemd.unitstate import ENDED

    # a job id is carried into unit names escaped: compare escaped forms
    escaped = unit_name(slurm_job).removeprefix("shell-0-").removesuffix(".service")
    manager_name = "user" if user_manager else "system"
    db = open_db(cfg)
    launcher = Launcher(cfg, user=user_manager)
    report: dict[str, Any] = {"job": slurm_job, "ended": [], "cleaned": [], "problems": []}
    try:
        records = [
            r
            for r in db.list_jobs()
            if belongs_to(r.jobid, slurm_job) and r.manager == manager_name
        ]
        await launcher.connect()
        listed = await list_units(launcher.manager)
        units: dict[str, str] = {}  # unit -> sdexec job id
        active: set[str] = set()  # what systemd says runs, whatever its unit file says
        for entry in listed:
            name = entry.name
            parsed = job_of_unit(name)
            if parsed is not None and belongs_to(parsed[1], escaped):
                units[name] = parsed[1]
                if entry.active_state not in ENDED:
                    active.add(name)
        by_unit = {r.unit: r for r in records if r.service == "sdexec"}
        for unit, known in by_unit.items():
            units.setdefault(unit, known.jobid)
        jobs = []
        for unit in sorted(units):
            rec = by_unit.get(unit)
            jobid = rec.jobid if rec is not None else units[unit]

            async def on_drain(job: Any, reason: str, jobid: str = jobid) -> None:
                await drain_node(db, cfg, reason, jobid=jobid, unit=job.name)

            job = await launcher.adopt(jobid, unit, on_drain=on_drain)
            if not job.running:
                if unit in active:  # not "loaded" (a daemon-reload made it "bad-setting")
                    await _kill_unloaded(launcher, cfg, unit, report)
                continue  # collected already: nothing to end
            jobs.append(job)
        for job in jobs:
            if job.wait_status is None:
                log.info("epilog: ending %s", job.name)
                report["ended"].append(job.name)
                job.cancel("cancel")
            else:
                report["cleaned"].append(job.name)
        if jobs:
            _done, pending = await asyncio.wait(
                [asyncio.ensure_future(j.wait()) for j in jobs], timeout=bound
            )
            for task in pending:
                task.cancel()
        for job in jobs:
            if job.result == "abandoned":
                report["problems"].append(f"{job.name}: {job.error or 'abandoned'}")
            elif job.running:
                reason = (
                    f"sdexec epilog: {job.name} of job {slurm_job} still running "
                    f"{bound:g}s after its termination began"
                )
                report["problems"].append(reason)
                await drain_node(db, cfg, reason, jobid=slurm_job, unit=job.name)
        # reconcile: records of this job whose unit is gone and whose launcher is dead
        live_units = {j.name for j in jobs if j.running or j.result == "abandoned"}
        for rec in records:
            if rec.unit in live_units or rec.state == "abandoned":
                continue
            if any(p.startswith(f"{rec.unit}:") for p in report["problems"]):
                continue
            if rec.launcher_pid and rec.launcher_alive() and rec.launcher_pid != os.getpid():
                continue  # its launcher (the server) finishes it
            db.remove_job(rec.jobid)
            report["cleaned"].append(f"record {rec.jobid}")
        # A local drain is the node's truth (it refuses jobs): make sure Slurm knows it, with
        # sdexec's reason, even if the drain-command failed when it happened (or the node was
        # resumed in Slurm but never cleared here); if it fails again, exiting non-zero makes
        # Slurm drain the node itself ("Epilog error"): a drain is never lost.
        drains = db.drains()
        if drains:
            report["drained"] = drains[-1].reason
            template = tuple(cfg.sdexec.drain_command or ())
            told = False
            if template:
                from sdexec.exec.drain import expand_drain_command, run_drain_command

                told = await run_drain_command(
                    expand_drain_command(template, drains[-1]), command_timeout=30.0
                )
            if not told:
                report["problems"].append(
                    f"this node is drained ({drains[-1].reason}) and the resource manager "
                    "could not be told through drain-command"
                )
    finally:
        for job in list(launcher.jobs.values()):
            await launcher.forget(job)
        await launcher.close()
        db.close()
    report["at"] = time.time()
    return report


async def _kill_unloaded(launcher: Any, cfg: Any, unit: str, report: dict[str, Any]) -> None:
    """A running unit systemd no longer has a valid unit for (StopUnit refuses it): its
    processes still get term-signal, then kill-signal after kill-timeout."""
    from sdexec.systemd.bus import BusCallError
    from sdexec.systemd.stop import kill_unit, reset_failed
    from sdexec.systemd.unitname import object_path
    from sdexec.systemd.unitstate import ENDED

    path = object_path(unit)
    for signum in (cfg.term_signal, cfg.kill_signal):
        try:
            await kill_unit(launcher.manager, unit, "all", signum, retry=False)
        except BusCallError as e:
            log.warning("epilog: KillUnit %s: %s", unit, e)
        deadline = time.monotonic() + cfg.kill_timeout
        while time.monotonic() < deadline:
            props = await launcher.manager.get_some(path, ["ActiveState"])
            if props.get("ActiveState") in ENDED:
                report["ended"].append(unit)
                await reset_failed(launcher.manager, unit, retry=False)
                return
            await asyncio.sleep(0.1)
    report["problems"].append(
        f"{unit}: still running after {cfg.term_signal} and {cfg.kill_signal}"
    )
