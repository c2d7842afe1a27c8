from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.config.properties import (
    SUPPORTED_PROPERTIES,
    UnitProperty,
    collect_properties,
    convert_properties,
    cpuset_bitmap,
    dbus_problem,
    is_protected,
)
from sdexec.errors import ConfigError


def one(name: str, value: str, allow_raw: tuple[str, ...] = ()) -> UnitProperty:
    props = convert_properties({name: value}, allow_raw)
    assert len(props) == 1
    return props[0]


def test_memory() -> None:
    assert one("MemoryMax", "1024") == UnitProperty("MemoryMax", "t", 1024)
    assert one("MemoryHigh", "4G") == UnitProperty("MemoryHigh", "t", 4 * 1024**3)
    assert one("MemoryMin", "infinity") == UnitProperty("MemoryMin", "t", 2**64 - 1)
    assert one("MemoryLow", "100%") == UnitProperty("MemoryLowScale", "u", 2**32 - 1)
    assert one("MemoryMax", "90%") == UnitProperty("MemoryMaxScale", "u", 3865470565)


@pytest.mark.parametrize(
    ("text", "value"),
    [("yes", True), ("true", True), ("on", True), ("1", True), ("YES", True),
     ("no", False), ("false", False), ("off", False), ("0", False), ("Off", False)],
)  # fmt: skip
def test_send_sigkill(text: str, value: bool) -> None:
    assert one("SendSIGKILL", text) == UnitProperty("SendSIGKILL", "b", value)


def test_timeout_stop_usec() -> None:
    assert one("TimeoutStopUSec", "90000000") == UnitProperty("TimeoutStopUSec", "t", 90000000)
    assert one("TimeoutStopUSec", "infinity") == UnitProperty("TimeoutStopUSec", "t", 2**64 - 1)


@pytest.mark.parametrize("name", ["AllowedCPUs", "AllowedMemoryNodes"])
def test_cpu_sets(name: str) -> None:
    # 0-3,5 -> bits 0,1,2,3,5 of byte 0 = 0b101111
    assert one(name, "0-3,5") == UnitProperty(name, "ay", bytes([0b101111]))
    assert one(name, "8") == UnitProperty(name, "ay", bytes([0, 1]))
    assert one(name, "[0,9-10]") == UnitProperty(name, "ay", bytes([1, 0b110]))
    assert one(name, "") == UnitProperty(name, "ay", b"")


