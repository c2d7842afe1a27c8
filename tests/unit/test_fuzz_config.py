"""Hostile-input fuzzing of the config loader, ``sdexec config check`` and sdexec-properties.

A config file is written by an admin but read by a privileged launcher: whatever it holds, the
answer must be a config or a one-line-per-problem ConfigError, never a traceback. The bugs it
found are pinned by fixed-input regression tests at the end.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdexec.cli import main as cli
from sdexec.config.properties import (
    MEMORY_PROPERTIES,
    PROTECTED_PROPERTIES,
    SUPPORTED_PROPERTIES,
    collect_properties,
    is_protected,
)
from sdexec.config.show import dotted
from sdexec.config.table import EXEC_KEYS, SDEXEC_KEYS, ExecConfig, load_config, parse_config
from sdexec.errors import ConfigError, SdexecError
from sdexec.systemd.start import INFINITY_USEC, stop_timeout_usec

FUZZ = settings(max_examples=60, deadline=None)
FILE = "exec.toml"
TABLE = "exec.sdexec-properties"

# --- strategies -----------------------------------------------------------------------------

# Python's idea of printable, minus the space separators it counts as unprintable: control
# characters in inputs are covered by the regression tests below.
PRINTABLE = st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" ")
ANY_CHAR = st.characters(codec="utf-8")  # TOML text is UTF-8: every code point but surrogates

INTERESTING = [
    "", " ", "0", "5s", "0.5m", "2h", "250ms", "-1s", "1e400s", "inf", "infinity", "nan",
    "SIGTERM", "term", "SIGRTMIN+2", "SIGRTMAX-100", "99", "rexec", "sdexec", "testexec",
    "/usr/libexec/flux/flux-imp", "relative/path", "/", "512M", "16E", "90%", "100.01%",
    "12.345%", "0-3,5", "[0-3]", "8192", "5-3", "/dev/nvidiactl rw", "/dev/x q", "yes", "maybe",
    "-1000", "1001", "18446744073709551616", "{reason}", "{hostname}", "{", "}", "{0}",
    "{reason!r}", "{reason:>9}", "{{literal}}", "sdexec.slice", "a/b.slice", "x" * 300,
    "9" * 5000,
]  # fmt: skip

PROPERTY_NAMES = sorted(
    SUPPORTED_PROPERTIES
    | PROTECTED_PROPERTIES
    | {"DevicePolicy", "ManagedOOMSwap", "StandardOutput", "memorymax", "MemoryMaxScale", "lower"}
)


def scalars(chars: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Every scalar type tomllib can hand us (integers within TOML's 64 bits)."""
    return st.one_of(
        st.text(chars, max_size=20),
        st.sampled_from(INTERESTING),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(),
        st.booleans(),
        st.datetimes(),
        st.datetimes(timezones=st.just(dt.UTC)),
        st.dates(),
        st.times(),
    )


def keys(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.text(chars, max_size=12), st.sampled_from([*EXEC_KEYS, *SDEXEC_KEYS]))


def values(chars: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars(chars),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys(chars), inner, max_size=3),
        max_leaves=8,
    )


