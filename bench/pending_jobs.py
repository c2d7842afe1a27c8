"""How many systemd jobs one client may leave pending before systemd drops off the bus.

systemd tracks the client behind every job it queues for a D-Bus call (StartUnit,
StopUnit, StartTransientUnit...) with one match rule per job on systemd's *own* bus
connection. dbus-daemon caps match rules per connection (512 on Debian's system bus); past
that, sd-bus fails systemd's whole connection ("Got disconnect on API bus"), every call in
flight gets NoReply, and systemd may stay off the bus for minutes. Bounding calls in flight
does not bound this: StopUnit returns as soon as the job is queued.

K units ignoring SIGTERM (so their stop jobs stay pending) are stopped two ways: ``unbounded``
(StopUnit as fast as replies come, C in flight: what a launcher does when N jobs end at once)
and ``bounded`` (at most C stop jobs pending: each slot held until the unit is gone). Goal:
``bounded`` keeps systemd on the bus; ``unbounded`` shows the limit.

    python bench/pending_jobs.py --k 600 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dbus_fast import Variant

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RawClient,
    RawUnit,
    cancel_on_sigterm,
    cleanup_units,
    emit,
    error_summary,
    host_facts,
    log,
    rnd,
    run_prefix,
    unit_object_path,
    workers,
)

STUBBORN = "trap '' TERM; exec sleep 300"  # SIGTERM ignored, inherited by sleep: one process


async def start_stubborn(client: RawClient, name: str, stop_timeout_s: float) -> RawUnit:
    unit = RawUnit(name, unit_object_path(name))
    client.units[unit.path] = unit
    props = [
        ["ExecStart", Variant("a(sasb)", [["/bin/sh", ["/bin/sh", "-c", STUBBORN], False]])],
        ["Type", Variant("s", "exec")],
        ["TimeoutStopUSec", Variant("t", int(stop_timeout_s * 1_000_000))],
    ]
    await client.call("StartTransientUnit", "ssa(sv)a(sa(sv))", [name, "fail", props, []])
    await unit.started.wait()
    return unit


async def trial(mode: str, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    client = RawClient(pass_fds=False)
    await client.connect()
    # one rule for all units, so our own match-rule cap is not what is measured
    await client.watch_all_units()
    out: dict[str, Any] = {"mode": mode, "k": args.k}
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        units: list[RawUnit] = []

        async def start(i: int) -> None:
            units.append(
                await start_stubborn(client, f"shell-0-{prefix}-{mode[0]}{i}.service", args.stop_s)
            )

        errors = await workers(args.k, args.concurrency, start)
        out["started"] = len(units)
        if errors:
            out["start_errors"] = error_summary(errors)
        log(f"{mode}: {len(units)} stubborn units started; stopping them")
        issued = 0
        before = client.calls_sent

        async def stop(i: int) -> None:
            nonlocal issued
            await client.call("StopUnit", "ss", [units[i].name, "replace"])
            issued += 1
            if mode == "bounded":
                await units[i].gone.wait()  # the slot is the pending job, not the call

        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(args.window):
                errors = await workers(len(units), args.concurrency, stop)
        except TimeoutError:
            errors = []
        await asyncio.sleep(2)
        out["stop_calls_answered"] = issued
        out["stop_seconds"] = rnd(time.perf_counter() - t0)
        if errors:
            out["stop_errors"] = error_summary(errors)
        out["systemd_left_bus"] = client.systemd_left_bus > 0
        if client.systemd_left_after is not None:
            out["stop_calls_sent_when_it_left"] = client.systemd_left_after - before
        out["systemd_match_refusals"] = match_refusals(since)
    finally:
        await client.close()
        out["leftover_units_cleaned"] = await cleanup_units([f"shell-0-{prefix}-{mode[0]}*"])
    log(f"{mode}: systemd left the bus: {out['systemd_left_bus']}")
    return out


def match_refusals(since: str) -> dict[str, int] | None:
    """dbus-daemon's refusals of AddMatch since ``since``, by connection (":1.0" is systemd)."""
    try:
        text = subprocess.run(
            ["journalctl", "--no-pager", "-q", "-o", "cat", "--since", since],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "not allowed to add more match rules" in line:
            conn = line.split('"')[1] if '"' in line else "?"
            out[conn] = out.get(conn, 0) + 1
    return out


async def main(args: argparse.Namespace) -> int:
    cancel_on_sigterm()
    prefix = run_prefix()
    results = []
    try:
        for mode in args.modes.split(","):
            results.append(await trial(mode, args, prefix))
            await asyncio.sleep(3)  # let systemd come back if it left
    finally:
        leftover = await cleanup_units()
    by = {r["mode"]: r for r in results}
    met = "bounded" in by and not by["bounded"]["systemd_left_bus"]
    emit(
        {
            "benchmark": "pending_jobs",
            "goal": "with pending stop jobs bounded (<= concurrency) systemd stays on the bus; "
            "the unbounded run shows where it leaves",
            "goal_met": met,
            "trials": results,
            "leftover_units": leftover,
            "params": {
                "k": args.k,
                "concurrency": args.concurrency,
                "unit": ["/bin/sh", "-c", STUBBORN],
                "stop_timeout_s": args.stop_s,
                "window_s": args.window,
            },
            "host": host_facts(),
        }
    )
    return 0 if met else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--k", type=int, default=600, help="units to stop (default 600)")
    p.add_argument("--concurrency", "-c", type=int, default=64, help="calls in flight (64)")
    p.add_argument("--modes", default="bounded,unbounded", help="trials, in order")
    p.add_argument("--stop-s", type=float, default=20.0, help="the units' TimeoutStopSec (20)")
    p.add_argument("--window", type=float, default=15.0, help="seconds of stopping per trial")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (KeyboardInterrupt, asyncio.CancelledError):  # units were disposed of in finally
        log("interrupted")
        sys.exit(130)
