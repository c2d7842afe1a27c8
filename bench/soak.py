"""Soak: one Launcher holds M long units while short units stream through it for minutes.

throughput.py and scale.py measure bursts; leaks, lost statuses and limits (dbus-daemon's
match-rule cap, systemd's pending jobs, fds) only show once one launcher lives long at scale.
Phases, in one process and on one connection:

- warmup: the short stream alone (``--warmup`` s): the baseline start latency;
- ramp: M ``sleep infinity`` units started ``--long-concurrency`` at a time, stream on;
- soak: ``--duration`` s with the M units held, stream on;
- drain: the stream stops, short jobs in flight finish;
- teardown: the M units are killed and waited for, then fds, RSS and systemd are compared
  with their baselines and ``systemctl list-units --all`` must show no ``bench-soak`` unit.

The stream starts ``--short`` (``/bin/true``) at ``--rate`` per second, at most
``--concurrency`` in flight (a job holds its slot from start to ``wait()``). Latency is
StartTransientUnit (as the launcher calls it) to systemd's JobRemoved for that unit. A sample
every ``--interval`` s goes to stderr and into the JSON series. Every ``bench-soak`` unit is
killed and reset on error, SIGTERM or Ctrl-C.

    python bench/soak.py --duration 600 --m 2000 --png soak.png
    python bench/soak.py --plot-from soak.json --png soak.png   # plot a saved run elsewhere
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import hashlib
import importlib
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``sdexec`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    cancel_on_sigterm,
    cleanup_units,
    emit,
    host_facts,
    log,
    raise_nofile,
    rnd,
    workers,
)
from sdexec.config.table import ExecConfig, load_config
from sdexec.exec.channel import DEVNULL
from sdexec.exec.job import BaseJob
from sdexec.exec.launcher import Job, JobSpec, Launcher
from sdexec.systemd.bus import MANAGER_IFACE, MANAGER_PATH, Manager
from sdexec.systemd.unitname import unit_name

SOAK_PATTERNS = ("shell-*-bench-soak-*.service", "imp-shell-*-bench-soak-*.service")
PHASES = ("warmup", "ramp", "soak", "drain", "teardown")
MAX_ERROR_KINDS = 20


# --- statistics ---------------------------------------------------------------------------


def pct(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None when there is nothing to rank."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def ms(x: float | None) -> float | None:
    return None if x is None else rnd(x * 1000, 2)


class Histogram:
    """Whole-run percentiles in constant memory: the benchmark must not grow like a leak.

    Log-spaced bins 2% wide from 10 us to 1000 s: a percentile is good to 2%.
    """

    LO, RATIO, BINS = 1e-5, 1.02, 940

    def __init__(self) -> None:
        self.counts = [0] * (self.BINS + 1)
        self.n = 0
        self.max = 0.0
        self._edges = [self.LO * self.RATIO**i for i in range(self.BINS)]

    def add(self, x: float) -> None:
        self.counts[bisect.bisect_left(self._edges, x)] += 1
        self.n += 1
        self.max = max(self.max, x)

    def extend(self, xs: Sequence[float]) -> None:
        for x in xs:
            self.add(x)

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(self._edges[min(i, self.BINS - 1)], self.max)
        return self.max

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "p50_ms": ms(self.quantile(0.5)),
            "p99_ms": ms(self.quantile(0.99)),
            "max_ms": ms(self.max) if self.n else None,
        }


def slope_per_min(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value), per minute: growth with load held constant."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / den * 60


# --- the instrumented connection ----------------------------------------------------------


class TimedManager(Manager):
    """The launcher's own connection, noting when each StartTransientUnit is called.

    The time includes the wait for one of the call slots: latency as the launcher sees it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, float] = {}

    async def call(self, member: str, *args: Any, **kwargs: Any) -> list[Any]:
        # (*args, **kwargs): Manager.call's options change; only the unit name matters here
        if member == "StartTransientUnit":
            body = args[1] if len(args) > 1 else kwargs.get("body", ())
            if body:
                self.sent[str(body[0])] = time.perf_counter()
        return await super().call(member, *args, **kwargs)


# --- process and systemd facts ------------------------------------------------------------


