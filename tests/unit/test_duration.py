from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sdexec.config.duration import DurationError, format_fsd, parse_fsd


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("5", 5.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("0.5s", 0.5),
        ("1.5m", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1ms", 0.001),
        (".5s", 0.5),
        ("2.s", 2.0),
        ("1e3", 1000.0),
        ("inf", math.inf),
        ("infinity", math.inf),
        ("INF", math.inf),
        (" 5s ", 5.0),
    ],
)
def test_parse(text: str, seconds: float) -> None:
    assert parse_fsd(text) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"), [(5, 5.0), (0, 0.0), (2.5, 2.5), (math.inf, math.inf)]
)
def test_parse_toml_numbers_are_seconds(value: float, seconds: float) -> None:
    assert parse_fsd(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "",
        "-5s",
        "-1",
        "5x",
        "5 s",
        "s",
        "ms",
        "nan",
        "5sec",
        "1e400",
        "5ss",
        "0x10",
        "5m5s",
    ],
)
def test_garbage_rejected(value: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration \(e\.g\. \"5s\", \"0\.5m\", \"2h\"\)"):
        parse_fsd(value)


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, True, False])
def test_bad_numbers_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_fsd(value)


def test_error_message_and_key() -> None:
    with pytest.raises(DurationError) as info:
        parse_fsd("soon", "exec.kill-timeout")
    assert str(info.value) == '"soon" is not a duration (e.g. "5s", "0.5m", "2h")'
    assert info.value.key == "exec.kill-timeout"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5.0, "5s"),
        (90.0, "90s"),
        (1800.0, "30m"),
        (3600.0, "1h"),
        (86400.0, "1d"),
        (0.0, "0"),
        (0.25, "250ms"),
        (0.5, "0.5s"),
        (1.5, "1.5s"),
        (math.inf, "inf"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_fsd(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, math.nan])
def test_format_rejects_non_durations(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_fsd(seconds)


@example(1.7976931348623157e308)
@example(5e-324)
@given(st.floats(min_value=0, allow_nan=False, allow_infinity=True))
def test_round_trip(seconds: float) -> None:
    text = format_fsd(seconds)
    assert parse_fsd(text) == seconds
    # never longer than the plain-seconds spelling
    assert len(text) <= len(repr(seconds)) + 1


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ms", "s", "m", "h", "d", ""]))
def test_integer_with_unit(n: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}[unit]
    assert parse_fsd(f"{n}{unit}") == pytest.approx(n * factor)


@given(st.text())
def test_anything_parses_or_raises_value_error(text: str) -> None:
    try:
        seconds = parse_fsd(text)
    except ValueError as e:
        assert "is not a duration" in str(e)
    else:
        assert seconds >= 0


@given(st.text(alphabet="abcfgijklnopqrtuvwxyz!@#$%^&*()-_=+/", min_size=1))
def test_garbage_letters_rejected(text: str) -> None:
    if text.strip().lower() in ("inf", "infinity"):
        return
    with pytest.raises(ValueError):
        parse_fsd(text)
