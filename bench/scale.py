"""Memory and fds of one Launcher tracking M concurrent units, vs a raw client holding M units.

Each side runs in its own worker process (so neither inherits the other's freed heap), one
after the other: start M ``sleep 300`` units (``--concurrency`` at a time), measure RSS and
open fds, kill them all (``Job.kill()`` / ``KillUnit``) and wait, measure again. Goals:
RSS per unit = (rss_after_start - rss_before) / M <= 20 KB, and the fd count back to its
baseline (+-2) once all are gone. Every bench unit is killed and reset even on error or Ctrl-C.

    python bench/scale.py --m 2000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``sdexec`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    LogCounter,
    RawClient,
    RawUnit,
    cancel_on_sigterm,
    cleanup_units,
    emit,
    error_summary,
    host_facts,
    log,
    pids_limit,
    raise_nofile,
    rnd,
    run_prefix,
    workers,
)

GOAL_KB_PER_UNIT = 20.0
GOAL_FD_SLACK = 2


def type_counts() -> dict[str, int]:
    out: dict[str, int] = {}
    for o in gc.get_objects():
        k = type(o).__qualname__
        out[k] = out.get(k, 0) + 1
    return out


def leak_suspects(before: dict[str, int], units: int, top: int = 10) -> dict[str, float]:
    """Object types that grew since ``before``, per unit: what the launcher still holds."""
    after = type_counts()
    grown = {k: after[k] - before.get(k, 0) for k in after}
    best = sorted(grown.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v / max(units, 1), 2) for k, v in best if v > 0}


def snapshot() -> dict[str, Any]:
    import psutil

    gc.collect()
    p = psutil.Process()
    return {
        "rss_kb": p.memory_info().rss // 1024,
        "fds": p.num_fds(),
        "threads": p.num_threads(),
        "tasks": len(asyncio.all_tasks()),
        "gc_objects": len(gc.get_objects()),  # a leak shows here even when RSS is not returned
    }


# --- workers (one process each) -----------------------------------------------------------


async def bounded(
    coro: Coroutine[Any, Any, list[BaseException]], limit_s: float, out: dict[str, Any]
) -> list[BaseException]:
    """The start phase, given up after ``limit_s``: a hang is a result too, not a stuck run."""
    try:
        async with asyncio.timeout(limit_s):
            return await coro
    except TimeoutError:
        out["start_timeout"] = f"not all units started within {limit_s:g}s"
        log(out["start_timeout"])
        return []


async def simulate_namespace_match(mgr: Any, out: dict[str, Any]) -> None:
    """The proposed fix, simulated through private members: one rule for all units at once."""
    if not hasattr(mgr, "_add_match") or not hasattr(mgr, "_namespace_match"):
        out["namespace_match_simulated"] = "not possible: Manager has changed"
        return
    await mgr._add_match(
        "type='signal',sender='org.freedesktop.systemd1',"
        "path_namespace='/org/freedesktop/systemd1/unit',"
        "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"
    )
    mgr._namespace_match = True
    out["namespace_match_simulated"] = True


def planned_end(args: argparse.Namespace) -> float:
    """With ``--end exit``: the wall-clock time at which every unit exits by itself."""
    return time.time() + float(args.m / args.exit_rate + args.settle + 3)


def unit_argv(args: argparse.Namespace, t_end: float) -> list[str]:
    """``sleep`` until the common end, so all M main processes exit 0 within a few ms."""
    if args.end == "kill":
        return list(args.argv)
    return ["sleep", f"{max(0.5, t_end - time.time()):.3f}"]


async def begin_end(args: argparse.Namespace, t_end: float) -> float:
    """Wait for the planned exit (``--end exit``); the monotonic time the end phase starts."""
    if args.end == "exit":
        await asyncio.sleep(max(0.0, t_end - time.time()))
    return time.monotonic()


async def lib_worker(args: argparse.Namespace, prefix: str, out: dict[str, Any]) -> None:
    from sdexec.config.table import ExecConfig, load_config
    from sdexec.exec.channel import DEVNULL, PIPE
    from sdexec.exec.launcher import Job, JobSpec, Launcher

    cfg = load_config(args.config) if args.config else ExecConfig()
    out_spec = PIPE if args.stdio == "pipe" else DEVNULL
    jobs: list[Job] = []
    async with Launcher(cfg) as launcher:
        if args.lib_namespace_match:
            await simulate_namespace_match(launcher.manager, out)
        await asyncio.sleep(0.2)
        out["before"] = snapshot()
        types_before = type_counts()
        tracer = _start_tracemalloc(args.tracemalloc)

        t_end = planned_end(args)

        async def start(i: int) -> None:
            job = await launcher.start(
                JobSpec(
                    jobid=f"{prefix}-L{i}",
                    argv=unit_argv(args, t_end),
                    stdin=DEVNULL,
                    stdout=out_spec,
                    stderr=out_spec,
                )
            )
            jobs.append(job)

        t0 = time.perf_counter()
        errors = await bounded(workers(args.m, args.concurrency, start), args.timeout, out)
        out["start_seconds"] = rnd(time.perf_counter() - t0)
        out["started"] = len(jobs)
        if errors:
            out["start_errors"] = error_summary(errors)
            log(f"library: {len(errors)} starts failed: {out['start_errors']}")
            errors.clear()  # their tracebacks hold frames: not the launcher's memory
        log(f"library: {len(jobs)} units started in {out['start_seconds']}s")
        await asyncio.sleep(args.settle)
        out["after_start"] = snapshot()
        mgr = launcher.manager
        out["tracked_jobs"] = len(launcher.jobs)
        out["match_rules_per_unit"] = len(getattr(mgr, "_matched", ()))
        out["namespace_match"] = getattr(mgr, "_namespace_match", None)
        if tracer is not None:
            out["tracemalloc_top_per_unit"] = _tracemalloc_top(tracer, args.tracemalloc, len(jobs))

        out["ended_before_measured"] = sum(not j.running for j in jobs)
        t0 = await begin_end(args, t_end)
        if args.end == "kill":
            for job in jobs:
                job.kill()
        codes: dict[str, int] = {}
        try:
            async with asyncio.timeout(args.timeout):
                for rc in await asyncio.gather(*(j.wait() for j in jobs)):
                    codes[str(rc)] = codes.get(str(rc), 0) + 1
        except TimeoutError:
            out["end_timeout"] = (
                f"{sum(j.running for j in jobs)} jobs still running after {args.timeout}s"
            )
        out["end_seconds"] = rnd(time.monotonic() - t0)
        out["returncodes"] = codes
        # systemd leaving the bus (re-exec) counts too: "stayed on the bus" means neither
        out["bus_reconnects"] = getattr(mgr, "reconnects", 0) + getattr(mgr, "reregistrations", 0)
        errs = [j.error for j in jobs if j.error]
        if errs:
            out["job_errors"] = error_summary([RuntimeError(e) for e in errs])
        log(f"library: all {args.end} and waited in {out['end_seconds']}s: {codes}")
        await asyncio.sleep(args.settle)
        jobs.clear()
        out["after_end"] = snapshot()
        out["tracked_jobs_after_end"] = len(launcher.jobs)
        out["objects_held_per_unit_after_end"] = leak_suspects(types_before, out["started"])
    out["after_close"] = snapshot()


async def raw_worker(args: argparse.Namespace, prefix: str, out: dict[str, Any]) -> None:
    client = RawClient(pass_fds=True)
    await client.connect()
    units: list[RawUnit] = []
    try:
        await asyncio.sleep(0.2)
        out["before"] = snapshot()

        t_end = planned_end(args)

        async def start(i: int) -> None:
            argv = unit_argv(args, t_end)
            argv[0] = shutil.which(argv[0]) or argv[0]
            units.append(await client.start(f"{prefix}-R{i}", argv))

        t0 = time.perf_counter()
        errors = await bounded(workers(args.m, args.concurrency, start), args.timeout, out)
        out["start_seconds"] = rnd(time.perf_counter() - t0)
        out["started"] = len(units)
        if errors:
            out["start_errors"] = error_summary(errors)
            errors.clear()
        log(f"raw: {len(units)} units started in {out['start_seconds']}s")
        await asyncio.sleep(args.settle)
        out["after_start"] = snapshot()
        out["match_rules_per_unit"] = len(client.matched)
        out["namespace_match_at"] = client.namespace_match_at

        out["ended_before_measured"] = sum(u.exited.is_set() for u in units)
        t0 = await begin_end(args, t_end)

        async def end(i: int) -> None:
            if args.end == "kill":
                await client.kill(units[i], signal.SIGKILL)
            else:
                await units[i].exited.wait()
                await client.finish(units[i])

        try:
            async with asyncio.timeout(args.timeout):
                end_errors = await workers(len(units), len(units), end)
            if end_errors:
                out["end_errors"] = error_summary(end_errors)
        except TimeoutError:
            out["end_timeout"] = f"{sum(not u.gone.is_set() for u in units)} units left"
        out["end_seconds"] = rnd(time.monotonic() - t0)
        out["systemd_left_bus"] = client.systemd_left_bus
        log(f"raw: all {args.end} and waited in {out['end_seconds']}s")
        units.clear()
        await asyncio.sleep(args.settle)
        out["after_end"] = snapshot()
    finally:
        await client.close()
    out["after_close"] = snapshot()


def _start_tracemalloc(frames: int) -> Any:
    if not frames:
        return None
    import tracemalloc

    tracemalloc.start(1)
    return tracemalloc.take_snapshot()


def _tracemalloc_top(before: Any, k: int, units: int) -> list[dict[str, Any]]:
    """Where the per-unit memory goes, by source line: bytes per unit, top k."""
    import tracemalloc

    diff = tracemalloc.take_snapshot().compare_to(before, "lineno")
    tracemalloc.stop()
    return [
        {"where": str(d.traceback), "bytes_per_unit": round(d.size_diff / max(units, 1))}
        for d in diff[:k]
    ]


async def worker_main(args: argparse.Namespace) -> int:
    cancel_on_sigterm()
    raise_nofile(1 << 20)
    prefix = args.prefix
    res: dict[str, Any] = {"kind": args.worker}
    logs = LogCounter.install()
    rc = 0
    try:
        if args.worker == "library":
            await lib_worker(args, prefix, res)
        else:
            await raw_worker(args, prefix, res)
    except Exception as e:
        log(f"{args.worker}: failed: {e!r}")
        res["failed"] = f"{type(e).__name__}: {e}"
        rc = 1
    finally:
        # a fresh connection: this worker's own units, whatever state they were left in
        res["log_counts"] = logs.counts
        res["leftover_units"] = await cleanup_units(
            [f"shell-*-{prefix}-{'L' if args.worker == 'library' else 'R'}*.service"]
        )
        emit(res)
    return rc


# --- the parent: one worker per side, then the verdict --------------------------------------


def per_unit_kb(res: dict[str, Any]) -> float | None:
    if "after_start" not in res or not res.get("started"):
        return None
    return rnd((res["after_start"]["rss_kb"] - res["before"]["rss_kb"]) / res["started"], 2)


def run_worker(kind: str, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--prefix",
        prefix,
        "--m",
        str(args.m),
        "--concurrency",
        str(args.concurrency),
        "--stdio",
        args.stdio,
        "--settle",
        str(args.settle),
        "--timeout",
        str(args.timeout),
        "--tracemalloc",
        str(args.tracemalloc),
        "--end",
        args.end,
        "--exit-rate",
        str(args.exit_rate),
        *(["--lib-namespace-match"] if args.lib_namespace_match else []),
    ]
    if args.config:
        argv += ["--config", args.config]
    argv += ["--", *args.argv]
    log(f"{kind}: {args.m} units")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, check=False, timeout=args.timeout * 3)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "failed": f"worker timed out after {args.timeout * 3}s"}
    try:
        res: dict[str, Any] = json.loads(p.stdout)
    except ValueError:
        res = {"kind": kind, "failed": f"worker exited {p.returncode} without a result"}
    res["worker_seconds"] = rnd(time.perf_counter() - t0)
    return res


def parent_main(args: argparse.Namespace) -> int:
    prefix = run_prefix()
    pmax, pcur = pids_limit()
    limits: dict[str, Any] = {"pids_max": pmax, "pids_current_before": pcur}
    if pmax is not None and pcur is not None and pmax - pcur < args.m + 16:
        limits["pids_warning"] = (
            f"pids.max={pmax} leaves {pmax - pcur} tasks for {args.m} units: starts beyond that "
            "fail with EAGAIN (podman's default --pids-limit is 2048)"
        )
        log(limits["pids_warning"])
    results: dict[str, dict[str, Any]] = {}
    leftover = 0
    try:
        for kind in args.order.split(","):
            results[kind] = run_worker(kind, args, prefix)
    finally:
        leftover = asyncio.run(cleanup_units())
    lib, raw = results.get("library", {}), results.get("raw", {})
    lib_kb, raw_kb = per_unit_kb(lib), per_unit_kb(raw)
    fd_delta = None
    if "after_end" in lib:
        fd_delta = lib["after_end"]["fds"] - lib["before"]["fds"]
    checks = {
        "all_started": lib.get("started") == args.m and "start_timeout" not in lib,
        "rss_per_unit_ok": lib_kb is not None and lib_kb <= GOAL_KB_PER_UNIT,
        "fds_back_to_baseline": fd_delta is not None and abs(fd_delta) <= GOAL_FD_SLACK,
        "all_gone": "end_timeout" not in lib and lib.get("tracked_jobs_after_end") == 0,
        "systemd_stayed_on_bus": not lib.get("bus_reconnects"),
        "no_leftover_units": leftover == 0 and not lib.get("leftover_units"),
    }
    met = all(checks.values()) and args.tracemalloc == 0 and not args.lib_namespace_match
    emit(
        {
            "benchmark": "scale",
            "goal": f"library RSS per tracked unit <= {GOAL_KB_PER_UNIT:g} KB, fds back to "
            f"baseline (+-{GOAL_FD_SLACK}) after all ended, all {args.m} started, "
            "none left behind",
            "goal_met": met,
            "checks": checks,
            "library_rss_kb_per_unit": lib_kb,
            "raw_rss_kb_per_unit": raw_kb,
            "library_over_raw_kb_per_unit": rnd(lib_kb - raw_kb, 2) if lib_kb and raw_kb else None,
            "library_fd_delta_after_end": fd_delta,
            "library": lib,
            "raw": raw,
            "leftover_units": leftover,
            "limits": limits,
            "params": {
                "m": args.m,
                "concurrency": args.concurrency,
                "argv": args.argv,
                "library_stdio": f"stdin=DEVNULL stdout/stderr={args.stdio.upper()}",
                "order": args.order,
                "settle_s": args.settle,
                "tracemalloc": args.tracemalloc,
                "end": args.end,
                "lib_namespace_match_simulated": args.lib_namespace_match,
                "note": "each side in its own process; rss from psutil after gc.collect()",
            },
            "host": host_facts(),
        }
    )
    return 0 if met else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--m", type=int, default=2000, help="concurrent units (default 2000)")
    p.add_argument(
        "--concurrency", "-c", type=int, default=64, help="starts in flight (default 64)"
    )
    p.add_argument("--config", help="sdexec config for the launcher (default: built-in defaults)")
    p.add_argument(
        "--stdio",
        choices=("devnull", "pipe"),
        default="devnull",
        help="the library jobs' stdout/stderr (pipe: 2 sockets held per job)",
    )
    p.add_argument("--order", default="library,raw", help="which side first (default library,raw)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds before each measurement")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on starting / killing all")
    p.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="K",
        help="also list the K source lines holding the most memory per library unit "
        "(slows the run and inflates RSS: the goal is then not judged)",
    )
    p.add_argument(
        "--end",
        choices=("kill", "exit"),
        default="kill",
        help="kill: Job.kill() / KillUnit SIGKILL every unit; exit: every unit exits 0 by itself "
        "at the same moment (sleep to a common deadline), so the launcher stops M units at once",
    )
    p.add_argument(
        "--exit-rate",
        type=float,
        default=40.0,
        help="with --end exit: starts per second assumed when planning the deadline (40)",
    )
    p.add_argument(
        "--lib-namespace-match",
        action="store_true",
        help="diagnostic: make the launcher watch all units with one match rule from the start "
        "(private members; simulates the fix for the 512 match-rule cap)",
    )
    p.add_argument("--worker", choices=("library", "raw"), help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs="*", default=["sleep", "300"], help="unit command (sleep 300)")
    args = p.parse_args(argv)
    if not args.argv:
        args.argv = ["sleep", "300"]
    return args


if __name__ == "__main__":
    a = parse_args()
    try:
        if a.worker:
            sys.exit(asyncio.run(worker_main(a)))
        sys.exit(parent_main(a))
    except (KeyboardInterrupt, asyncio.CancelledError):  # units were disposed of in finally
        log("interrupted")
        sys.exit(130)
