"""The unit-state model: properties in any order and repetition, each event once."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.systemd import unitstate as us


def events(updates: list[dict[str, object]]) -> list[us.Event]:
    state = us.UnitState("shell-0-1.service")
    out: list[us.Event] = []
    for u in updates:
        out += state.update(u)
    return out


RUN: list[dict[str, object]] = [
    {"ActiveState": "inactive", "SubState": "dead", "Result": "success"},  # before the start
    {"ActiveState": "active", "SubState": "running"},
    {"ExecMainPID": 42},
    {"ExecMainCode": us.CLD_EXITED, "ExecMainStatus": 7, "Result": "exit-code"},
    {"ActiveState": "failed", "SubState": "failed"},
]


def test_a_run_yields_started_finished_gone() -> None:
    got = events(RUN)
    assert got == [us.Started(42), us.Finished(7 << 8), us.Gone(failed=True, result="exit-code")]
    assert us.Finished(7 << 8).returncode == 7


def test_the_inactive_of_a_unit_not_yet_started_is_no_end() -> None:
    assert events(RUN[:1]) == []


def test_signals_and_dumps_are_encoded_like_waitpid() -> None:
    killed = us.wait_status(us.CLD_KILLED, signal.SIGKILL)
    assert os.WIFSIGNALED(killed) and os.WTERMSIG(killed) == signal.SIGKILL
    dumped = us.wait_status(us.CLD_DUMPED, signal.SIGSEGV)
    assert os.WCOREDUMP(dumped) and os.WTERMSIG(dumped) == signal.SIGSEGV
    assert us.describe_status(killed) == "killed by SIGKILL"
    assert us.describe_status(dumped) == "killed by SIGSEGV (core dumped)"
    assert us.describe_status(3 << 8) == "exited with status 3"
    with pytest.raises(ValueError):
        us.wait_status(0, 0)


def test_deactivating_is_reported_once() -> None:
    got = events([*RUN[1:3], {"ActiveState": "deactivating"}, {"ActiveState": "deactivating"}])
    assert got.count(us.Deactivating()) == 1


def test_a_collected_units_stub_does_not_erase_the_status() -> None:
    """GetAll on a unit already collected answers for a fresh stub full of zeros."""
    stub = {
        "LoadState": "not-found",
        "ActiveState": "inactive",
        "ExecMainCode": 0,
        "ExecMainPID": 0,
    }
    got = events([*RUN[1:4], stub])
    assert us.Finished(7 << 8) in got and got[-1] == us.Gone(failed=False, result="exit-code")


@given(st.permutations(RUN[1:]), st.integers(min_value=1, max_value=3))
def test_any_order_and_repetition_gives_each_event_once(
    order: list[dict[str, object]], n: int
) -> None:
    """Unit and Service interface signals come separately, in any order; re-reads repeat."""
    got = events(list(itertools.chain.from_iterable([u] * n for u in order)))
    assert got.count(us.Finished(7 << 8)) == 1
    assert sum(isinstance(e, us.Gone) for e in got) == 1
    assert sum(isinstance(e, us.Started) for e in got) <= 1