@given(st.sets(st.integers(min_value=0, max_value=300), max_size=40))
def test_cpu_bitmap_matches_systemd_layout(cpus: set[int]) -> None:
    bitmap = cpuset_bitmap(",".join(str(c) for c in sorted(cpus)))
    decoded = {8 * i + j for i, byte in enumerate(bitmap) for j in range(8) if byte >> j & 1}
    assert decoded == cpus
    assert len(bitmap) == (max(cpus) // 8 + 1 if cpus else 0)


def test_other_reference_conversions() -> None:
    assert one("OOMScoreAdjust", "-500") == UnitProperty("OOMScoreAdjust", "i", -500)
    assert one("DeviceAllow", "/dev/nvidiactl rw, /dev/nvidia0 rwm") == UnitProperty(
        "DeviceAllow", "a(ss)", [["/dev/nvidiactl", "rw"], ["/dev/nvidia0", "rwm"]]
    )
    assert one("MemorySwapMax", "1G") == UnitProperty("MemorySwapMax", "t", 1024**3)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MemoryMax", "12Q", '"12Q" is not a memory size (e.g. "512M", "4G", "90%", "infinity")'),
        ("MemoryHigh", "101%", "a percentage is 0% to 100%"),
        ("SendSIGKILL", "maybe", "is not a boolean (yes/no, true/false, on/off, 1/0)"),
        ("TimeoutStopUSec", "30s", 'is not a time in microseconds (an integer, e.g. "90000000"'),
        ("TimeoutStopUSec", "-1", "is not a time in microseconds"),
        ("AllowedCPUs", "0-x", 'is not a CPU list (numbers and ranges up to 8191, e.g. "0-3,5")'),
        ("AllowedCPUs", "5-3", "is not a CPU list"),
        ("AllowedCPUs", "8192", "is not a CPU list"),
        ("OOMScoreAdjust", "2000", "is not an OOM score adjustment"),
        ("DeviceAllow", "/dev/null", "is not a device list"),
    ],
)
def test_bad_values(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        convert_properties({name: value}, file="/etc/sdexec/exec.toml")
    assert info.value.key == f"exec.sdexec-properties.{name}"
    assert str(info.value).startswith(f"/etc/sdexec/exec.toml: exec.sdexec-properties.{name}: ")
    assert fragment in str(info.value)


def test_non_string_value() -> None:
    with pytest.raises(ConfigError) as info:
        convert_properties({"MemoryMax": 1024})
    assert str(info.value) == (
        "exec.sdexec-properties.MemoryMax: 1024 is not a string "
        '(values are strings, e.g. "1024" or "512M")'
    )


def test_unknown_property_refused_listing_supported() -> None:
    with pytest.raises(ConfigError) as info:
        convert_properties({"CPUWeight": "100"})
    message = str(info.value)
    assert message.startswith("exec.sdexec-properties.CPUWeight: not a supported property")
    for name in SUPPORTED_PROPERTIES:
        assert name in message
    assert "allow-properties" in message


def test_near_miss_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean 'MemoryMax'"):
        convert_properties({"memorymax": "1G"})
    with pytest.raises(ConfigError, match="did you mean 'MemoryHigh'"):
        convert_properties({"MemoryHihg": "1G"})


def test_allow_raw_passes_strings() -> None:
    assert one("DevicePolicy", "closed", ("DevicePolicy",)) == UnitProperty(
        "DevicePolicy", "s", "closed"
    )
    # a converted property stays converted even if also allowed raw
    assert one("MemoryMax", "1K", ("MemoryMax",)) == UnitProperty("MemoryMax", "t", 1024)


@pytest.mark.parametrize(
    "name",
    ["ExecStart", "ExecStartEx", "User", "Type", "KillMode", "StandardOutput",
     "StandardErrorFileDescriptor", "Environment", "WorkingDirectory", "Slice"],
)  # fmt: skip
def test_protected_refused_even_if_allowed(name: str) -> None:
    assert is_protected(name)
    with pytest.raises(ConfigError, match="is set by sdexec itself"):
        convert_properties({name: "x"}, allow_raw=(name,))


def test_all_errors_collected() -> None:
    table = {"MemoryMax": 1024, "MemoryHigh": "12Q", "User": "root", "MemoryLow": "1G"}
    props, errors = collect_properties(table, (), lambda name: f"{name}.toml")
    assert props == [UnitProperty("MemoryLow", "t", 1024**3)]
    assert [e.key for e in errors] == [
        "exec.sdexec-properties.MemoryMax",
        "exec.sdexec-properties.MemoryHigh",
        "exec.sdexec-properties.User",
    ]
    assert [e.file for e in errors] == ["MemoryMax.toml", "MemoryHigh.toml", "User.toml"]
    with pytest.raises(ConfigError) as info:
        convert_properties(table)
    assert len(str(info.value).splitlines()) == 3


def test_order_preserved() -> None:
    props = convert_properties({"MemoryMax": "1G", "SendSIGKILL": "no", "MemoryHigh": "50%"})
    assert [p.name for p in props] == ["MemoryMax", "SendSIGKILL", "MemoryHighScale"]


def test_tasks_max() -> None:
    from sdexec.config.properties import convert_one

    assert convert_one("TasksMax", "4096").value == 4096
    assert convert_one("TasksMax", "infinity").value == 2**64 - 1
    for bad in ("0", "-1", "lots", "50%"):
        with pytest.raises(ValueError, match="task count"):
            convert_one("TasksMax", bad)


# One example of every converted property, as a site writes it, and what systemd must read
# (dbus-fast hands structs back as tuples). The Memory*Scale forms come from percentages.
MARSHAL_CASES = [
    ("DeviceAllow", "/dev/null rw, char-pts rwm", "DeviceAllow", "a(ss)",
     [("/dev/null", "rw"), ("char-pts", "rwm")]),
    ("AllowedCPUs", "0-1,9", "AllowedCPUs", "ay", bytes([0b11, 0b10])),
    ("AllowedMemoryNodes", "0", "AllowedMemoryNodes", "ay", bytes([1])),
    ("OOMScoreAdjust", "-1000", "OOMScoreAdjust", "i", -1000),
    ("TasksMax", "infinity", "TasksMax", "t", 2**64 - 1),
    ("SendSIGKILL", "no", "SendSIGKILL", "b", False),
    ("TimeoutStopUSec", "90000000", "TimeoutStopUSec", "t", 90000000),
    ("MemorySwapMax", "0", "MemorySwapMax", "t", 0),
    ("MemoryMax", "512M", "MemoryMax", "t", 512 * 1024**2),
    ("MemoryMax", "90%", "MemoryMaxScale", "u", 3865470565),
    ("MemoryHigh", "100%", "MemoryHighScale", "u", 2**32 - 1),
    ("MemoryMin", "0%", "MemoryMinScale", "u", 0),
    ("MemoryLow", "50%", "MemoryLowScale", "u", 2**31 - 1),  # floored, as Flux does
    ("MemorySwapMax", "25%", "MemorySwapMaxScale", "u", 2**30 - 1),
    ("RuntimeMaxSec", "2m", "RuntimeMaxUSec", "t", 120_000_000),
]  # fmt: skip


def _start_transient_unit(props: list[UnitProperty]) -> bytes:
    """The bytes of the StartTransientUnit call the launcher sends, with these properties."""
    from dbus_fast import Message, Variant

    return bytes(
        Message(
            destination="org.freedesktop.systemd1",
            path="/org/freedesktop/systemd1",
            interface="org.freedesktop.systemd1.Manager",
            member="StartTransientUnit",
            signature="ssa(sv)a(sa(sv))",
            body=[
                "x.service",
                "fail",
                [[p.name, Variant(p.signature, p.value)] for p in props],
                [],
            ],
        )._marshall(False)
    )


def test_marshal_cases_cover_every_converted_property() -> None:
    assert {case[0] for case in MARSHAL_CASES} == SUPPORTED_PROPERTIES
    scales = {f"{name}Scale" for name in ("MemoryMax", "MemoryHigh", "MemoryMin", "MemoryLow")}
    assert scales <= {case[2] for case in MARSHAL_CASES}


@pytest.mark.parametrize(("name", "text", "sent", "sig", "decoded"), MARSHAL_CASES)
def test_every_converted_property_marshals(
    name: str, text: str, sent: str, sig: str, decoded: object
) -> None:
    """What config load accepts, dbus-fast can send, and systemd reads what was meant."""
    import io

    from dbus_fast._private.unmarshaller import Unmarshaller

    prop = one(name, text)
    assert (prop.name, prop.signature) == (sent, sig)
    msg = Unmarshaller(io.BytesIO(_start_transient_unit([prop]))).unmarshall()  # type: ignore[arg-type]
    assert msg is not None
    ((got_name, variant),) = msg.body[2]
    assert (got_name, variant.signature, variant.value) == (sent, sig, decoded)


def test_all_converted_properties_marshal_together() -> None:
    props = [one(name, text) for name, text, *_ in MARSHAL_CASES]
    assert len(_start_transient_unit(props)) > 0


def test_dbus_problem_names_what_dbus_refuses() -> None:
    # the value DeviceAllow had before issue 10: tuples, which dbus-fast refuses for "a"
    problem = dbus_problem("DeviceAllow", "a(ss)", (("/dev/null", "rw"),))
    assert problem is not None and problem.startswith("cannot be sent to systemd as D-Bus 'a(ss)'")
    assert "\n" not in problem
    assert dbus_problem("OOMScoreAdjust", "i", 2**40) is not None
    assert dbus_problem("DeviceAllow", "a(ss)", [["/dev/null", "rw"]]) is None


def test_unmarshallable_value_refused_at_config_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter that produced a value D-Bus cannot carry is a config error, not a crash."""
    from sdexec.config import properties

    monkeypatch.setattr(
        properties, "_device_allow", lambda value: (("/dev/null", "rw"),)
    )  # the pre-fix form
    props, errors = collect_properties({"DeviceAllow": "/dev/null rw", "MemoryMax": "1G"})
    assert [p.name for p in props] == ["MemoryMax"]
    assert len(errors) == 1
    assert str(errors[0]).startswith(
        "exec.sdexec-properties.DeviceAllow: cannot be sent to systemd as D-Bus 'a(ss)'"
    )
