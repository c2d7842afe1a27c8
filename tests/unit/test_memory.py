from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.config.memory import (
    INFINITY,
    MemoryBytes,
    MemoryPercent,
    MemoryValue,
    format_memory,
    parse_memory,
    to_property,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", MemoryBytes(1024)),
        ("0", MemoryBytes(0)),
        ("1K", MemoryBytes(1024)),
        ("1k", MemoryBytes(1024)),
        ("512M", MemoryBytes(512 * 1024**2)),
        ("4G", MemoryBytes(4 * 1024**3)),
        ("2T", MemoryBytes(2 * 1024**4)),
        ("1P", MemoryBytes(1024**5)),
        ("1E", MemoryBytes(1024**6)),
        ("1.5G", MemoryBytes(1610612736)),
        ("0.3K", MemoryBytes(307)),  # 307.2 floored
        ("infinity", MemoryBytes(INFINITY)),
        ("90%", MemoryPercent(9000)),
        ("12.5%", MemoryPercent(1250)),
        ("12.34%", MemoryPercent(1234)),
        ("0%", MemoryPercent(0)),
        ("100%", MemoryPercent(10000)),
    ],
)
def test_parse(text: str, expected: MemoryValue) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "text", ["12Q", "", "-1", "abc", "1.2.3", "G", "5 G", "16E", "Infinity", "1G%", "%"]
)
def test_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r'is not a memory size \(.*e\.g\. "'):
        parse_memory(text)


def test_message() -> None:
    with pytest.raises(ValueError) as info:
        parse_memory("12Q")
    assert str(info.value) == '"12Q" is not a memory size (e.g. "512M", "4G", "90%", "infinity")'


@pytest.mark.parametrize("text", ["101%", "100.01%", "12.345%", "-5%", "1e2%"])
def test_bad_percent(text: str) -> None:
    with pytest.raises(ValueError, match=r"a percentage is 0% to 100%"):
        parse_memory(text)


def test_to_property() -> None:
    assert to_property("MemoryMax", MemoryBytes(1024)) == ("MemoryMax", "t", 1024)
    assert to_property("MemoryMax", MemoryBytes(INFINITY)) == ("MemoryMax", "t", 2**64 - 1)
    assert to_property("MemoryHigh", MemoryPercent(10000)) == ("MemoryHighScale", "u", 2**32 - 1)
    assert to_property("MemoryMax", MemoryPercent(0)) == ("MemoryMaxScale", "u", 0)
    # 90% floored: 9000 * 4294967295 // 10000
    assert to_property("MemoryMax", MemoryPercent(9000)) == ("MemoryMaxScale", "u", 3865470565)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (MemoryBytes(1024), "1K"),
        (MemoryBytes(1610612736), "1536M"),
        (MemoryBytes(1000), "1000"),
        (MemoryBytes(0), "0"),
        (MemoryBytes(INFINITY), "infinity"),
        (MemoryPercent(9000), "90%"),
        (MemoryPercent(1250), "12.5%"),
        (MemoryPercent(1205), "12.05%"),
    ],
)
def test_format(value: MemoryValue, text: str) -> None:
    assert format_memory(value) == text


values = st.one_of(
    st.builds(MemoryBytes, st.integers(min_value=0, max_value=INFINITY)),
    st.builds(MemoryBytes, st.integers(min_value=0, max_value=2**20).map(lambda n: n * 1024**3)),
    st.builds(MemoryPercent, st.integers(min_value=0, max_value=10000)),
)


@given(values)
def test_round_trip(value: MemoryValue) -> None:
    assert parse_memory(format_memory(value)) == value


@given(st.integers(min_value=0, max_value=10000))
def test_scale_is_monotonic_and_bounded(permyriad: int) -> None:
    _, sig, scaled = to_property("MemoryMax", MemoryPercent(permyriad))
    assert sig == "u"
    assert 0 <= scaled <= 2**32 - 1
    assert scaled == permyriad * (2**32 - 1) // 10000


@given(st.text())
def test_anything_parses_or_raises_value_error(text: str) -> None:
    try:
        value = parse_memory(text)
    except ValueError as e:
        assert "is not a memory size" in str(e)
    else:
        assert isinstance(value, MemoryBytes | MemoryPercent)
