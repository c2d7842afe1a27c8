"""Tests for sdexec.exec.termination: the kill escalation of a cancelled or timed-out job."""

from __future__ import annotations

import asyncio
import itertools
import signal
from dataclasses import dataclass
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdexec.config.duration import format_seconds
from sdexec.exec import termination as termination_mod
from sdexec.exec.clock import FakeClock, drive
from sdexec.exec.termination import (
    Drain,
    KillPolicy,
    SignalShell,
    SignalTasks,
    TermAction,
    Termination,
    policy_stats,
)

TERM = int(signal.SIGTERM)
KILL = int(signal.SIGKILL)
ALRM = int(signal.SIGALRM)
USR1 = int(signal.SIGUSR1)
INT = int(signal.SIGINT)

Step = tuple[float, TermAction]


def make(policy: KillPolicy | None = None, start: float = 0.0) -> tuple[Termination, FakeClock]:
    clock = FakeClock(start)
    return Termination(policy or KillPolicy(), "f123", clock), clock


def run_to_end(t: Termination, clock: FakeClock, max_steps: int = 10_000) -> list[Step]:
    """Step virtual time from deadline to deadline, collecting (time, action)."""
    steps: list[Step] = []
    for _ in range(max_steps):
        deadline = t.deadline()
        if deadline is None:
            return steps
        clock.set(max(deadline, clock.now()))
        steps.extend((clock.now(), a) for a in t.expire(clock.now()))
    raise AssertionError("termination did not end")


def rel(steps: list[Step], t0: float = 0.0) -> list[tuple[float, TermAction]]:
    return [(t - t0, a) for t, a in steps]


# --- the documented default timeline --------------------------------------------------------


def test_default_timeline_exactly_as_documented() -> None:
    t, clock = make(start=1000.0)
    first = t.start("cancel")
    assert first == [SignalTasks(TERM)]
    steps = rel(run_to_end(t, clock), 1000.0)
    assert steps == [
        (5, SignalTasks(TERM)),
        (10, SignalTasks(KILL)),
        (15, SignalTasks(KILL)),
        (20, SignalTasks(KILL)),
        (25, SignalShell(KILL)),
        (30, SignalShell(KILL)),
        (40, SignalShell(KILL)),
        (60, SignalShell(KILL)),
        (100, SignalShell(KILL)),
        (180, SignalShell(KILL)),
        (340, SignalShell(KILL)),
        (640, SignalShell(KILL)),
        (940, Drain("unkillable user processes for job f123 (waited 940s, 8 kill attempts)")),
    ]
    assert t.done and t.state == "drained"
    # the docstring quotes the same timeline, so the README stays true
    doc = termination_mod.__doc__ or ""
    for line in ("t=25   SIGKILL -> shell #1", "t=640  SIGKILL -> shell #8", "t=940  drain"):
        assert line in doc


def test_timeout_starts_with_sigalrm_which_counts_as_a_term_send() -> None:
    t, clock = make()
    assert t.start("timeout") == [SignalTasks(ALRM)]
    assert t.term_count == 1
    steps = run_to_end(t, clock)
    assert steps[:3] == [(5, SignalTasks(TERM)), (10, SignalTasks(KILL)), (15, SignalTasks(KILL))]
    assert t.reason == "timeout"


def test_timeout_with_single_term_send_goes_straight_to_kill() -> None:
    t, clock = make(KillPolicy(max_term_count=1))
    assert t.start("timeout") == [SignalTasks(ALRM)]
    assert run_to_end(t, clock)[0] == (5, SignalTasks(KILL))


def test_start_is_idempotent() -> None:
    t, clock = make()
    assert t.start("cancel") == [SignalTasks(TERM)]
    clock.set(3)
    assert t.start("cancel") == []
    assert t.start("timeout") == []
    assert (t.reason, t.started_at, t.term_count, t.kill_count) == ("cancel", 0.0, 1, 1)
    assert t.deadline() == 5.0


def test_idle_has_no_deadline_and_ignores_expire() -> None:
    t, _ = make()
    assert (t.state, t.done, t.deadline()) == ("idle", False, None)
    assert t.expire(1e9) == []
    assert t.state == "idle"


def test_expire_before_deadline_is_noop() -> None:
    t, _ = make()
    t.start("cancel")
    assert t.expire(4.99) == []
    assert (t.kill_count, t.deadline()) == (1, 5.0)


