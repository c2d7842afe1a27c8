"""Units per second through the launcher vs a raw dbus-fast client, on the same systemd.

Each round runs N short units (``/bin/true``) at concurrency C, through ``Launcher.start`` +
``Job.wait`` or through :class:`bench.common.RawClient`. The kinds of round take turns, the
order rotating every round, so drift of the machine falls on all alike. Goal: library/raw >=
0.95.

``--connection bus,direct``: library rounds on each connection to systemd (through dbus-daemon,
or systemd's private socket), same run. ``--server``: also through the node's ``sdexec
serve``: raw clients on its socket (C in flight from this process: the server's own
throughput, goal >= 0.95 x raw), C ``sdexec run`` processes in flight, and C ``systemd-run
--pipe --wait`` processes in flight (the same process-per-job model; bench/README.md says why
that is the processes' baseline).

    python bench/throughput.py --n 500 --concurrency 32 --rounds 4
    python bench/throughput.py --connection bus,direct --server
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``sdexec`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MINIMAL_CLIENT,
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
    server_run,
    server_socket,
    workers,
)
from sdexec.config.table import ExecConfig, load_config
from sdexec.exec.channel import DEVNULL, PIPE
from sdexec.exec.launcher import JobSpec, Launcher

GOAL = 0.95


async def library_round(
    cfg: ExecConfig,
    tag: str,
    n: int,
    c: int,
    argv: list[str],
    stdout: int,
    connection: str = "bus",
) -> dict[str, Any]:
    os.environ["SDEXEC_SYSTEMD_CONNECTION"] = connection  # read by the bus layer
    async with Launcher(cfg) as launcher:
        direct = launcher.manager.direct
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
    kind = "library" if connection == "bus" else f"library_{connection}"
    extra = {"jobs_still_tracked": left, "direct": direct}
    return _round(kind, n, dt, errors, bad, cpu, extra)


async def server_raw_round(tag: str, n: int, c: int, argv: list[str]) -> dict[str, Any]:
    """C raw clients of the node's server in flight from this process (no program starts)."""
    bad: list[str] = []

    async def one(i: int) -> None:
        rc = await server_run(f"{tag}-{i}", argv)
        if rc != 0:
            bad.append(f"{tag}-{i}: exit {rc}")

    meter = CpuMeter()
    t0 = time.perf_counter()
    errors = await workers(n, c, one)
    dt = time.perf_counter() - t0
    return _round("server_raw", n, dt, errors, bad, meter.per_unit_ms(n), {})


