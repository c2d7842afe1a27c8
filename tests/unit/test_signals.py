from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.config.signals import parse_signal, signal_name


@pytest.mark.parametrize(
    ("value", "signum"),
    [
        ("SIGTERM", 15),
        ("TERM", 15),
        ("sigterm", 15),
        ("term", 15),
        ("15", 15),
        (15, 15),
        ("SIGKILL", 9),
        ("SIGUSR1", 10),
        ("SIGIOT", 6),
        ("SIGRTMIN", int(signal.SIGRTMIN)),
        ("SIGRTMIN+2", int(signal.SIGRTMIN) + 2),
        ("RTMIN+2", int(signal.SIGRTMIN) + 2),
        ("SIGRTMAX-1", int(signal.SIGRTMAX) - 1),
        (" SIGINT ", 2),
    ],
)
def test_parse(value: str | int, signum: int) -> None:
    assert parse_signal(value) == signum


@pytest.mark.parametrize(
    "value",
    [
        "SIGNOPE",
        "",
        "0",
        0,
        -1,
        "-1",
        65,
        "65",
        1000,
        "SIG",
        "SIGRTMAX+1",
        "SIGRTMIN-1",
        "1.5",
        True,
    ],
)
def test_rejected(value: str | int) -> None:
    with pytest.raises(ValueError, match=r"is not a signal \(e\.g\. \"SIGTERM\", \"TERM\" or 15\)"):
        parse_signal(value)


def test_message() -> None:
    with pytest.raises(ValueError) as info:
        parse_signal("SIGNOPE")
    assert str(info.value) == '"SIGNOPE" is not a signal (e.g. "SIGTERM", "TERM" or 15)'


def test_names() -> None:
    assert signal_name(15) == "SIGTERM"
    assert signal_name(10) == "SIGUSR1"
    assert signal_name(int(signal.SIGRTMIN) + 2) == "SIGRTMIN+2"
    assert signal_name(int(signal.SIGRTMAX)) == "SIGRTMAX"
    assert signal_name(32) == "32"  # reserved by glibc, no name


@given(st.integers(min_value=1, max_value=signal.NSIG - 1))
def test_round_trip_number(n: int) -> None:
    assert parse_signal(signal_name(n)) == n
    assert parse_signal(str(n)) == n


@given(st.sampled_from([s.name for s in signal.Signals]), st.booleans(), st.booleans())
def test_round_trip_name(name: str, strip_sig: bool, lower: bool) -> None:
    n = parse_signal(name)
    spelled = name[3:] if strip_sig else name
    spelled = spelled.lower() if lower else spelled
    assert parse_signal(spelled) == n
    assert parse_signal(signal_name(n)) == n


@given(st.integers().filter(lambda n: not 1 <= n < signal.NSIG))
def test_out_of_range(n: int) -> None:
    with pytest.raises(ValueError):
        parse_signal(n)