@pytest.mark.parametrize(
    ("max_term", "expected"), [(0, [KILL] * 4), (1, [KILL] * 4), (3, [TERM, TERM, KILL, KILL])]
)
def test_term_count_switches_to_kill_signal(max_term: int, expected: list[int]) -> None:
    t, clock = make(KillPolicy(max_term_count=max_term, term_signal=INT))
    assert t.start("cancel") == [SignalTasks(INT)]
    task_signals = [a.signal for _, a in run_to_end(t, clock) if isinstance(a, SignalTasks)]
    assert task_signals == [INT if s == TERM else s for s in expected]
    assert t.term_count == max(1, min(max_term, 5))
    assert t.kill_count == 5


def test_term_sends_can_last_until_shell_delay() -> None:
    t, clock = make(KillPolicy(max_term_count=10))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert [a for _, a in steps if isinstance(a, SignalTasks)] == [SignalTasks(TERM)] * 4
    assert t.term_count == 5


def test_shell_kill_at_kill_shell_delay_not_aligned_to_ticks() -> None:
    t, clock = make(KillPolicy(kill_timeout=10, kill_shell_delay=25))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert steps[:5] == [
        (10, SignalTasks(TERM)),
        (20, SignalTasks(KILL)),
        (25, SignalShell(KILL)),
        (35, SignalShell(KILL)),
        (55, SignalShell(KILL)),
    ]


def test_shell_delay_shorter_than_kill_timeout() -> None:
    t, clock = make(KillPolicy(kill_timeout=10, kill_shell_delay=3, max_kill_count=2))
    t.start("cancel")
    assert run_to_end(t, clock) == [
        (3, SignalShell(KILL)),
        (13, SignalShell(KILL)),
        (33, Drain("unkillable user processes for job f123 (waited 33s, 2 kill attempts)")),
    ]


def test_zero_shell_delay_signals_shell_right_after_term() -> None:
    t, _ = make(KillPolicy(kill_shell_delay=0, max_kill_count=1))
    assert t.start("cancel") == [SignalTasks(TERM)]
    assert t.deadline() == 0.0
    assert t.expire(0.0) == [SignalShell(KILL)]
    assert t.expire(5.0) == [
        Drain("unkillable user processes for job f123 (waited 5s, 1 kill attempts)")
    ]


def test_guest_shell_signal_is_used_only_for_shell_steps() -> None:
    t, clock = make(KillPolicy(shell_kill_signal=USR1, max_kill_count=2))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert {a.signal for _, a in steps if isinstance(a, SignalTasks)} == {TERM, KILL}
    assert [a for _, a in steps if isinstance(a, SignalShell)] == [SignalShell(USR1)] * 2


def test_backoff_doubles_from_kill_timeout_capped_at_300() -> None:
    t, clock = make(KillPolicy(kill_timeout=100, kill_shell_delay=500, max_kill_count=7))
    t.start("cancel")
    steps = run_to_end(t, clock)
    shell_times = [at for at, a in steps if isinstance(a, SignalShell)]
    drain_at = steps[-1][0]
    times = [*shell_times, drain_at]
    intervals = [b - a for a, b in itertools.pairwise(times)]
    assert shell_times[0] == 500
    assert intervals == [100, 200, 300, 300, 300, 300, 300]


def test_backoff_interval_visible_in_stats() -> None:
    t, clock = make(KillPolicy(kill_timeout=100, kill_shell_delay=500))
    t.start("cancel")
    seen = []
    while t.kill_shell_count < 5:
        deadline = t.deadline()
        assert deadline is not None
        clock.set(deadline)
        t.expire(deadline)
        seen.append(t.stats()["kill_timeout"])
    # task phase: kill-timeout; shell phase: the backoff
    assert seen == [100, 100, 100, 100, 100, 200, 300, 300, 300]


def test_custom_backoff_cap_also_caps_first_interval() -> None:
    t, clock = make(
        KillPolicy(kill_timeout=20, kill_shell_delay=0, backoff_cap=15, max_kill_count=3)
    )
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert [at for at, _ in steps] == [0, 15, 30, 45]


