"""Units per second through the launcher vs a raw dbus-fast client, on the same systemd.

Each round runs N short units (``/bin/true``) at concurrency C, through ``Launcher.start`` +
``Job.wait`` or through :class:`bench.common.RawClient`. Rounds alternate ABBA (library, raw,
raw, library, ...) so drift of the machine falls on both sides alike. Goal: library/raw >= 0.95.

    python bench/throughput.py --n 500 --concurrency 32 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``sdexec`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    CpuMeter,
    LogCounter,
    RawClient,
    cancel_on_sigterm,
    cleanup_units,
    emit,
    error_summary,
    host_facts,
    log,
    median,
    raise_nofile,
    rnd,
    run_prefix,
    workers,
)
from sdexec.config.table import ExecConfig, load_config
from sdexec.exec.channel import DEVNULL, PIPE
from sdexec.exec.launcher import JobSpec, Launcher

GOAL = 0.95


async def library_round(
    cfg: ExecConfig, tag: str, n: int, c: int, argv: list[str], stdout: int
) -> dict[str, Any]:
    async with Launcher(cfg) as launcher:
        bad: list[str] = []

        async def one(i: int) -> None:
            job = await launcher.start(
                JobSpec(jobid=f"{tag}-{i}", argv=argv, stdin=DEVNULL, stdout=stdout, stderr=DEVNULL)
            )
            if job.stdout is not None:
                await job.stdout.read()
            rc = await job.wait()
            if rc != 0:
                bad.append(f"{job.unit}: returncode {rc} ({job.error})")

        meter = CpuMeter()
        t0 = time.perf_counter()
        errors = await workers(n, c, one)
        dt = time.perf_counter() - t0
        cpu = meter.per_unit_ms(n)
        left = len(launcher.jobs)
    return _round("library", n, dt, errors, bad, cpu, {"jobs_still_tracked": left})


async def raw_round(
    tag: str, n: int, c: int, argv: list[str], pass_fds: bool, getall: bool = False
) -> dict[str, Any]:
    client = RawClient(pass_fds=pass_fds, getall=getall)
    await client.connect()
    try:
        bad: list[str] = []

        async def one(i: int) -> None:
            rc = await client.run(f"{tag}-{i}", argv)
            if rc != 0:
                bad.append(f"{tag}-{i}: returncode {rc}")

        meter = CpuMeter()
        t0 = time.perf_counter()
        errors = await workers(n, c, one)
        dt = time.perf_counter() - t0
        cpu = meter.per_unit_ms(n)
        extra = {
            "namespace_match_at": client.namespace_match_at,
            "units_still_tracked": len(client.units),
        }
    finally:
        await client.close()
    return _round("raw", n, dt, errors, bad, cpu, extra)


def _round(
    kind: str,
    n: int,
    dt: float,
    errors: list[BaseException],
    bad: list[str],
    cpu: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    ok = n - len(errors) - len(bad)
    out: dict[str, Any] = {
        "kind": kind,
        "units": n,
        "ok": ok,
        "seconds": rnd(dt),
        "units_per_s": rnd(n / dt, 1),
        **cpu,
        **extra,
    }
    if errors:
        out["errors"] = error_summary(errors)
    if bad:
        out["bad_exits"] = bad[:5]
    log(f"{kind:8s} {n} units in {dt:.2f}s = {n / dt:.1f}/s  ({ok} ok)")
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    units = sum(r["units"] for r in rounds)
    secs = sum(r["seconds"] for r in rounds)
    return {
        "units": units,
        "ok": sum(r["ok"] for r in rounds),
        "seconds": rnd(secs),
        "units_per_s": rnd(units / secs, 1) if secs else None,
        "median_round_units_per_s": rnd(median([r["units_per_s"] for r in rounds]), 1),
        "self_cpu_ms_per_unit": rnd(median([r["self_cpu_ms"] for r in rounds])),
        "systemd_cpu_ms_per_unit": rnd(median([r["systemd_cpu_ms"] for r in rounds])),
        "dbus_cpu_ms_per_unit": rnd(median([r["dbus_cpu_ms"] for r in rounds])),
    }


async def main(args: argparse.Namespace) -> int:
    cancel_on_sigterm()
    logs = LogCounter.install()
    cfg = load_config(args.config) if args.config else ExecConfig()
    argv = args.argv or ["/bin/true"]
    stdout = PIPE if args.stdout == "pipe" else DEVNULL
    raise_nofile(4 * args.concurrency + 1024)
    prefix = run_prefix()
    rounds: list[dict[str, Any]] = []
    leftover = 0
    profiler = cProfile.Profile() if args.profile else None
    try:
        if args.warmup:
            log(f"warm-up: {args.warmup} units each")
            await library_round(cfg, f"{prefix}-wl", args.warmup, args.concurrency, argv, stdout)
            await raw_round(
                f"{prefix}-wr", args.warmup, args.concurrency, argv, args.raw_fds, args.raw_getall
            )
        for r in range(args.rounds):
            order = ("library", "raw") if r % 2 == 0 else ("raw", "library")
            for kind in order:
                tag = f"{prefix}-{r}{kind[0]}"
                if kind == "library":
                    if profiler is not None:
                        profiler.enable()
                    res = await library_round(cfg, tag, args.n, args.concurrency, argv, stdout)
                    if profiler is not None:
                        profiler.disable()
                else:
                    res = await raw_round(
                        tag, args.n, args.concurrency, argv, args.raw_fds, args.raw_getall
                    )
                res["round"] = r
                rounds.append(res)
    finally:
        leftover = await cleanup_units()
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        log(
            "library rounds, costliest functions (the ratio is not valid when profiling):\n"
            + out.getvalue()
        )
    lib = summarize([r for r in rounds if r["kind"] == "library"])
    raw = summarize([r for r in rounds if r["kind"] == "raw"])
    ratio = lib["units_per_s"] / raw["units_per_s"] if raw["units_per_s"] else float("nan")
    all_ok = lib["ok"] == lib["units"] and raw["ok"] == raw["units"]
    met = ratio >= GOAL and all_ok and leftover == 0 and profiler is None
    emit(
        {
            "benchmark": "throughput",
            "goal": f"library units/s >= {GOAL} x raw dbus-fast client units/s, every unit exit 0, "
            "no unit left behind",
            "goal_met": met,
            "ratio": rnd(ratio),
            "ratio_of_median_rounds": rnd(
                lib["median_round_units_per_s"] / raw["median_round_units_per_s"]
            ),
            "library": lib,
            "raw": raw,
            "leftover_units": leftover,
            "log_counts": logs.counts,
            "params": {
                "n_per_round": args.n,
                "concurrency": args.concurrency,
                "rounds_each": args.rounds,
                "order": "ABBA (library first in even rounds)",
                "warmup_each": args.warmup,
                "argv": argv,
                "library_stdio": f"stdin=DEVNULL stdout={args.stdout.upper()} stderr=DEVNULL",
                "raw_passes_devnull_fds": args.raw_fds,
                "raw_reads_back_properties": args.raw_getall,
                "raw_calls_per_unit": "AddMatch, StartTransientUnit, StopUnit (or "
                "ResetFailedUnit), RemoveMatch; exit and inactive seen via PropertiesChanged",
                "config": args.config,
                "profiled": bool(args.profile),
            },
            "rounds": rounds,
            "host": host_facts(),
        }
    )
    return 0 if met else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=500, help="units per round (default 500)")
    p.add_argument("--concurrency", "-c", type=int, default=32, help="units in flight (default 32)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of each client (default 4)")
    p.add_argument(
        "--warmup", type=int, default=50, help="unmeasured units of each first (default 50)"
    )
    p.add_argument("--config", help="sdexec config for the launcher (default: built-in defaults)")
    p.add_argument(
        "--stdout",
        choices=("devnull", "pipe"),
        default="devnull",
        help="the library job's stdout (pipe: relayed and read to EOF; default devnull)",
    )
    p.add_argument(
        "--raw-fds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the raw client hands systemd three /dev/null fds, as the launcher does (default on)",
    )
    p.add_argument(
        "--raw-getall",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the raw client also reads every property back once started (GetAll), as the "
        "launcher does: shows how much of the gap that call is (default off)",
    )
    p.add_argument(
        "--profile",
        type=int,
        metavar="K",
        default=0,
        help="profile the library rounds and log the K costliest functions to stderr",
    )
    p.add_argument("argv", nargs="*", help="the unit's command (default /bin/true)")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    try:
        sys.exit(asyncio.run(main(a)))
    except (KeyboardInterrupt, asyncio.CancelledError):  # units were disposed of in finally
        log("interrupted")
        sys.exit(130)