class Probe:
    """RSS/fds of this process, systemd's and dbus-daemon's RSS: cheap enough every sample."""

    def __init__(self) -> None:
        import psutil

        self._ps = psutil
        self.me = psutil.Process()
        self.pid1 = psutil.Process(1)
        self.bus: Any = None
        for p in psutil.process_iter(["name"]):
            if p.info["name"] == "dbus-daemon":
                self.bus = p
                break
        self._last_cpu = (
            time.monotonic(),
            self._cpu(self.me),
            self._cpu(self.pid1),
            self._cpu(self.bus),
        )

    def rss_mb(self, p: Any) -> float | None:
        if p is None:
            return None
        try:
            return rnd(p.memory_info().rss / 2**20, 2)
        except self._ps.Error:
            return None

    def _cpu(self, p: Any) -> float:
        if p is None:
            return float("nan")
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except self._ps.Error:
            return float("nan")

    def cpu_since_last(self) -> dict[str, float | None]:
        """CPU % of us, systemd and dbus-daemon over the window: who was busy when latency rose."""
        now = (time.monotonic(), self._cpu(self.me), self._cpu(self.pid1), self._cpu(self.bus))
        last, self._last_cpu = self._last_cpu, now
        wall = now[0] - last[0]
        if wall < 0.5:  # a phase change right after a sample: too short to mean anything
            return {"self": None, "systemd": None, "dbus": None}
        pcts = [(b - a) * 100 / wall for a, b in zip(last[1:], now[1:], strict=True)]
        return {
            k: (None if math.isnan(v) else rnd(v, 1))
            for k, v in zip(("self", "systemd", "dbus"), pcts, strict=True)
        }

    def me_now(self) -> dict[str, Any]:
        return {
            "rss_mb": self.rss_mb(self.me),
            "fds": self.me.num_fds(),
            "py_blocks": sys.getallocatedblocks(),
            "tasks": len(asyncio.all_tasks()),
        }


async def systemd_counts(mgr: Manager) -> dict[str, Any]:
    """Units loaded, jobs pending, units failed: systemd's side of a leak, without ListUnits."""
    try:
        async with asyncio.timeout(5):
            props = await mgr.get_all(MANAGER_PATH, MANAGER_IFACE)
    except Exception as e:  # a sample must never stop the run
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    return {
        "units": props.get("NNames"),
        "jobs": props.get("NJobs"),
        "failed": props.get("NFailedUnits"),
    }


PYMALLOC_KEYS = {
    "# arenas allocated current": "arenas_current",
    "# arenas highwater mark": "arenas_highwater",
    "# bytes in allocated blocks": "bytes_in_use",
    "# bytes in available blocks": "bytes_free_in_pools",
    "unused pools": "bytes_in_unused_pools",
    "Total": "total_bytes",
}