def test_drain_after_max_kill_count() -> None:
    t, clock = make(KillPolicy(max_kill_count=3))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert sum(isinstance(a, SignalShell) for _, a in steps) == 3
    at, last = steps[-1]
    assert isinstance(last, Drain)
    assert last.reason.startswith("unkillable user processes for job f123")
    assert last.reason == "unkillable user processes for job f123 (waited 60s, 3 kill attempts)"
    assert at == 60  # 25, 30, 40, then 20 s after the last attempt
    assert (t.done, t.state, t.deadline()) == (True, "drained", None)
    assert t.expire(1e9) == []


def test_max_kill_count_zero_drains_at_shell_delay() -> None:
    t, clock = make(KillPolicy(max_kill_count=0))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert steps[-1] == (
        25,
        Drain("unkillable user processes for job f123 (waited 25s, 0 kill attempts)"),
    )
    assert not any(isinstance(a, SignalShell) for _, a in steps)


def test_max_kill_timeout_overrides_count() -> None:
    t, clock = make(KillPolicy(max_kill_timeout=50))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert [at for at, a in steps if isinstance(a, SignalShell)] == [25, 30, 40]
    assert steps[-1] == (
        50,
        Drain("unkillable user processes for job f123 (waited 50s, 3 kill attempts)"),
    )


def test_max_kill_timeout_during_task_phase() -> None:
    t, clock = make(KillPolicy(max_kill_timeout=12))
    t.start("timeout")
    steps = run_to_end(t, clock)
    assert steps == [
        (5, SignalTasks(TERM)),
        (10, SignalTasks(KILL)),
        (12, Drain("unkillable user processes for job f123 (waited 12s, 0 kill attempts)")),
    ]
    stats = t.stats(now=500.0)
    assert stats["kill_shell_delay_remaining"] == 13.0  # frozen at the drain
    assert stats["exception_in_progress"] is False


def test_max_kill_timeout_wins_on_a_shared_tick() -> None:
    t, clock = make(KillPolicy(max_kill_timeout=30))
    t.start("cancel")
    steps = run_to_end(t, clock)
    assert steps[-1] == (
        30,
        Drain("unkillable user processes for job f123 (waited 30s, 1 kill attempts)"),
    )


def test_max_kill_timeout_longer_than_count_does_not_delay_drain() -> None:
    t, clock = make(KillPolicy(max_kill_count=2, max_kill_timeout=10_000))
    t.start("cancel")
    assert run_to_end(t, clock)[-1][0] == 40


def test_late_expiry_rearms_from_now() -> None:
    t, _ = make()
    t.start("cancel")
    assert t.expire(7.5) == [SignalTasks(TERM)]
    assert t.deadline() == 12.5
    assert t.expire(26.0) == [SignalShell(KILL)]  # shell delay passed while we were late
    assert t.deadline() == 31.0


def test_on_exit_stops_everything() -> None:
    t, clock = make()
    t.start("cancel")
    clock.set(27.0)
    t.expire(27.0)
    assert t.kill_shell_count == 1
    t.on_exit()
    assert (t.done, t.state, t.deadline()) == (True, "exited", None)
    assert t.expire(1e9) == []
    assert t.start("cancel") == []
    t.on_exit()  # twice is harmless
    assert t.ended_at == 27.0
    clock.set(500.0)
    stats = t.stats()
    assert stats["kill_shell_delay_remaining"] == 0.0
    assert stats["exception_in_progress"] is False
    assert stats["kill_shell_count"] == 1


def test_on_exit_before_start() -> None:
    t, _ = make()
    t.on_exit()
    assert t.done
    assert t.start("timeout") == []
    assert t.deadline() is None
    assert t.stats()["kill_shell_delay_remaining"] is None


# --- stats ----------------------------------------------------------------------------------


def test_stats_through_the_sequence() -> None:
    t, clock = make(start=100.0)
    assert t.stats() == {
        "kill_timeout": 5.0,
        "kill_count": 0,
        "kill_shell_count": 0,
        "term_count": 0,
        "exception_in_progress": False,
        "kill_shell_delay_remaining": None,
        "started_at": None,
        "reason": None,
        "state": "idle",
    }
    t.start("timeout")
    clock.set(110.0)
    t.expire(105.0)
    t.expire(110.0)
    assert t.stats() == {
        "kill_timeout": 5.0,
        "kill_count": 3,
        "kill_shell_count": 0,
        "term_count": 2,
        "exception_in_progress": True,
        "kill_shell_delay_remaining": 15.0,
        "started_at": 100.0,
        "reason": "timeout",
        "state": "signalling-tasks",
    }
    assert t.stats(now=112.5)["kill_shell_delay_remaining"] == 12.5
    for at in (115.0, 120.0, 125.0, 130.0):
        clock.set(at)
        t.expire(at)
    stats = t.stats()
    assert stats["state"] == "killing-shell"
    assert stats["kill_shell_delay_remaining"] == 0.0
    assert stats["kill_shell_count"] == 2
    assert stats["kill_timeout"] == 10.0
    assert stats["kill_count"] == 5


