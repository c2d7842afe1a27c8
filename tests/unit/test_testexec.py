"""testexec: attribute parsing and the simulated job's timeline on a fake clock."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.errors import LaunchError, RefusedError, UsageError
from sdexec.exec.clock import FakeClock
from sdexec.exec.testexec import TestexecError, TestexecSpec, allowed, run_testexec

P = "system.exec.test"


def spec(**attrs: str) -> TestexecSpec:
    s = TestexecSpec.from_attrs({P: "1", **{f"{P}.{k}": v for k, v in attrs.items()}})
    assert s is not None
    return s


# -- from_attrs --------------------------------------------------------------------------


def test_no_test_attribute_means_no_testexec() -> None:
    assert TestexecSpec.from_attrs({}) is None
    assert TestexecSpec.from_attrs({"system.duration": "10", "system.exec.testx": "1"}) is None


def test_bare_attribute_enables_with_defaults() -> None:
    s = TestexecSpec.from_attrs({P: "1"})
    assert s == TestexecSpec(None, 0, None)


def test_all_keys_parse() -> None:
    s = spec(run_duration="1.5m", wait_status="3", mock_exception="run")
    assert s == TestexecSpec(run_duration=90.0, wait_status=3, mock_exception="run")


def test_json_table_in_the_bare_attribute() -> None:
    s = TestexecSpec.from_attrs(
        {P: '{"run_duration": "2s", "mock_exception": "init"}', f"{P}.wait_status": "9"}
    )
    assert s == TestexecSpec(2.0, 9, "init")


@pytest.mark.parametrize(
    ("attrs", "key"),
    [
        ({f"{P}.override": "1"}, "override"),
        ({f"{P}.override": "0"}, "override"),
        ({P: '{"override": 1}'}, "override"),
        ({f"{P}.reattach_finish": "true"}, "reattach_finish"),
    ],
)
def test_override_and_reattach_finish_are_refused(attrs: dict[str, str], key: str) -> None:
    """Nothing could start an override job (issue 10: it hung); say so in one line."""
    with pytest.raises(UsageError) as info:
        TestexecSpec.from_attrs(attrs)
    message = str(info.value)
    assert message.startswith(f"{P}.{key}: not supported: ")
    assert "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("run_duration", "soon", f'{P}.run_duration: "soon" is not a duration (e.g.'),
        ("run_duration", "-1s", "system.exec.test.run_duration: "),
        ("wait_status", "x", f"{P}.wait_status: 'x' is not an exit code (an integer 0-255)"),
        ("wait_status", "256", "system.exec.test.wait_status: '256' is not an exit code"),
        ("wait_status", "-1", "system.exec.test.wait_status: '-1' is not an exit code"),
        ("mock_exception", "exit", f"{P}.mock_exception: 'exit' is not a phase (init or run)"),
    ],
)
def test_bad_values_name_the_attribute(key: str, value: str, expected: str) -> None:
    with pytest.raises(UsageError) as info:
        spec(**{key: value})
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(
        UsageError,
        match=r"run_durration: unknown key \(did you mean "
        r"system\.exec\.test\.run_duration\?\)",
    ):
        spec(run_durration="1s")
    with pytest.raises(UsageError, match="zzz: unknown key; known keys: run_duration"):
        spec(zzz="1")


def test_bad_json_table() -> None:
    with pytest.raises(UsageError, match="not a JSON object"):
        TestexecSpec.from_attrs({P: "{nope"})


@given(st.integers(0, 255))
def test_wait_status_is_an_exit_code(code: int) -> None:
    s = spec(wait_status=str(code), run_duration="1s")
    status = asyncio.run(run_testexec(s, jobid="j", clock=FakeClock()))
    assert os.WIFEXITED(status)
    assert os.waitstatus_to_exitcode(status) == code


# -- policy ------------------------------------------------------------------------------


def test_guests_refused_unless_allowed() -> None:
    s = spec()
    allowed(s, guest=False, allow_guests=False)
    allowed(s, guest=True, allow_guests=True)
    with pytest.raises(RefusedError, match=r"exec\.testexec\.allow-guests = true"):
        allowed(s, guest=True, allow_guests=False)


# -- run_testexec ------------------------------------------------------------------------


async def test_runs_for_run_duration() -> None:
    clock = FakeClock(50.0)
    started: list[float] = []
    status = await run_testexec(
        spec(run_duration="10s", wait_status="7"),
        jobid="j1",
        clock=clock,
        default_duration=1000.0,  # run_duration overrides the job's duration
        on_start=lambda: started.append(clock.now()),
    )
    assert status == 7 << 8
    assert started == [50.0]
    assert clock.now() == 60.0


async def test_job_duration_is_the_default() -> None:
    clock = FakeClock()
    assert await run_testexec(spec(), jobid="j", clock=clock, default_duration=30.0) == 0
    assert clock.now() == 30.0


async def test_no_duration_at_all_finishes_at_once() -> None:
    clock = FakeClock()
    assert await run_testexec(spec(), jobid="j", clock=clock) == 0
    assert clock.now() == 0.0


@pytest.mark.parametrize("duration", ["0", "inf"])
async def test_unlimited_runs_until_cancelled(duration: str) -> None:
    clock = FakeClock()  # auto-advance: any timer would fire at once
    cancel = asyncio.Event()
    job = asyncio.ensure_future(
        run_testexec(spec(run_duration=duration), jobid="j", clock=clock, cancelled=cancel)
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert not job.done()
    cancel.set()
    assert await asyncio.wait_for(job, 10) == 15


async def test_cancel_reports_death_by_sigterm() -> None:
    clock = FakeClock(auto_advance=False)
    cancel = asyncio.Event()
    started = asyncio.Event()
    job = asyncio.ensure_future(
        run_testexec(
            spec(run_duration="10s", wait_status="3"),
            jobid="j",
            clock=clock,
            cancelled=cancel,
            on_start=started.set,
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    clock.advance(9.0)
    await asyncio.sleep(0)
    assert not job.done()
    cancel.set()
    status = await asyncio.wait_for(job, 10)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == 15


async def test_mock_init_exception_before_start() -> None:
    started: list[bool] = []
    with pytest.raises(TestexecError, match="mock init exception") as info:
        await run_testexec(
            spec(mock_exception="init"),
            jobid="j",
            clock=FakeClock(),
            on_start=lambda: started.append(True),
        )
    assert started == []
    assert isinstance(info.value, LaunchError)


async def test_mock_run_exception_after_start() -> None:
    started: list[bool] = []
    with pytest.raises(TestexecError, match="mock run exception"):
        await run_testexec(
            spec(mock_exception="run"),
            jobid="j",
            clock=FakeClock(),
            on_start=lambda: started.append(True),
        )
    assert started == [True]


async def test_simulated_job_publishes_its_start() -> None:
    """on_start reaches the job: its record says started before the run ends (issue 10)."""
    from sdexec.exec.simulated import SimulatedJob

    clock = FakeClock(auto_advance=False)
    seen: list[tuple[bool, bool]] = []
    job = SimulatedJob(
        "j", "testexec-0-j", clock=clock, eof_timeout=0,
        on_update=lambda j: seen.append((j.stats()["started"], j.running)),
    )  # fmt: skip
    assert not job.stats()["started"]
    job.spawn(job.run(spec(run_duration="5s", wait_status="3"), None))
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0)
    assert seen == [(True, True)]
    clock.advance(5.0)
    assert await asyncio.wait_for(job.wait(), 10) == 3
    assert seen[-1] == (True, False)