def pymalloc_stats() -> dict[str, int]:
    """pymalloc's arenas: tells memory held by live objects from freed-but-kept memory.

    An arena is returned to the OS only when every object in it is gone, so RSS that stays
    up after the units are gone while ``bytes_in_use`` is back is fragmentation, not a leak.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    out: dict[str, int] = {}
    for line in text.splitlines():
        head, sep, value = line.rpartition("=")
        if not sep:
            continue
        for key, name in PYMALLOC_KEYS.items():
            if key in head and name not in out:
                with contextlib.suppress(ValueError):
                    out[name] = int(value.strip().replace(",", ""))
    return out


def sources_digest() -> str:
    """Which launcher was measured: sdexec's sources change under the benchmark."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent.parent / "sdexec"
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def malloc_trim_rss(probe: Probe) -> float | None:
    """RSS once glibc gave back its free heap: what is left is held, not merely cached."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return probe.rss_mb(probe.me)


def units_loaded(patterns: Sequence[str]) -> list[str]:
    """What ``systemctl list-units --all`` still shows of ours (asked once, at the end)."""
    try:
        out = subprocess.run(
            ["systemctl", "list-units", "--all", "--no-legend", "--plain", *patterns],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"(systemctl failed: {e})"]
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


# --- the soak -----------------------------------------------------------------------------


@dataclass(slots=True)
class Status:
    """The exit statuses one short job reported through its update hook."""

    reports: int = 0
    last: int | None = None


class Window:
    """What happened since the last sample."""

    def __init__(self) -> None:
        self.lat_short: array[float] = array("d")
        self.lat_long: array[float] = array("d")
        self.launched = 0
        self.started = 0
        self.ok = 0
        self.errors = 0
        self.long_started = 0


class Soak:
    """The run's state: the launcher, the stream, the long jobs, and what was measured."""

    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        self.args = args
        self.prefix = prefix
        self.short_argv = shlex.split(args.short)
        self.long_argv = shlex.split(args.long)
        self.t0 = time.perf_counter()
        self.phase = "setup"
        self.phase_t: dict[str, float] = {}
        self.manager = TimedManager()
        self.launcher: Launcher | None = None
        self.probe = Probe()
        self.win = Window()
        # the series goes to a file, not the heap: the benchmark must not grow like a leak
        self._series = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in samples())
        self.n_samples = 0
        self.hist: dict[str, dict[str, Histogram]] = {
            p: {"latency": Histogram(), "start_call": Histogram(), "run": Histogram()}
            for p in PHASES
        }
        self.long_hist = Histogram()
        self.counts = dict.fromkeys(
            (
                "launched",
                "started",
                "exit0_once",
                "start_errors",
                "bad_status",
                "statuses_lost",
                "duplicate_status",
                "unreported_status",
                "updates_after_wait",
                "missed_ticks",
                "start_job_not_done",
            ),
            0,
        )
        self.errors: dict[str, dict[str, Any]] = {}
        self.inflight: dict[str, Status] = {}
        self.longs: list[Job] = []
        self.long_errors = 0
        self.long_started = 0
        self.stuck: list[Job] = []
        self.stop = asyncio.Event()
        self.slots = asyncio.Semaphore(args.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.short_prefix = f"shell-0-{prefix}-s"
        self.long_prefix = f"shell-0-{prefix}-l"
        self.peak: dict[str, float] = {}
        self.last_t = 0.0
        self.next_tick = time.monotonic() + args.interval

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def snapshot(self) -> dict[str, Any]:
        return self.probe.me_now()

    def samples(self) -> list[dict[str, Any]]:
        """The whole series, read back once at the end (the file is closed)."""
        with self._series as f:
            f.seek(0)
            return [json.loads(line) for line in f]

    # --- bookkeeping ---

    def note_error(self, where: str, e: BaseException | str) -> None:
        self.win.errors += 1
        key = f"{where}: {e if isinstance(e, str) else f'{type(e).__name__}: {e}'}"[:300]
        rec = self.errors.get(key)
        if rec is None:
            if len(self.errors) >= MAX_ERROR_KINDS:
                key = "(other kinds)"
                rec = self.errors.setdefault(key, {"count": 0, "first_t": rnd(self.now(), 1)})
            else:
                rec = self.errors[key] = {
                    "count": 0,
                    "first_t": rnd(self.now(), 1),
                    "phase": self.phase,
                }
                log(f"error: {key}")
        rec["count"] += 1

    def on_job_removed(self, _job: str, unit: str, result: str) -> None:
        t = self.manager.sent.pop(unit, None)
        if t is None:
            return
        dt = time.perf_counter() - t
        if unit.startswith(self.short_prefix):
            self.win.lat_short.append(dt)
            if result != "done":  # /bin/true may fail a Type=exec start job: noted, not an error
                self.counts["start_job_not_done"] += 1
        elif unit.startswith(self.long_prefix):
            self.win.lat_long.append(dt)

    def on_update(self, job: BaseJob) -> None:
        rec = self.inflight.get(job.jobid)
        if rec is None:
            if job.wait_status is not None:
                self.counts["updates_after_wait"] += 1
            return
        if job.wait_status is not None and job.wait_status != rec.last:
            rec.reports += 1
            rec.last = job.wait_status

    # --- the short stream ---

    async def stream(self) -> None:
        """Open loop at ``--rate``, at most ``--concurrency`` in flight: missed ticks are lost."""
        period = 1.0 / self.args.rate
        due = time.monotonic()
        i = 0
        while not self.stop.is_set():
            await self.slots.acquire()
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due >= period:  # slots full or loop busy: skip, never burst to catch up
                missed = int((now - due) / period)
                self.counts["missed_ticks"] += missed
                due += missed * period
            if self.stop.is_set():
                self.slots.release()
                break
            task = asyncio.create_task(self.run_short(i))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            i += 1
            due += period

    async def run_short(self, i: int) -> None:
        assert self.launcher is not None
        jobid = f"{self.prefix}-s{i}"
        phase = self.phase
        hist = self.hist.get(phase, self.hist["warmup"])
        rec = self.inflight[jobid] = Status()
        self.counts["launched"] += 1
        self.win.launched += 1
        t0 = time.perf_counter()
        try:
            try:
                job = await self.launcher.start(
                    JobSpec(
                        jobid=jobid,
                        argv=self.short_argv,
                        stdin=DEVNULL,
                        stdout=DEVNULL,
                        stderr=DEVNULL,
                    ),
                    on_update=self.on_update,
                )
            except Exception as e:
                self.counts["start_errors"] += 1
                self.note_error("short start", e)
                return
            hist["start_call"].add(time.perf_counter() - t0)
            self.counts["started"] += 1
            self.win.started += 1
            try:
                async with asyncio.timeout(self.args.job_timeout):
                    rc = await job.wait()
            except TimeoutError:
                self.counts["statuses_lost"] += 1
                self.note_error("short wait", f"no end within {self.args.job_timeout:g}s")
                self.stuck.append(job)
                job.kill()
                return
            hist["run"].add(time.perf_counter() - t0)
            if rc is None:
                self.counts["statuses_lost"] += 1
                self.note_error("short status", f"lost: {job.error}")
            elif rc != 0:
                self.counts["bad_status"] += 1
                self.note_error("short status", f"returncode {rc} ({job.error})")
            elif rec.reports > 1:
                self.counts["duplicate_status"] += 1
                self.note_error("short status", f"{rec.reports} statuses reported")
            elif rec.reports == 0:
                self.counts["unreported_status"] += 1
                self.note_error("short status", "exit 0 never published to on_update")
            else:
                self.counts["exit0_once"] += 1
                self.win.ok += 1
        finally:
            self.inflight.pop(jobid, None)
            self.manager.sent.pop(unit_name(jobid), None)
            self.slots.release()

    # --- the long units ---

    async def start_long(self, i: int) -> None:
        assert self.launcher is not None
        jobid = f"{self.prefix}-l{i}"
        try:
            job = await self.launcher.start(
                JobSpec(
                    jobid=jobid,
                    argv=self.long_argv,
                    stdin=DEVNULL,
                    stdout=DEVNULL,
                    stderr=DEVNULL,
                )
            )
        except Exception as e:
            self.long_errors += 1
            self.note_error("long start", e)
            return
        finally:
            self.manager.sent.pop(unit_name(jobid), None)
        self.longs.append(job)
        self.long_started += 1
        self.win.long_started += 1

    # --- sampling ---

    async def sample(self) -> dict[str, Any]:
        """Close the current window: its rates and percentiles, and the process's state now."""
        assert self.launcher is not None
        mgr = self.launcher.manager
        sd = await systemd_counts(mgr)
        w, self.win = self.win, Window()
        t = self.now()
        dt, self.last_t = t - self.last_t, t
        self.next_tick = time.monotonic() + self.args.interval
        cpu = self.probe.cpu_since_last()
        hist = self.hist.get(self.phase)
        if hist is not None:
            hist["latency"].extend(w.lat_short)
        self.long_hist.extend(w.lat_long)
        me = self.snapshot()
        s: dict[str, Any] = {
            "t": rnd(t, 2),
            "phase": self.phase,
            "dt": rnd(dt, 2),
            "starts_per_s": rnd(w.started / dt, 2) if dt >= 0.5 else None,
            "launched": w.launched,
            "exit0": w.ok,
            "lat_n": len(w.lat_short),
            "lat_p50_ms": ms(pct(w.lat_short, 0.5)),
            "lat_p99_ms": ms(pct(w.lat_short, 0.99)),
            "errors": w.errors,
            **me,
            "tracked_jobs": len(self.launcher.jobs),
            "long_units": len(self.longs),
            "short_in_flight": len(self.inflight),
            "match_rules": len(getattr(mgr, "_matched", ())),
            "namespace_match": getattr(mgr, "_namespace_match", None),
            "pending_jobs": len(getattr(mgr, "_pending_jobs", ())),
            "systemd": sd,
            "systemd_rss_mb": self.probe.rss_mb(self.probe.pid1),
            "dbus_rss_mb": self.probe.rss_mb(self.probe.bus),
            "cpu_pct": cpu,
            "loadavg1": rnd(os.getloadavg()[0], 2),
        }
        if w.lat_long or w.long_started:
            s["long_started"] = w.long_started
            s["long_lat_p50_ms"] = ms(pct(w.lat_long, 0.5))
            s["long_lat_p99_ms"] = ms(pct(w.lat_long, 0.99))
        for k in ("rss_mb", "fds", "tracked_jobs", "systemd_rss_mb", "py_blocks", "tasks"):
            if s[k] is not None:
                self.peak[k] = max(self.peak.get(k, s[k]), s[k])
        for k in ("units", "jobs", "failed"):
            if isinstance(sd.get(k), int):
                self.peak[f"systemd_{k}"] = max(self.peak.get(f"systemd_{k}", 0), sd[k])
        self.peak["match_rules"] = max(self.peak.get("match_rules", 0), s["match_rules"])
        self._series.write(json.dumps(s) + "\n")
        self.n_samples += 1
        log(
            f"{s['phase']:8} t={t:6.0f}s {s['starts_per_s'] or 0:5.1f} starts/s "
            f"lat p50 {s['lat_p50_ms']} p99 {s['lat_p99_ms']} ms | rss {s['rss_mb']} MB "
            f"fds {s['fds']} jobs {s['tracked_jobs']} (long {s['long_units']}, "
            f"in flight {s['short_in_flight']}) | errors {s['errors']} | "
            f"systemd units {sd.get('units')} jobs {sd.get('jobs')} "
            f"rss {s['systemd_rss_mb']} MB | rules {s['match_rules']}"
            f"{' +ns' if s['namespace_match'] else ''} | cpu% self {cpu['self']} "
            f"systemd {cpu['systemd']} dbus {cpu['dbus']} load {s['loadavg1']}"
        )
        return s

    async def sampler(self) -> None:
        """A sample ``--interval`` after the last one, whoever took it (a phase change too)."""
        while True:
            await asyncio.sleep(max(0.0, self.next_tick - time.monotonic()))
            if time.monotonic() >= self.next_tick:
                await self.sample()

    async def enter(self, phase: str) -> None:
        """Phases begin on a sample boundary, so no window mixes two of them."""
        if self.n_samples or self.phase != "setup":
            await self.sample()
        self.phase = phase
        self.phase_t[phase] = rnd(self.now(), 2)
        log(f"--- {phase} ---")

    # --- the run ---

    async def run(self, cfg: ExecConfig, out: dict[str, Any]) -> None:
        args = self.args
        launcher = Launcher(cfg)
        launcher.manager = self.manager  # before connect: the launcher hooks into it there
        self.launcher = launcher
        sampler: asyncio.Task[None] | None = None
        stream: asyncio.Task[None] | None = None
        async with launcher:
            self.manager.on_job_removed(self.on_job_removed)
            await asyncio.sleep(0.5)
            gc.collect()
            out["baseline"] = {
                **self.snapshot(),
                "systemd": await systemd_counts(self.manager),
                "systemd_rss_mb": self.probe.rss_mb(self.probe.pid1),
                "pymalloc": pymalloc_stats(),
            }
            try:
                await self.enter("warmup")
                sampler = asyncio.create_task(self.sampler())
                stream = asyncio.create_task(self.stream())
                await asyncio.sleep(args.warmup)
                out["after_warmup"] = self.snapshot()

                await self.enter("ramp")
                t = time.perf_counter()
                try:
                    async with asyncio.timeout(args.ramp_timeout):
                        await workers(args.m, args.long_concurrency, self.start_long)
                except TimeoutError:
                    self.note_error("ramp", f"not all started within {args.ramp_timeout:g}s")
                out["ramp_seconds"] = rnd(time.perf_counter() - t, 2)
                out["after_ramp"] = {**self.snapshot(), "pymalloc": pymalloc_stats()}

                await self.enter("soak")
                await asyncio.sleep(args.duration)

                await self.enter("drain")
                self.stop.set()
                await stream
                t = time.perf_counter()
                while self.tasks and time.perf_counter() - t < args.job_timeout + 10:
                    await asyncio.wait(set(self.tasks), timeout=1.0)
                out["drain_seconds"] = rnd(time.perf_counter() - t, 2)
                out["long_died_early"] = sum(not j.running for j in self.longs)

                await self.enter("teardown")
                out["teardown"] = await self.teardown()
                sampler.cancel()
                await asyncio.sleep(args.settle)
                gc.collect()
                await self.sample()
                out["end"] = {
                    **self.snapshot(),
                    "tracked_jobs": len(launcher.jobs),
                    "systemd": await systemd_counts(self.manager),
                    "systemd_rss_mb": self.probe.rss_mb(self.probe.pid1),
                    "match_rules": len(getattr(self.manager, "_matched", ())),
                }
                out["end"]["pymalloc"] = pymalloc_stats()
                out["end"]["rss_mb_after_malloc_trim"] = malloc_trim_rss(self.probe)
            finally:
                self.stop.set()
                left = [t for t in (sampler, stream, *self.tasks) if t is not None]
                for task in left:
                    task.cancel()
                if left:  # let cancelled starts undo themselves while the launcher is open
                    await asyncio.wait(left, timeout=10)

    async def teardown(self) -> dict[str, Any]:
        t = time.perf_counter()
        for job in self.longs:
            job.kill()
        for job in self.stuck:
            job.kill()
        codes: dict[str, int] = {}
        res: dict[str, Any] = {}
        try:
            async with asyncio.timeout(self.args.teardown_timeout):
                for rc in await asyncio.gather(*(j.wait() for j in self.longs)):
                    codes[str(rc)] = codes.get(str(rc), 0) + 1
        except TimeoutError:
            res["long_not_gone"] = sum(j.running for j in self.longs)
            self.note_error("teardown", f"{res['long_not_gone']} long jobs not gone")
        res["kill_seconds"] = rnd(time.perf_counter() - t, 2)
        res["returncodes"] = codes
        errs: dict[str, int] = {}
        for j in self.longs:
            if j.error:
                errs[j.error[:200]] = errs.get(j.error[:200], 0) + 1
        if errs:
            res["job_errors"] = errs
        log(f"teardown: {len(self.longs)} long jobs killed and waited: {codes}")
        self.longs.clear()
        self.stuck.clear()
        return res


# --- the verdict --------------------------------------------------------------------------


def summarize(soak: Soak, out: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    args = soak.args
    lat = {p: h["latency"].summary() for p, h in soak.hist.items() if h["latency"].n}
    overall = Histogram()
    for p in ("warmup", "ramp", "soak", "drain"):
        h = soak.hist[p]["latency"]
        for i, k in enumerate(h.counts):
            overall.counts[i] += k
        overall.n += h.n
        overall.max = max(overall.max, h.max)
    soak_samples = [s for s in samples if s["phase"] == "soak" and s["dt"] > 0]

    def series(key: str, phase: str | None = None) -> list[tuple[float, float]]:
        return [
            (s["t"], float(s[key]))
            for s in samples
            if s.get(key) is not None and (phase is None or s["phase"] == phase)
        ]

    def rate(phase: str) -> float | None:
        ss = [s for s in samples if s["phase"] == phase and s["dt"] > 0]
        total = sum(s["dt"] for s in ss)
        if not total:
            return None
        return rnd(sum((s["starts_per_s"] or 0) * s["dt"] for s in ss) / total, 2)

    def busy(phase: str) -> dict[str, float | None]:
        """Mean CPU % and host load of a phase: the node shares its CPUs with the host."""
        ss = [s for s in samples if s["phase"] == phase and s["dt"] >= 0.5]

        def mean(xs: list[float]) -> float | None:
            return rnd(sum(xs) / len(xs), 1) if xs else None

        res = {
            f"cpu_{k}": mean([s["cpu_pct"][k] for s in ss if s["cpu_pct"].get(k) is not None])
            for k in ("self", "systemd", "dbus")
        }
        res["loadavg1"] = mean([s["loadavg1"] for s in ss])
        return res

    base = out.get("baseline", {})
    end = out.get("end", {})
    warm = out.get("after_warmup", {})
    base_lat, soak_lat = lat.get("warmup", {}), lat.get("soak", {})

    def ratio(a: float | None, b: float | None) -> float | None:
        return rnd(a / b, 2) if a is not None and b else None

    # over the soak's second half: bounded caches (dbus-fast's lru_caches, the launcher's
    # deque of finished jobs) fill up first, and a leak is what still grows after that
    rss_pts = series("rss_mb", "soak")
    rss_slope = slope_per_min(rss_pts[len(rss_pts) // 2 :])
    blocks_pts = series("py_blocks", "soak")
    blocks_slope = slope_per_min(blocks_pts[len(blocks_pts) // 2 :])
    soak_minutes = args.duration / 60
    sd_base, sd_end = base.get("systemd", {}), end.get("systemd", {})
    summary: dict[str, Any] = {
        "short_jobs": dict(soak.counts),
        "errors_total": sum(e["count"] for e in soak.errors.values()),
        "errors": soak.errors,
        "latency_ms": {**lat, "overall": overall.summary()},
        "latency_is": "StartTransientUnit call -> JobRemoved of its start job, short units",
        "start_call_ms": {
            p: h["start_call"].summary() for p, h in soak.hist.items() if h["start_call"].n
        },
        "run_ms": {p: h["run"].summary() for p, h in soak.hist.items() if h["run"].n},
        "starts_per_s": {p: rate(p) for p in ("warmup", "ramp", "soak")},
        "busy": {p: busy(p) for p in ("warmup", "ramp", "soak")},
        "baseline_comparison": {
            "what": "short-unit latency with no long unit (warmup) vs with M held (soak)",
            "warmup_p50_ms": base_lat.get("p50_ms"),
            "soak_p50_ms": soak_lat.get("p50_ms"),
            "p50_ratio": ratio(soak_lat.get("p50_ms"), base_lat.get("p50_ms")),
            "warmup_p99_ms": base_lat.get("p99_ms"),
            "soak_p99_ms": soak_lat.get("p99_ms"),
            "p99_ratio": ratio(soak_lat.get("p99_ms"), base_lat.get("p99_ms")),
        },
        "long_units": {
            "requested": args.m,
            "started": soak.long_started,
            "start_errors": soak.long_errors,
            "ramp_seconds": out.get("ramp_seconds"),
            "start_latency_ms": soak.long_hist.summary(),
            "died_early": out.get("long_died_early"),
            **out.get("teardown", {}),
        },
        "rss_mb": {
            "baseline": base.get("rss_mb"),
            "after_warmup": warm.get("rss_mb"),
            "after_ramp": out.get("after_ramp", {}).get("rss_mb"),
            "peak": soak.peak.get("rss_mb"),
            "end": end.get("rss_mb"),
            "end_after_malloc_trim": end.get("rss_mb_after_malloc_trim"),
            "slope_per_min_2nd_half_of_soak": rnd(rss_slope, 3) if rss_slope is not None else None,
        },
        "fds": {
            "baseline": base.get("fds"),
            "peak": soak.peak.get("fds"),
            "end": end.get("fds"),
        },
        "py_blocks": {
            "what": "pymalloc blocks in use (Python objects)",
            "baseline": base.get("py_blocks"),
            "after_warmup": warm.get("py_blocks"),
            "peak": soak.peak.get("py_blocks"),
            "end": end.get("py_blocks"),
            "slope_per_min_2nd_half_of_soak": (
                round(blocks_slope) if blocks_slope is not None else None
            ),
        },
        "pymalloc": {
            "baseline": base.get("pymalloc"),
            "after_ramp": out.get("after_ramp", {}).get("pymalloc"),
            "end": end.get("pymalloc"),
        },
        "asyncio_tasks": {
            "baseline": base.get("tasks"),
            "peak": soak.peak.get("tasks"),
            "end": end.get("tasks"),
        },
        "tracked_jobs": {"peak": soak.peak.get("tracked_jobs"), "end": end.get("tracked_jobs")},
        "match_rules": {
            "per_unit_peak": soak.peak.get("match_rules"),
            "end": end.get("match_rules"),
            "namespace_match": any(s.get("namespace_match") for s in samples),
        },
        "systemd": {
            "units_baseline": sd_base.get("units"),
            "units_peak": soak.peak.get("systemd_units"),
            "units_end": sd_end.get("units"),
            "jobs_peak": soak.peak.get("systemd_jobs"),
            "jobs_end": sd_end.get("jobs"),
            "failed_end": sd_end.get("failed"),
            "rss_mb_baseline": base.get("systemd_rss_mb"),
            "rss_mb_peak": soak.peak.get("systemd_rss_mb"),
            "rss_mb_end": end.get("systemd_rss_mb"),
        },
        "units_left_loaded": out.get("units_left_loaded"),
        "leftover_units_cleaned": out.get("leftover_units_cleaned"),
        "soak_samples": len(soak_samples),
    }
    c = soak.counts

    def close(a: float | None, b: float | None, slack: float) -> bool:
        return a is not None and b is not None and abs(a - b) <= slack

    soak_rate = summary["starts_per_s"]["soak"]
    growth = rss_slope * soak_minutes if rss_slope is not None else None
    checks = {
        "all_long_started": soak.long_started == args.m,
        "no_long_died_early": out.get("long_died_early") == 0,
        "no_errors": summary["errors_total"] == 0,
        "each_short_exit0_once": c["started"] > 0 and c["exit0_once"] == c["started"],
        "rate_held": soak_rate is not None and soak_rate >= 0.95 * args.rate,
        "all_long_gone": "long_not_gone" not in out.get("teardown", {"long_not_gone": 1}),
        "tracked_jobs_zero": end.get("tracked_jobs") == 0,
        "fds_back_to_baseline": close(end.get("fds"), base.get("fds"), args.fd_slack),
        "rss_back_near_warmup": close(end.get("rss_mb"), warm.get("rss_mb"), args.rss_slack_mb),
        "py_blocks_back_near_warmup": close(
            end.get("py_blocks"), warm.get("py_blocks"), args.blocks_slack
        ),
        "no_rss_growth_in_soak": growth is not None and growth <= args.rss_slack_mb,
        "systemd_units_back": close(sd_end.get("units"), sd_base.get("units"), 2),
        "systemd_no_jobs_left": sd_end.get("jobs") == 0,
        "no_unit_left_loaded": out.get("units_left_loaded") == [],
    }
    summary["rss_soak_growth_mb"] = rnd(growth, 2) if growth is not None else None
    return {"summary": summary, "checks": checks, "ok": all(checks.values())}


# --- the plot -----------------------------------------------------------------------------


def plot(result: dict[str, Any], path: str) -> dict[str, Any]:
    """RSS, fds, starts/s and p99 latency over time, phases shaded; only if matplotlib is there."""
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return {"written": False, "reason": "matplotlib is not importable here (plot skipped)"}
    samples = result.get("series", [])
    if not samples:
        return {"written": False, "reason": "no samples"}
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    panels = (
        ("rss_mb", "launcher RSS (MB)"),
        ("fds", "launcher open fds"),
        ("starts_per_s", "short starts/s"),
        ("lat_p99_ms", "start latency (ms)"),
    )
    colors = {"warmup": "#dde8f5", "ramp": "#f5e6cc", "soak": "#ffffff", "drain": "#e8e8e8"}
    colors["teardown"] = "#f2d7d5"
    edges = [(s["phase"], s["t"] - s["dt"], s["t"]) for s in samples]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for phase, a, b in edges:
            ax.axvspan(a, b, color=colors.get(phase, "#ffffff"), lw=0)
        ax.plot(t, [s.get(key) for s in samples], marker=".", label=key)
        if key == "lat_p99_ms":
            ax.plot(t, [s.get("lat_p50_ms") for s in samples], marker=".", label="lat_p50_ms")
            ax.set_yscale("log")
            ax.legend(loc="upper left")
        if key == "starts_per_s":
            ax.axhline(result["params"]["rate"], ls="--", color="grey", lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds (phases: blue warmup, orange ramp, white soak, red teardown)")
    p = result["params"]
    fig.suptitle(
        f"sdexec soak: M={p['m']} long units, {p['rate']}/s short (C={p['concurrency']}), "
        f"{p['duration']} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"written": True, "path": path}


# --- main ---------------------------------------------------------------------------------


async def soak_main(args: argparse.Namespace) -> int:
    cancel_on_sigterm()
    nofile = raise_nofile(1 << 20)
    prefix = f"bench-soak-{os.getpid()}-{os.urandom(2).hex()}"
    digest = sources_digest()  # before the run: the sources may change under it
    cfg = load_config(args.config) if args.config else ExecConfig()
    out: dict[str, Any] = {}
    soak = Soak(args, prefix)
    interrupted = False
    try:
        await soak.run(cfg, out)
    except asyncio.CancelledError:
        interrupted = True
        log("interrupted: cleaning up")
    except Exception as e:
        log(f"failed: {e!r}")
        out["failed"] = f"{type(e).__name__}: {e}"
    finally:
        # what the launcher itself left, then a fresh connection disposes of anything
        out["units_left_loaded"] = units_loaded(SOAK_PATTERNS)
        out["leftover_units_cleaned"] = await cleanup_units(SOAK_PATTERNS)
    series = soak.samples()
    verdict = summarize(soak, out, series)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "ok": verdict["ok"] and not interrupted and "failed" not in out,
        "checks": verdict["checks"],
        "summary": verdict["summary"],
        "params": {
            "m": args.m,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "long_concurrency": args.long_concurrency,
            "duration": args.duration,
            "warmup": args.warmup,
            "interval": args.interval,
            "short": args.short,
            "long": args.long,
            "job_timeout": args.job_timeout,
            "rss_slack_mb": args.rss_slack_mb,
            "fd_slack": args.fd_slack,
            "blocks_slack": args.blocks_slack,
            "sdexec_sources": digest,
            "config": args.config,
            "prefix": prefix,
            "nofile": list(nofile),
            "stdio": "stdin/stdout/stderr=DEVNULL",
        },
        "phases_start_t": soak.phase_t,
        "series": series,
        "host": host_facts(),
    }
    for k in ("failed", "baseline", "after_warmup", "after_ramp", "end"):
        if k in out:
            result[k] = out[k]
    if interrupted:
        result["interrupted"] = True
    result["plot"] = (
        plot(result, args.png) if args.png else {"written": False, "reason": "no --png given"}
    )
    emit(result)
    failed = [k for k, v in result["checks"].items() if not v]
    log(f"soak: ok={result['ok']}; failed checks: {failed}")
    return 130 if interrupted else (0 if result["ok"] else 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--m", type=int, default=2000, help="long units held (default 2000)")
    p.add_argument("--rate", type=float, default=50.0, help="short units per second (default 50)")
    p.add_argument(
        "--concurrency", "-c", type=int, default=32, help="short units in flight (default 32)"
    )
    p.add_argument(
        "--long-concurrency", type=int, default=32, help="long starts in flight (default 32)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="soak seconds (default 600; the growth check needs >= 6 samples, i.e. >= 30 s)",
    )
    p.add_argument("--warmup", type=float, default=30.0, help="baseline seconds (default 30)")
    p.add_argument("--interval", type=float, default=5.0, help="sample period s (default 5)")
    p.add_argument("--short", default="/bin/true", help="short unit command (default /bin/true)")
    p.add_argument("--long", default="sleep infinity", help="long unit command (sleep infinity)")
    p.add_argument("--job-timeout", type=float, default=60.0, help="bound on one short job")
    p.add_argument("--ramp-timeout", type=float, default=900.0, help="bound on starting all M")
    p.add_argument("--teardown-timeout", type=float, default=300.0, help="bound on killing all M")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before the end snapshot")
    p.add_argument("--rss-slack-mb", type=float, default=16.0, help="RSS tolerance (16 MB)")
    p.add_argument("--fd-slack", type=int, default=2, help="fd count tolerance (2)")
    p.add_argument(
        "--blocks-slack", type=int, default=5000, help="Python allocated-blocks tolerance (5000)"
    )

    p.add_argument("--config", help="sdexec config for the launcher (default: built-in defaults)")
    p.add_argument("--png", help="write the plot here (needs matplotlib)")
    p.add_argument("--plot-from", metavar="JSON", help="only plot a saved result to --png")
    args = p.parse_args(argv)
    if args.plot_from and not args.png:
        p.error("--plot-from needs --png PATH")
    if args.rate <= 0 or args.concurrency < 1 or args.long_concurrency < 1 or args.m < 0:
        p.error("--rate must be > 0, --concurrency/--long-concurrency >= 1, --m >= 0")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    a = parse_args()
    if a.plot_from:
        with open(a.plot_from) as f:
            res = plot(json.load(f), a.png)
        log(str(res))
        sys.exit(0 if res["written"] else 1)
    try:
        sys.exit(asyncio.run(soak_main(a)))
    except KeyboardInterrupt:  # units were disposed of in soak_main's finally
        log("interrupted")
        sys.exit(130)