def test_policy_stats() -> None:
    assert policy_stats(KillPolicy()) == {
        "kill-timeout": 5.0,
        "kill-shell-delay": 25.0,
        "term-signal": "SIGTERM",
        "kill-signal": "SIGKILL",
        "shell-kill-signal": "SIGKILL",
        "max-term-count": 2,
        "max-kill-count": 8,
        "max-kill-timeout": None,
    }
    custom = policy_stats(KillPolicy(term_signal=INT, shell_kill_signal=USR1, max_kill_timeout=60))
    assert (custom["term-signal"], custom["shell-kill-signal"]) == ("SIGINT", "SIGUSR1")
    assert custom["max-kill-timeout"] == 60


# --- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeCfg:
    kill_timeout: float = 2.0
    kill_shell_delay: float | None = None
    max_term_count: int = 3
    max_kill_count: int = 4
    max_kill_timeout: float | None = 99.0
    term_signal: int = INT
    kill_signal: int = KILL

    @property
    def effective_kill_shell_delay(self) -> float:
        return 5 * self.kill_timeout if self.kill_shell_delay is None else self.kill_shell_delay


@pytest.mark.parametrize(("via_imp", "shell_signal"), [(False, KILL), (True, USR1)])
def test_policy_from_config(via_imp: bool, shell_signal: int) -> None:
    policy = KillPolicy.from_config(cast(Any, FakeCfg()), via_imp=via_imp)
    assert policy == KillPolicy(
        term_signal=INT,
        kill_signal=KILL,
        kill_timeout=2.0,
        kill_shell_delay=10.0,
        max_term_count=3,
        max_kill_count=4,
        max_kill_timeout=99.0,
        shell_kill_signal=shell_signal,
        backoff_cap=300.0,
    )


def test_policy_from_config_explicit_shell_delay_and_kill_signal() -> None:
    cfg = FakeCfg(kill_shell_delay=7.0, kill_signal=INT)
    policy = KillPolicy.from_config(cast(Any, cfg), via_imp=False)
    assert (policy.kill_shell_delay, policy.shell_kill_signal) == (7.0, INT)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kill_timeout": 0},
        {"kill_timeout": -1},
        {"kill_shell_delay": -1},
        {"max_term_count": -1},
        {"max_kill_count": -1},
        {"max_kill_timeout": -5},
        {"backoff_cap": 0},
        {"term_signal": 0},
        {"shell_kill_signal": -9},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        KillPolicy(**kwargs)