async def process_round(
    kind: str, tag: str, n: int, c: int, make: Any, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """C processes in flight, one per unit (``make(jobid)`` is its argv)."""
    bad: list[str] = []

    async def one(i: int) -> None:
        p = await asyncio.create_subprocess_exec(
            *make(f"{tag}-{i}"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _out, err = await p.communicate()
        if p.returncode != 0:
            bad.append(f"{tag}-{i}: exit {p.returncode}: {err.decode(errors='replace')[-200:]}")

    meter = CpuMeter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    errors = await workers(n, c, one)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    # the processes' own CPU (Python's start-up for sdexec run, the bus handshake for
    # systemd-run): on a 2-CPU node it bounds the units/s of a process per unit
    extra = {"processes_cpu_ms": rnd(children * 1000 / max(n, 1))}
    return _round(kind, n, dt, errors, bad, meter.per_unit_ms(n), extra)


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


def server_cpu_s() -> float | None:
    """CPU seconds of the node's ``sdexec serve`` (its unit's main process), if it runs."""
    import subprocess

    out = subprocess.run(
        ["systemctl", "show", "-P", "MainPID", "sdexec.service"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    if not out.isdigit() or out == "0":
        return None
    try:
        with open(f"/proc/{out}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        **{
            f"{key}_per_unit": rnd(median([r[key] for r in rounds]))
            for key in ("processes_cpu_ms", "server_cpu_ms")
            if all(r.get(key) is not None for r in rounds)
        },
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
    connections = [c for c in args.connection.split(",") if c]
    kinds = ["raw", *(f"library:{c}" for c in connections)]
    if args.server:
        kinds += ["server_raw", "sdexec_run", "python_client", "systemd_run"]
    sdexec = shutil.which("sdexec") or "sdexec"
    # the unit's command after `--`; the env the sdexec processes hand the server is small
    proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    async def one_round(kind: str, tag: str, n: int) -> dict[str, Any]:
        before = server_cpu_s() if kind in ("server_raw", "sdexec_run") else None
        res = await one_round_of(kind, tag, n)
        after = server_cpu_s() if before is not None else None
        if before is not None and after is not None:
            res["server_cpu_ms"] = rnd((after - before) * 1000 / n)
        return res

    async def one_round_of(kind: str, tag: str, n: int) -> dict[str, Any]:
        if kind == "raw":
            return await raw_round(tag, n, args.concurrency, argv, args.raw_fds, args.raw_getall)
        if kind.startswith("library:"):
            return await library_round(
                cfg, tag, n, args.concurrency, argv, stdout, kind.split(":", 1)[1]
            )
        if kind == "server_raw":
            return await server_raw_round(tag, n, args.concurrency, argv)
        if kind == "sdexec_run":
            return await process_round(
                kind, tag, n, args.concurrency,
                lambda jobid: [sdexec, "run", "--job", jobid, "--", *argv], proc_env,
            )  # fmt: skip
        if kind == "python_client":
            return await process_round(
                kind, tag, n, args.concurrency,
                lambda jobid: [sys.executable, "-c", MINIMAL_CLIENT, server_socket(), jobid, *argv],
                proc_env,
            )  # fmt: skip
        return await process_round(
            kind, tag, n, args.concurrency,
            lambda _jobid: ["systemd-run", "-q", "--pipe", "--wait", *argv], proc_env,
        )  # fmt: skip

    try:
        if args.warmup:
            log(f"warm-up: {args.warmup} units each of {', '.join(kinds)}")
            for kind in kinds:
                await one_round(kind, f"{prefix}-w{kinds.index(kind)}", args.warmup)
        for r in range(args.rounds):
            shift = r % len(kinds)  # rotate who goes first
            for kind in kinds[shift:] + kinds[:shift]:
                tag = f"{prefix}-{r}k{kinds.index(kind)}"
                profiling = profiler is not None and kind.startswith("library")
                if profiling:
                    assert profiler is not None
                    profiler.enable()
                res = await one_round(kind, tag, args.n)
                if profiling:
                    assert profiler is not None
                    profiler.disable()
                res["round"] = r
                rounds.append(res)
    finally:
        leftover = await cleanup_units()
    if profiler is not None:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats("sdexec|dbus_fast", args.profile)
        log(
            "library rounds, costliest functions (the ratio is not valid when profiling):\n"
            + out.getvalue()
        )
    by_kind = {
        kind: summarize([r for r in rounds if r["kind"] == kind])
        for kind in dict.fromkeys(r["kind"] for r in rounds)
    }
    raw = by_kind["raw"]
    first = "library" if connections[0] == "bus" else f"library_{connections[0]}"
    lib = by_kind[first]

    def ratio_of(a: str, b: str) -> float | None:
        x, y = by_kind.get(a), by_kind.get(b)
        if not x or not y or not y["units_per_s"]:
            return None
        return rnd(x["units_per_s"] / y["units_per_s"])

    ratio = lib["units_per_s"] / raw["units_per_s"] if raw["units_per_s"] else float("nan")
    all_ok = all(k["ok"] == k["units"] for k in by_kind.values())
    clean = all_ok and leftover == 0 and profiler is None
    goals: dict[str, dict[str, Any]] = {
        "library": {
            "goal": f"{first} units/s >= {GOAL} x raw dbus-fast client units/s",
            "ratio": rnd(ratio),
            "goal_met": ratio >= GOAL and clean,
        }
    }
    if "library_direct" in by_kind and "library" in by_kind:
        goals["direct_vs_bus"] = {
            "goal": "report: library on the direct connection vs through dbus-daemon",
            "ratio": ratio_of("library_direct", "library"),
        }
    if args.server:
        server_ratio = ratio_of("server_raw", "raw")
        goals["server"] = {
            "goal": f"raw clients on the server's socket >= {GOAL} x raw dbus-fast units/s",
            "ratio": server_ratio,
            "goal_met": server_ratio is not None and server_ratio >= GOAL and clean,
        }
        goals["sdexec_run_processes"] = {
            "goal": f"{args.concurrency} `sdexec run` processes in flight >= {GOAL} x "
            f"{args.concurrency} `systemd-run --pipe --wait` processes (units/s)",
            "ratio": ratio_of("sdexec_run", "systemd_run"),
            "goal_met": (ratio_of("sdexec_run", "systemd_run") or 0) >= GOAL and clean,
            "vs_server_raw": ratio_of("sdexec_run", "server_raw"),
            # against the least a Python client program can be (bench/common.py): near 1,
            # what is left of the gap is Python's start-up, not sdexec's client
            "vs_minimal_python_client": ratio_of("sdexec_run", "python_client"),
            "minimal_python_client_vs_systemd_run": ratio_of("python_client", "systemd_run"),
        }
    met = all(g.get("goal_met", True) for g in goals.values())
    emit(
        {
            "benchmark": "throughput",
            "goal": f"every ratio in goals >= {GOAL}, every unit exit 0, no unit left behind",
            "goal_met": met,
            "ratio": rnd(ratio),
            "goals": goals,
            "ratio_of_median_rounds": rnd(
                lib["median_round_units_per_s"] / raw["median_round_units_per_s"]
            ),
            "library": lib,
            "raw": raw,
            "by_kind": by_kind,
            "leftover_units": leftover,
            "log_counts": logs.counts,
            "params": {
                "n_per_round": args.n,
                "concurrency": args.concurrency,
                "rounds_each": args.rounds,
                "order": "every kind once a round, the order rotating each round",
                "kinds": kinds,
                "warmup_each": args.warmup,
                "argv": argv,
                "library_stdio": f"stdin=DEVNULL stdout={args.stdout.upper()} stderr=DEVNULL",
                "raw_passes_devnull_fds": args.raw_fds,
                "raw_reads_back_properties": args.raw_getall,
                "raw_calls_per_unit": "AddMatch, StartTransientUnit, StopUnit (or "
                "ResetFailedUnit), RemoveMatch; exit and inactive seen via PropertiesChanged",
                "server_raw": "bench.common.server_run: connect, request + 3 /dev/null fds, "
                "read to EOF",
                "processes_env": proc_env,
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
    p.add_argument(
        "--connection",
        default="bus",
        help="library rounds on each of these connections to systemd, comma-separated: bus, "
        "direct, auto (default bus; the first is the one the library goal judges)",
    )
    p.add_argument(
        "--server",
        action="store_true",
        help="also through the node's sdexec server: raw socket clients, `sdexec run` "
        "processes and `systemd-run` processes, C in flight each",
    )
    p.add_argument("argv", nargs="*", help="the unit's command (default /bin/true)")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    if a.server and not os.path.exists(server_socket()):
        log(f"--server: no sdexec server at {server_socket()}")
        sys.exit(2)
    try:
        sys.exit(asyncio.run(main(a)))
    except (KeyboardInterrupt, asyncio.CancelledError):  # units were disposed of in finally
        log("interrupted")
        sys.exit(130)