def tables(chars: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Whole parsed-TOML documents, biased towards the keys we actually read."""
    v = values(chars)
    props = st.dictionaries(
        st.sampled_from(PROPERTY_NAMES) | st.text(chars, max_size=10),
        st.sampled_from(INTERESTING) | st.text(chars, max_size=30) | v,
        max_size=4,
    )
    exec_table = st.dictionaries(
        st.sampled_from(EXEC_KEYS) | keys(chars),
        v | st.sampled_from(INTERESTING),
        max_size=6,
    ).flatmap(
        lambda t: st.fixed_dictionaries(
            {},
            optional={
                "sdexec-properties": props | v,
                "testexec": st.fixed_dictionaries({}, optional={"allow-guests": v}) | v,
            },
        ).map(lambda extra: {**t, **extra})
    )
    site_table = st.dictionaries(
        st.sampled_from(SDEXEC_KEYS) | keys(chars),
        v | st.sampled_from(INTERESTING) | st.lists(st.sampled_from(PROPERTY_NAMES), max_size=3),
        max_size=4,
    )
    others = st.dictionaries(
        st.sampled_from(["exe", "Exec", "sdexe", "resource", "access"]) | keys(chars),
        v,
        max_size=3,
    )
    ours = st.fixed_dictionaries({}, optional={"exec": exec_table | v, "sdexec": site_table | v})
    return st.tuples(others, ours).map(lambda pair: {**pair[0], **pair[1]})


# --- TOML writer (inline tables, so any key and any scalar can be written) ------------------


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    assert isinstance(v, Mapping)
    return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(data: Mapping[str, Any]) -> str:
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in data.items())


# --- the error-message oracle ---------------------------------------------------------------

_POSITION = re.compile(r"line [0-9]+, column [0-9]+: \S")
_WHOLE_FILE = (
    "is not UTF-8 text (a TOML file must be)",
    "arrays or tables are nested too deeply",
)


def check_error(err: ConfigError, file: str | None, top_keys: Any = ()) -> None:
    """One line per problem, each naming the file (when known) and a key or a position."""
    assert err.exit_code == 2
    assert isinstance(err, SdexecError)
    text = str(err)
    assert text
    for line in text.split("\n"):
        assert line.isprintable(), repr(line)
        rest = line
        if file is not None:
            assert line.startswith(file + ": "), repr(line)
            rest = line[len(file) + 2 :]
        assert (
            rest.startswith(("exec.", "exec: ", "sdexec.", "sdexec: "))
            or any(rest.startswith(f"{k}: unknown table") for k in top_keys)
            or _POSITION.match(rest)
            or rest.endswith("(at end of document)")
            or rest in _WHOLE_FILE
            or rest.startswith("a value cannot be read: ")
        ), repr(line)


def write(directory: str, content: bytes, name: str = FILE) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


# --- 1. the loader: an ExecConfig or a ConfigError, nothing else ----------------------------


@FUZZ
@given(tables(PRINTABLE), st.sampled_from([None, FILE, "/etc/sdexec/conf.d/10-site.toml"]))
@example({"exec": {"service": "x", "kill-timeout": "-1s"}, "sdexec": {"slice": 3}}, FILE)
@example({"exce": {}, "sdexec": {"drain-command": ["{nope}"]}}, None)
def test_parse_config_returns_config_or_config_error(
    data: dict[str, Any], file: str | None
) -> None:
    try:
        cfg = parse_config(data, file)
    except ConfigError as e:
        check_error(e, file, data.keys())
    else:
        assert isinstance(cfg, ExecConfig)
        assert cfg.sources == ((file,) if file else ())


TOML_LINES = [
    "[exec]", "[sdexec]", "[exec.sdexec-properties]", "[exec.testexec]", "[resource]", "[exec",
    "[[exec]]", "exec = 1", 'service = "sdexec"', "service-override = true", 'imp = "rel"',
    'kill-timeout = "5s"', "kill-timeout = 1e400", "max-term-count = 0", 'term-signal = "TERM"',
    'MemoryMax = "90%"', 'User = "root"', "allow-guests = 1", 'slice = "a.slice"',
    'drain-command = ["/bin/x", "{reason}"]', "allow-properties = ['DevicePolicy']",
    'DevicePolicy = "closed"', "a.b.c = 1", '"quoted key" = 2', "x = [1, [2, {y = 3}]]",
    "t = 1979-05-27T07:32:00Z", "d = 1979-05-27", 'm = """multi\nline"""', "x = 0x_1", "= 3",
    "x = \"unterminated", "x = 1\nx = 2", "[exec]\n[exec]",
]  # fmt: skip


@st.composite
def toml_texts(draw: st.DrawFn, chars: st.SearchStrategy[str]) -> bytes:
    """TOML-ish documents: real statements interleaved with junk, so both parse paths run."""
    parts = draw(st.lists(st.sampled_from(TOML_LINES) | st.text(chars, max_size=20), max_size=10))
    return "\n".join(parts).encode("utf-8")


@FUZZ
@given(toml_texts(PRINTABLE))
@example(b"[exec]\nkill-timeout = ")
@example(b"x = [1, 2")
def test_load_config_on_tomlish_text(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = write(d, content)
        try:
            cfg = load_config(path)
        except ConfigError as e:
            check_error(e, path, tomllib.loads(content.decode()).keys() if _valid(content) else ())
        else:
            assert cfg.sources == (path,)


def _valid(content: bytes) -> bool:
    try:
        tomllib.loads(content.decode())
    except (ValueError, RecursionError):
        return False
    return True


@FUZZ
@given(st.binary(max_size=200))
@example(b"\xff\xfe[exec]")
@example(b"\x00")
@example(b"")
def test_load_config_on_arbitrary_bytes(content: bytes) -> None:
    # no printability check: a valid TOML string with a control character in it is the
    # regression below; here every line must still start with the file name and a key/position
    with tempfile.TemporaryDirectory() as d:
        path = write(d, content)
        try:
            load_config(path)
        except ConfigError as e:
            for line in str(e).split("\n"):
                assert line.startswith(path + ": "), repr(line)


# --- 2. through the CLI: 0 or 2, never a traceback ------------------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(tables(ANY_CHAR).map(lambda t: to_toml(t).encode()), toml_texts(ANY_CHAR)))
@example(
    to_toml({"exec": {"service": "sdexec", "sdexec-properties": {"MemoryMax": "90%"}}}).encode()
)
@example(b"[exec]\nkill-timeout = 1e308\nbarrier-timeout = inf\n")
def test_cli_config_check(capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as d:
        path = write(d, content)
        rc = cli.main(["config", "check", path])
        out, err = capsys.readouterr()
        assert rc in (0, 2)
        assert "Traceback" not in err
        if rc == 2:
            assert out == ""
            assert err.startswith(f"sdexec: {path}: ")
        else:
            assert err == ""
            # what check prints is meant to be pasted back: it must read back the same config
            assert parse_config(tomllib.loads(out)) == load_config(path)


# --- 6. sdexec-properties: converted or refused, never passed raw unless allowed -------------

HOSTILE_VALUES = st.one_of(
    st.sampled_from(INTERESTING),
    st.text(PRINTABLE, max_size=40),
    st.text(PRINTABLE, min_size=1, max_size=8).map(lambda s: (s * 10_000)[:10_000]),
    st.builds(lambda s: s * 2000, st.sampled_from(["0-", "1G", "rw ", ",", "9"])),
)
_SIGNATURE_CHECKS = {
    "t": lambda v: isinstance(v, int) and 0 <= v <= 2**64 - 1,
    "u": lambda v: isinstance(v, int) and 0 <= v <= 2**32 - 1,
    "i": lambda v: isinstance(v, int) and -1000 <= v <= 1000,
    "b": lambda v: isinstance(v, bool),
    "ay": lambda v: isinstance(v, bytes),
    "s": lambda v: isinstance(v, str),
    "a(ss)": lambda v: all(isinstance(a, str) and isinstance(b, str) for a, b in v),
}


@FUZZ
@given(
    st.dictionaries(st.sampled_from(PROPERTY_NAMES) | st.text(PRINTABLE, max_size=12),
                    HOSTILE_VALUES | values(PRINTABLE), max_size=5),
    st.lists(st.sampled_from(PROPERTY_NAMES) | st.text(PRINTABLE, max_size=12), max_size=4),
)  # fmt: skip
def test_properties_converted_or_refused(table: dict[str, Any], allow: list[str]) -> None:
    props, errors = collect_properties(table, allow, lambda _name: FILE)
    refused = {e.key for e in errors}
    for e in errors:
        assert e.key is not None and e.key.startswith(TABLE + ".")
        assert e.key in {dotted((*TABLE.split("."), name)) for name in table}
        check_error(e, FILE)
        assert str(e).startswith(f"{FILE}: {e.key}: ")
    for name in table:
        if is_protected(name) or (name not in SUPPORTED_PROPERTIES and name not in allow):
            assert dotted((*TABLE.split("."), name)) in refused, name
    assert len(props) + len(errors) == len(table)
    # the config's name of each converted property (systemd's D-Bus name may differ)
    dbus_names = {"RuntimeMaxUSec": "RuntimeMaxSec"}
    by_name = {
        p.name.removesuffix("Scale") if p.signature == "u" else dbus_names.get(p.name, p.name): p
        for p in props
    }
    for name, p in by_name.items():
        assert dotted((*TABLE.split("."), name)) not in refused
        assert not is_protected(p.name)
        assert _SIGNATURE_CHECKS[p.signature](p.value), p
        if p.signature == "s":  # raw: only what the site allowed, verbatim
            assert name in allow and name not in SUPPORTED_PROPERTIES
            assert p.value == table[name]
        else:
            assert name in SUPPORTED_PROPERTIES
        if name in MEMORY_PROPERTIES:
            assert p.signature in ("t", "u")


@FUZZ
@given(
    st.dictionaries(st.sampled_from(PROPERTY_NAMES), HOSTILE_VALUES, min_size=1, max_size=4),
    st.lists(st.sampled_from(PROPERTY_NAMES), max_size=4),
)
def test_properties_through_the_config(table: dict[str, str], allow: list[str]) -> None:
    data = {"exec": {"sdexec-properties": table}, "sdexec": {"allow-properties": allow}}
    try:
        cfg = parse_config(data, FILE)
    except ConfigError as e:
        check_error(e, FILE)
        for name in table:
            if is_protected(name):
                assert f"{FILE}: {TABLE}.{name}: is set by sdexec itself" in str(e)
        return
    assert not any(is_protected(name) for name in table)
    assert not any(is_protected(p.name) for p in cfg.unit_properties)
    for p in cfg.unit_properties:
        if p.signature == "s":
            assert p.name in cfg.sdexec.allow_properties


@pytest.mark.parametrize("name", [*sorted(PROTECTED_PROPERTIES), "StandardInputData"])
@pytest.mark.parametrize("value", ["", "x", "/bin/sh -c evil", "root\nUser=0", "1" * 10_000])
def test_protected_properties_always_refused(name: str, value: str) -> None:
    data = {"exec": {"sdexec-properties": {name: value}}, "sdexec": {"allow-properties": [name]}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, FILE)
    assert f"{FILE}: {TABLE}.{name}: is set by sdexec itself" in str(info.value)
    assert f"{FILE}: sdexec.allow-properties: " in str(info.value)


# --- regressions: each a bug this fuzzing found, now fixed ----------------------------------


@pytest.mark.parametrize("text", ["x = " + "[" * 2000 + "]" * 2000, "x = " + "{a = " * 2000])
def test_deeply_nested_toml_is_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = write(d, text.encode())
        escaped = ""
        try:
            load_config(path)
        except ConfigError as e:
            check_error(e, path)
        except RecursionError:
            escaped = "RecursionError"  # not re-raised: pytest takes seconds to format 1000 frames
        assert not escaped, f"{escaped} escaped load_config"


def test_huge_integer_literal_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = write(d, b"[exec]\nmax-term-count = " + b"9" * 5000 + b"\n")
        assert cli.main(["config", "check", path]) == 2
        assert capsys.readouterr().err.startswith(f"sdexec: {path}: ")


@pytest.mark.parametrize(
    "key",
    [
        "exec.kill-timeout",
        "exec.sdexec-stop-timer-sec",
        "sdexec.start-timeout",
        "sdexec.request-timeout",
        "sdexec.max-connections",
    ],
)
def test_huge_integer_durations_are_config_errors(key: str) -> None:
    table, name = key.split(".")
    with tempfile.TemporaryDirectory() as d:  # 400 digits: tomllib reads it as an int
        path = write(d, f"[{table}]\n{name} = 1{'0' * 400}\n".encode())
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    "text",
    [
        '[exec]\nservice = "rexec\\nexec.service: fine"\n',
        '[exec]\n"kill\\ntimeout" = 1\n',
        '[exec]\nimp = "\\u001b[2Jrelative"\n',
        '[exec]\nterm-signal = "TERM\\rX"\n',
        '[exec.sdexec-properties]\nMemoryMax = "1\\n2"\n',
        '[sdexec]\nslice = "a\\tb"\n',
    ],
)
def test_control_characters_are_escaped_in_messages(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = write(d, text.encode())
        with pytest.raises(ConfigError) as info:
            load_config(path)
        check_error(info.value, path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("exec.sdexec-properties.TimeoutStopUSec", "9" * 5000),
        ("exec.sdexec-properties.OOMScoreAdjust", "9" * 5000),
        ("exec.sdexec-properties.AllowedCPUs", "9" * 5000),
        ("exec.sdexec-properties.MemoryMax", "9" * 5000),
        ("exec.term-signal", "9" * 5000),
    ],
)
def test_long_digit_strings_name_the_accepted_form(key: str, value: str) -> None:
    *path, name = key.split(".")
    data: dict[str, Any] = {name: value}
    for part in reversed(path):
        data = {part: data}
    with pytest.raises(ConfigError) as info:
        parse_config(data, FILE)
    message = str(info.value)
    assert message.startswith(f"{FILE}: {key}: ")
    assert "e.g." in message
    assert "set_int_max_str_digits" not in message


@pytest.mark.parametrize("seconds", [1e13, 1e308])
def test_accepted_stop_timer_gives_a_valid_systemd_timeout(seconds: float) -> None:
    try:
        cfg = parse_config({"exec": {"sdexec-stop-timer-sec": seconds}})
    except ConfigError:
        return  # refusing it would be a fix too
    usec = stop_timeout_usec(cfg.sdexec_stop_timer_sec, via_imp=False)  # via the IMP: infinity
    assert 0 <= usec <= INFINITY_USEC


@pytest.mark.parametrize(
    "data",
    [
        {"exec": {"imp": "/usr/libexec/flux/flux-imp\0x"}},
        {"exec": {"job-shell": "/bin/sh\0"}},
        {"sdexec": {"state-dir": "/var/lib/sdexec\0"}},
        {"sdexec": {"drain-command": ["/usr/sbin/drain", "a\0b"]}},
        {"exec": {"sdexec-properties": {"DeviceAllow": "/dev/a\0b rw"}}},
        {
            "exec": {"sdexec-properties": {"DevicePolicy": "closed\0"}},
            "sdexec": {"allow-properties": ["DevicePolicy"]},
        },
    ],
)
def test_nul_in_config_strings_is_refused(data: dict[str, Any]) -> None:
    # a NUL cannot cross D-Bus, open() or exec(): it must fail at config check, not at launch
    with pytest.raises(ConfigError) as info:
        parse_config(data, FILE)
    check_error(info.value, FILE)


def test_check_error_oracle_can_fail() -> None:
    """The oracle above rejects what the regressions describe, so the properties can fail."""
    bad = ConfigError("exec.service", '"a\nb" is not a service', FILE)
    with pytest.raises(AssertionError):
        check_error(bad, FILE)
    with pytest.raises(AssertionError):
        check_error(ConfigError(None, "oops", FILE), FILE)
    check_error(ConfigError(None, "line 1, column 2: Invalid statement", FILE), FILE)
