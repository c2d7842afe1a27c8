"""testexec: simulated jobs that run no process, selected by the job attribute ``system.exec.test``.

They let the whole launch path (policy, bookkeeping, cancel) be exercised without systemd or
a real workload. Semantics follow Flux's testexec: no duration at all means "finish at once",
a duration of 0 (or inf) means "run until cancelled", a cancel reports death by SIGTERM.

Flux's ``override`` (the job starts and ends only on a ``job-exec.override`` RPC) and
``reattach_finish`` (a re-attached simulated job ends at once) are refused with a usage error:
sdexec has no override request to send, and only sdexec units are re-attached, so a job
asking for them would hang or mean nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from sdexec.config.duration import parse_fsd
from sdexec.errors import LaunchError, RefusedError, UsageError
from sdexec.exec.aio import first_completed
from sdexec.exec.clock import Clock

__all__ = ["PREFIX", "TestexecError", "TestexecSpec", "allowed", "run_testexec"]

log = logging.getLogger(__name__)

PREFIX = "system.exec.test"
KEYS = ("run_duration", "wait_status", "mock_exception")
# Flux's keys that need something sdexec does not have: why, for the refusal
UNSUPPORTED = {
    "override": "sdexec has no override request (Flux's job-exec.override) to start or finish "
    "a simulated job, so it would never start; use run_duration and wait_status",
    "reattach_finish": "simulated jobs are never re-attached here (sdexec attach takes sdexec "
    "units only)",
}
SIGTERM = 15  # the status of a cancelled simulated job: killed by SIGTERM (raw wait status)

MockPhase = Literal["init", "run"]


class TestexecError(LaunchError):
    """A mock exception asked for by ``system.exec.test.mock_exception``."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name


def _json_to_attr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _collect(attrs: Mapping[str, str]) -> dict[str, str] | None:
    """The system.exec.test.* sub-keys, or None if testexec was not asked for."""
    found = False
    sub: dict[str, str] = {}
    # the bare key may hold the whole table as JSON, as Flux's jobspec does
    if PREFIX in attrs:
        found = True
        text = attrs[PREFIX].strip()
        if text.startswith("{"):
            try:
                import json  # only for a job that asks for simulation

                table = json.loads(text)
            except ValueError:
                raise UsageError(f"{PREFIX}: {text!r} is not a JSON object") from None
            if not isinstance(table, dict):
                raise UsageError(f"{PREFIX}: {text!r} is not a JSON object")
            sub.update({str(k): _json_to_attr(v) for k, v in table.items()})
    for key, value in attrs.items():
        if key.startswith(PREFIX + "."):
            found = True
            sub[key[len(PREFIX) + 1 :]] = value
    return sub if found else None


@dataclass(frozen=True)
class TestexecSpec:
    """What a simulated job does; ``wait_status`` is the exit code it reports."""

    __test__: ClassVar[bool] = False

    run_duration: float | None = None
    wait_status: int = 0
    mock_exception: MockPhase | None = None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, str]) -> TestexecSpec | None:
        sub = _collect(attrs)
        if sub is None:
            return None
        for name in sub:
            if name in UNSUPPORTED:
                raise UsageError(f"{PREFIX}.{name}: not supported: {UNSUPPORTED[name]}")
            if name not in KEYS:
                import difflib  # only for an error's suggestion

                close = difflib.get_close_matches(name, KEYS, n=1)
                hint = f" (did you mean {PREFIX}.{close[0]}?)" if close else ""
                raise UsageError(
                    f"{PREFIX}.{name}: unknown key{hint}; known keys: {', '.join(KEYS)}"
                )

        run_duration: float | None = None
        if "run_duration" in sub:
            key = f"{PREFIX}.run_duration"
            try:
                run_duration = parse_fsd(sub["run_duration"], key)
            except ValueError as e:
                raise UsageError(f"{key}: {e}") from None

        wait_status = 0
        if "wait_status" in sub:
            key = f"{PREFIX}.wait_status"
            text = sub["wait_status"].strip()
            try:
                wait_status = int(text)
            except ValueError:
                wait_status = -1
            if not 0 <= wait_status <= 255:
                raise UsageError(f"{key}: {text!r} is not an exit code (an integer 0-255)")

        mock: MockPhase | None = None
        if "mock_exception" in sub:
            key = f"{PREFIX}.mock_exception"
            text = sub["mock_exception"].strip()
            if text == "init":
                mock = "init"
            elif text == "run":
                mock = "run"
            else:
                raise UsageError(f"{key}: {text!r} is not a phase (init or run)")

        return cls(
            run_duration=run_duration,
            wait_status=wait_status,
            mock_exception=mock,
        )


def allowed(spec: TestexecSpec, *, guest: bool, allow_guests: bool) -> None:
    """Refuse a guest's simulated job unless ``exec.testexec.allow-guests`` is set."""
    if guest and not allow_guests:
        raise RefusedError(
            f"guests may not use the test exec implementation ({PREFIX}); "
            "it needs exec.testexec.allow-guests = true"
        )


def _task(coro: Coroutine[Any, Any, object]) -> asyncio.Future[object]:
    return asyncio.ensure_future(coro)


async def run_testexec(
    spec: TestexecSpec,
    *,
    jobid: str,
    clock: Clock,
    default_duration: float | None = None,
    cancelled: asyncio.Event | None = None,
    on_start: Callable[[], object] | None = None,
) -> int:
    """Simulate one job and return its raw wait status (exit code N -> N << 8).

    ``default_duration`` is the job's own time limit. ``on_start`` runs when the job counts
    as started (after a mock init exception would have been raised, before a run one).
    """
    cancel = cancelled if cancelled is not None else asyncio.Event()
    if spec.mock_exception == "init":
        raise TestexecError(f"job {jobid}: mock init exception")
    if on_start is not None:
        on_start()
    log.debug("testexec %s: started", jobid)
    if spec.mock_exception == "run":
        raise TestexecError(f"job {jobid}: mock run exception")

    duration = spec.run_duration if spec.run_duration is not None else default_duration
    unlimited = duration is not None and (duration == 0 or math.isinf(duration))
    remaining = 0.0
    if duration is not None and not unlimited:
        remaining = duration

    waiters: list[asyncio.Future[object]] = [_task(cancel.wait())]
    canceller = waiters[0]
    if not unlimited:
        waiters.append(_task(clock.sleep_until(clock.now() + remaining)))
    done = await first_completed(*waiters)
    if canceller in done:
        log.debug("testexec %s: cancelled", jobid)
        return SIGTERM
    status = spec.wait_status << 8
    log.debug("testexec %s: finished with status %d", jobid, status)
    return status