@pytest.mark.parametrize(
    ("seconds", "text"), [(940.0, "940"), (0.5, "0.5"), (60.00001, "60"), (23.25, "23.2"), (0, "0")]
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


# --- with the driver ------------------------------------------------------------------------


async def test_driven_sequence_until_job_exits() -> None:
    t, clock = make()
    wake = asyncio.Event()
    sent: list[tuple[float, TermAction]] = []

    async def on_actions(actions: list[TermAction]) -> None:
        sent.extend((clock.now(), a) for a in actions)
        if any(isinstance(a, SignalShell) for a in actions):
            t.on_exit()  # the shell died of it
            wake.set()

    task = asyncio.ensure_future(drive(t, clock, on_actions, wake))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done() and sent == []
    await on_actions(t.start("cancel"))
    wake.set()
    await asyncio.wait_for(task, 1)
    assert [at for at, _ in sent] == [0, 5, 10, 15, 20, 25]
    assert sent[-1] == (25, SignalShell(KILL))
    assert t.state == "exited"


async def test_driven_sequence_to_drain() -> None:
    t, clock = make(KillPolicy(kill_timeout=100, max_kill_count=8), start=50.0)
    sent: list[TermAction] = []

    async def on_actions(actions: list[TermAction]) -> None:
        sent.extend(actions)

    sent.extend(t.start("cancel"))
    await asyncio.wait_for(drive(t, clock, on_actions, asyncio.Event()), 1)
    assert isinstance(sent[-1], Drain)
    assert sent[-1].reason.startswith("unkillable user processes for job f123 (waited ")
    assert sum(isinstance(a, SignalShell) for a in sent) == 8


# --- properties -----------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn) -> KillPolicy:
    kill_timeout = draw(st.floats(min_value=0.01, max_value=1000, allow_nan=False))
    # keep the task phase short: at most ~40 ticks
    delay = kill_timeout * draw(st.floats(min_value=0, max_value=40, allow_nan=False))
    return KillPolicy(
        term_signal=draw(st.sampled_from([TERM, INT])),
        kill_signal=draw(st.sampled_from([KILL, INT])),
        kill_timeout=kill_timeout,
        kill_shell_delay=delay,
        max_term_count=draw(st.integers(0, 6)),
        max_kill_count=draw(st.integers(0, 15)),
        max_kill_timeout=draw(st.none() | st.floats(min_value=0, max_value=5000, allow_nan=False)),
        shell_kill_signal=draw(st.sampled_from([KILL, USR1])),
        backoff_cap=draw(st.floats(min_value=0.5, max_value=300, allow_nan=False)),
    )


@settings(max_examples=200, deadline=None)
@given(
    policy=policies(),
    reason=st.sampled_from(["cancel", "timeout"]),
    start=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_property_sequence_is_sane(policy: KillPolicy, reason: Any, start: float) -> None:
    t, clock = make(policy, start=start)
    first = t.start(reason)
    assert first == [SignalTasks(ALRM if reason == "timeout" else policy.term_signal)]

    deadlines: list[float] = []
    steps: list[Step] = []
    shell_times: list[float] = []
    for _ in range(1000):
        deadline = t.deadline()
        if deadline is None:
            break
        deadlines.append(deadline)
        clock.set(deadline)
        actions = t.expire(deadline)
        assert actions, "a machine at its own deadline must act"
        steps.extend((deadline, a) for a in actions)
        if isinstance(actions[0], SignalShell):
            shell_times.append(deadline)
            assert t.interval <= min(policy.backoff_cap, 300)
    else:
        raise AssertionError("no drain")

    assert t.state == "drained"
    assert deadlines == sorted(deadlines)
    kinds = [type(a) for _, a in steps]
    # exactly one Drain, last; tasks before shell, never after
    assert kinds.count(Drain) == 1 and kinds[-1] is Drain
    if SignalShell in kinds:
        first_shell = kinds.index(SignalShell)
        assert SignalTasks not in kinds[first_shell:]
    # intervals between shell attempts (and to the drain) never exceed the cap
    times = [*shell_times, steps[-1][0]] if shell_times else []
    for a, b in itertools.pairwise(times):
        assert b - a <= min(policy.backoff_cap, 300) * (1 + 1e-9)
    # term sends bounded by max-term-count (the first send always happens)
    assert t.term_count == max(1, min(policy.max_term_count, t.kill_count))
    waited = steps[-1][0] - start
    if policy.max_kill_timeout is None:
        assert kinds.count(SignalShell) == policy.max_kill_count
    else:
        assert kinds.count(SignalShell) <= policy.max_kill_count
        # the bound is never passed (rounding aside)
        assert waited <= policy.max_kill_timeout + 1e-6 * max(1.0, start)


@settings(max_examples=100, deadline=None)
@given(policy=policies())
def test_property_max_kill_timeout_only_brings_drain_forward(policy: KillPolicy) -> None:
    unbounded = KillPolicy(**{**policy.__dict__, "max_kill_timeout": None})
    t1, c1 = make(unbounded)
    t1.start("cancel")
    natural = run_to_end(t1, c1)
    t2, c2 = make(policy)
    t2.start("cancel")
    bounded = run_to_end(t2, c2)
    drain_at = bounded[-1][0]
    if policy.max_kill_timeout is None:
        assert bounded == natural
    else:
        assert drain_at == pytest.approx(min(natural[-1][0], policy.max_kill_timeout))
        # everything before the drain is the same sequence
        assert bounded[:-1] == [s for s in natural[:-1] if s[0] < drain_at]
