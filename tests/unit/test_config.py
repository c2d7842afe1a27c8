from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.config import table as config_mod
from sdexec.config.properties import UnitProperty
from sdexec.config.table import (
    ExecConfig,
    SiteConfig,
    TestexecConfig,
    default_state_dir,
    load_config,
    parse_config,
)
from sdexec.errors import ConfigError

DATA = Path(__file__).parent / "data"


def toml(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


def error_of(text: str, file: str | None = "exec.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(toml(text), file)
    return str(info.value)


# --- defaults and the man page's examples ---------------------------------------------------


def test_defaults() -> None:
    c = parse_config({})
    assert c == ExecConfig()
    assert c.imp is None
    assert c.service == "rexec"
    assert c.service_override is False
    assert c.job_shell is None
    assert dict(c.sdexec_properties) == {}
    assert c.unit_properties == ()
    assert c.sdexec_stop_timer_sec == 30
    assert c.sdexec_stop_timer_signal == 10
    assert c.sdexec_stop_timer_signal_set is False
    assert c.kill_timeout == 5.0
    assert c.kill_shell_delay is None
    assert c.effective_kill_shell_delay == 25.0
    assert c.max_term_count == 2
    assert c.max_kill_count == 8
    assert c.max_kill_timeout is None
    assert c.term_signal == 15
    assert c.kill_signal == 9
    assert c.barrier_timeout == 1800.0
    assert c.testexec == TestexecConfig(allow_guests=False)
    assert c.sdexec == SiteConfig()


def test_man_page_example_imp_and_job_shell() -> None:
    c = parse_config(
        toml(
            '[exec]\nimp = "/usr/libexec/flux/flux-imp"\n'
            'job-shell = "/usr/libexec/flux/flux-shell-special"\n'
        )
    )
    assert c.imp == "/usr/libexec/flux/flux-imp"
    assert c.job_shell == "/usr/libexec/flux/flux-shell-special"


def test_man_page_example_sdexec_memory() -> None:
    c = parse_config(
        toml('[exec]\nservice = "sdexec"\n[exec.sdexec-properties]\nMemoryMax = "90%"\n')
    )
    assert c.service == "sdexec"
    assert dict(c.sdexec_properties) == {"MemoryMax": "90%"}
    assert c.unit_properties == (UnitProperty("MemoryMaxScale", "u", 9000 * (2**32 - 1) // 10000),)


def test_man_page_example_testexec() -> None:
    c = parse_config(toml("[exec.testexec]\nallow-guests = true\n"))
    assert c.testexec.allow_guests is True


def test_example_files_in_data_dir() -> None:
    c = load_config(DATA / "full.toml")
    assert c.service == "sdexec"
    assert c.kill_timeout == 10.0
    assert c.kill_shell_delay == 60.0
    assert c.effective_kill_shell_delay == 60.0
    assert c.term_signal == 2
    assert c.kill_signal == 9
    assert c.sdexec_stop_timer_signal == 10
    assert c.sdexec_stop_timer_signal_set is True
    assert c.barrier_timeout == 0.0
    assert c.max_kill_timeout == 600.0
    assert c.sdexec.slice == "sdexec.slice"
    assert c.sdexec.drain_command == ("/usr/sbin/drain-node", "{hostname}", "{reason}")
    assert c.sdexec.allow_properties == ("DevicePolicy",)
    assert UnitProperty("DevicePolicy", "s", "closed") in c.unit_properties
    assert c.sources == (str(DATA / "full.toml"),)


# --- values that must be rejected, naming the key -------------------------------------------


def test_kill_timeout_soon() -> None:
    assert error_of('[exec]\nkill-timeout = "soon"\n') == (
        'exec.toml: exec.kill-timeout: "soon" is not a duration (e.g. "5s", "0.5m", "2h")'
    )


def test_sdexec_properties_integer() -> None:
    assert error_of("[exec.sdexec-properties]\nMemoryMax = 1024\n") == (
        "exec.toml: exec.sdexec-properties.MemoryMax: 1024 is not a string "
        '(values are strings, e.g. "1024" or "512M")'
    )


def test_sdexec_properties_bad_memory() -> None:
    assert error_of('[exec.sdexec-properties]\nMemoryHigh = "12Q"\n') == (
        'exec.toml: exec.sdexec-properties.MemoryHigh: "12Q" is not a memory size '
        '(e.g. "512M", "4G", "90%", "infinity")'
    )


def test_term_signal_nope() -> None:
    assert error_of('[exec]\nterm-signal = "SIGNOPE"\n') == (
        'exec.toml: exec.term-signal: "SIGNOPE" is not a signal (e.g. "SIGTERM", "TERM" or 15)'
    )


def test_service_teleport() -> None:
    assert error_of('[exec]\nservice = "teleport"\n') == (
        'exec.toml: exec.service: "teleport" is not a service (one of "rexec", "sdexec")'
    )


def test_stop_timer_sec_string() -> None:
    assert error_of('[exec]\nsdexec-stop-timer-sec = "abc"\n') == (
        'exec.toml: exec.sdexec-stop-timer-sec: "abc" is not a number of seconds '
        "(a positive number, e.g. 30)"
    )


def test_barrier_timeout_negative() -> None:
    assert error_of('[exec]\nbarrier-timeout = "-5s"\n') == (
        'exec.toml: exec.barrier-timeout: "-5s" is not a duration (e.g. "5s", "0.5m", "2h")'
    )


def test_typo_suggests_key() -> None:
    assert error_of('[exec]\nkill-timout = "5s"\n') == (
        "exec.toml: exec.kill-timout: unknown key; did you mean 'kill-timeout'?"
    )


def test_no_file_no_prefix() -> None:
    assert error_of('[exec]\nservice = "teleport"\n', file=None).startswith("exec.service: ")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[exec]\nimp = "flux-imp"', 'exec.imp: "flux-imp" is not an absolute path'),
        ("[exec]\nimp = 5", "exec.imp: 5 is not a path"),
        ("[exec]\njob-shell = true", "exec.job-shell: true is not a path"),
        ('[exec]\nservice-override = "yes"', 'service-override: "yes" is not a boolean'),
        ("[exec]\nmax-term-count = 0", "exec.max-term-count: 0 is not a positive integer"),
        ("[exec]\nmax-kill-count = -1", "exec.max-kill-count: -1 is not a positive integer"),
        ("[exec]\nmax-kill-count = 2.5", "exec.max-kill-count: 2.5 is not a positive integer"),
        ("[exec]\nmax-kill-count = true", "max-kill-count: true is not a positive integer"),
        ('[exec]\nkill-timeout = "0"', 'exec.kill-timeout: "0" is not a positive duration'),
        ('[exec]\nkill-timeout = "inf"', 'exec.kill-timeout: "inf" is not a finite'),
        ('[exec]\nkill-shell-delay = "x"', 'exec.kill-shell-delay: "x" is not a duration'),
        ('[exec]\nmax-kill-timeout = "0"', 'exec.max-kill-timeout: "0" is not a positive'),
        ("[exec]\nsdexec-stop-timer-sec = true", "sdexec-stop-timer-sec: true is not a number"),
        ("[exec]\nsdexec-stop-timer-sec = 0", "sdexec-stop-timer-sec: 0 is not a number"),
        ("[exec]\nsdexec-stop-timer-signal = 99", "sdexec-stop-timer-signal: 99 is not a signal"),
        ('[exec]\nkill-signal = "KILLME"', 'exec.kill-signal: "KILLME" is not a signal'),
        ('[exec]\nsdexec-properties = "x"', 'exec.sdexec-properties: "x" is not a table'),
        ("[exec]\ntestexec = 1", "exec.testexec: 1 is not a table"),
        ("[exec.testexec]\nallow-guests = 1", "exec.testexec.allow-guests: 1 is not a boolean"),
        ("[exec.testexec]\nallow-guest = true", "did you mean 'allow-guests'?"),
        ("exec = 1", "exec: 1 is not a table"),
        ("sdexec = []", "sdexec: an array is not a table"),
        ('[sdexec]\nslice = "jobs"', 'sdexec.slice: "jobs" is not a slice name'),
        ('[sdexec]\nstate-dir = "state"', 'sdexec.state-dir: "state" is not an absolute path'),
        ('[sdexec]\ndrain-command = "drain"', 'sdexec.drain-command: "drain" is not an array'),
        ('[sdexec]\ndrain-command = ["d", "{host}"]', '"{host}" has an unknown placeholder'),
        ('[sdexec]\ndrain-command = ["d", "{reason"]', '"{reason" has an unknown placeholder'),
        ('[sdexec]\ndrain-command = ["d", "{reason!r}"]', "has an unknown placeholder"),
        ('[sdexec]\nallow-properties = ["ExecStart"]', '"ExecStart" is set by sdexec itself'),
        ('[sdexec]\nallow-properties = ["cpu weight"]', "is not a systemd property name"),
        ('[sdexec]\nstart-timeout = "0"', 'sdexec.start-timeout: "0" is not a positive'),
        ('[sdexec]\nstdio-eof-timeout = "soon"', 'sdexec.stdio-eof-timeout: "soon" is not a dur'),
        ('[sdexec]\nrequest-timeout = "0"', 'sdexec.request-timeout: "0" is not a positive'),
        ('[sdexec]\nrequest-timeout = "inf"', 'sdexec.request-timeout: "inf" is not a finite'),
        ("[sdexec]\nmax-connections = 0", "sdexec.max-connections: 0 is not a positive integer"),
        ('[sdexec]\nmax-connections = "9"', 'sdexec.max-connections: "9" is not a positive'),
        ("[sdexec]\nmax-connections = 1e3", "sdexec.max-connections: 1000.0 is not a positive"),
        ("[sdexec]\nmax-connections = 9999999", "max-connections: 9999999 is too large (accepted"),
        ("[sdexec]\nmax-connections-per-user = true", "max-connections-per-user: true is not a"),
        (
            "[sdexec]\nmax-connections = 10\nmax-connections-per-user = 11",
            "sdexec.max-connections-per-user: 11 is more than max-connections (10); accepted: an "
            "integer from 1 to 10",
        ),
        ('[sdexec]\nstate_dir = "/x"', "sdexec.state_dir: unknown key; did you mean 'state-dir'?"),
        ('[exec]\nkill_timeout = "5s"', "did you mean 'kill-timeout'?"),
        ("[exec]\nfrobnicate = 1", "exec.frobnicate: unknown key (known keys: barrier-timeout,"),
        ('[exec.sdexec-properties]\nCPUWeight = "5"', "CPUWeight: not a supported property"),
    ],
)
def test_rejected(text: str, fragment: str) -> None:
    message = error_of(text)
    assert fragment in message
    assert message.startswith("exec.toml: ")
    assert "\n" not in message


def test_table_near_miss() -> None:
    assert error_of('[exce]\nimp = "/x"\n') == (
        "exec.toml: exce: unknown table; did you mean [exec]?"
    )
    assert "did you mean [sdexec]?" in error_of('[sdexc]\nslice = "a.slice"\n')


def test_other_flux_tables_ignored() -> None:
    c = parse_config(
        toml(
            '[resource]\npath = "/etc/flux/R"\n[systemd]\nenable = true\n'
            '[access]\nallow-guest-user = true\n[exec]\nservice = "sdexec"\n'
        )
    )
    assert c.service == "sdexec"


def test_all_errors_reported_one_per_line() -> None:
    message = error_of(
        '[exec]\nkill-timeout = "soon"\nservice = "teleport"\nkill-timout = "5s"\n'
        '[exec.sdexec-properties]\nMemoryMax = 1024\nMemoryHigh = "12Q"\n'
    )
    lines = message.splitlines()
    assert len(lines) == 5
    assert all(line.startswith("exec.toml: exec.") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {
        "exec.kill-timeout",
        "exec.service",
        "exec.kill-timout",
        "exec.sdexec-properties.MemoryMax",
        "exec.sdexec-properties.MemoryHigh",
    }


# --- accepted values ------------------------------------------------------------------------


def test_values_accepted() -> None:
    c = parse_config(
        toml(
            """
            [exec]
            service-override = true
            kill-timeout = "0.5m"
            kill-shell-delay = 0
            max-term-count = 1
            max-kill-count = 3
            max-kill-timeout = "10m"
            term-signal = "TERM"
            kill-signal = 9
            barrier-timeout = "0"
            sdexec-stop-timer-sec = 2.5
            sdexec-stop-timer-signal = "SIGKILL"
            [exec.sdexec-properties]
            MemoryHigh = "1.5G"
            SendSIGKILL = "no"
            [sdexec]
            state-dir = "/var/lib/x"
            slice = "-.slice"
            stdio-eof-timeout = 3
            start-timeout = "1m"
            max-connections = 100
            max-connections-per-user = 7
            request-timeout = "2.5s"
            """
        )
    )
    assert c.service_override is True
    assert c.kill_timeout == 30.0
    assert c.kill_shell_delay == 0.0
    assert c.effective_kill_shell_delay == 0.0
    assert (c.max_term_count, c.max_kill_count) == (1, 3)
    assert c.max_kill_timeout == 600.0
    assert (c.term_signal, c.kill_signal) == (15, 9)
    assert c.barrier_timeout == 0.0
    assert c.sdexec_stop_timer_sec == 2.5
    assert (c.sdexec_stop_timer_signal, c.sdexec_stop_timer_signal_set) == (9, True)
    assert c.unit_properties == (
        UnitProperty("MemoryHigh", "t", 1610612736),
        UnitProperty("SendSIGKILL", "b", False),
    )
    assert c.sdexec.resolved_state_dir() == "/var/lib/x"
    assert c.sdexec.slice == "-.slice"
    assert (c.sdexec.stdio_eof_timeout, c.sdexec.start_timeout) == (3.0, 60.0)
    assert (c.sdexec.max_connections, c.sdexec.max_connections_per_user) == (100, 7)
    assert c.sdexec.request_timeout == 2.5


def test_barrier_timeout_infinite_allowed() -> None:
    assert parse_config(toml('[exec]\nbarrier-timeout = "inf"\n')).barrier_timeout == math.inf


def test_config_is_immutable() -> None:
    c = parse_config(toml('[exec.sdexec-properties]\nMemoryMax = "1G"\n'))
    with pytest.raises(AttributeError):
        c.service = "sdexec"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.sdexec_properties["MemoryMax"] = "2G"  # type: ignore[index]


# --- state dir ------------------------------------------------------------------------------


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir() == "/var/lib/sdexec"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == str(tmp_path / "sdexec")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir() == str(tmp_path / ".local" / "state" / "sdexec")
    assert SiteConfig().resolved_state_dir() == default_state_dir()


# --- to_dict --------------------------------------------------------------------------------


def test_to_dict_defaults() -> None:
    assert ExecConfig().to_dict() == {
        "exec": {
            "service": "rexec",
            "service-override": False,
            "sdexec-stop-timer-sec": 30,
            "kill-timeout": "5s",
            "max-term-count": 2,
            "max-kill-count": 8,
            "term-signal": "SIGTERM",
            "kill-signal": "SIGKILL",
            "barrier-timeout": "30m",
            "testexec": {"allow-guests": False},
        },
        "sdexec": {
            "stdio-eof-timeout": "10s",
            "start-timeout": "30s",
            "max-connections": 4096,
            "max-connections-per-user": 256,
            "request-timeout": "10s",
            "guest-credentials": "imp",
        },
    }


def test_to_dict_round_trips_example() -> None:
    c = load_config(DATA / "full.toml")
    assert parse_config(c.to_dict()) == c


durations = st.one_of(
    st.floats(min_value=0.001, max_value=1e7, allow_nan=False),
    st.integers(min_value=1, max_value=10**6),
).map(float)
signals = st.sampled_from(["SIGTERM", "SIGINT", "SIGKILL", "SIGUSR1", "SIGRTMIN+3", "HUP", 12])


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    ex: dict[str, Any] = {}
    if draw(st.booleans()):
        ex["imp"] = "/usr/libexec/flux/flux-imp"
    ex["service"] = draw(st.sampled_from(["rexec", "sdexec"]))
    if draw(st.booleans()):
        ex["kill-timeout"] = draw(durations)
    if draw(st.booleans()):
        ex["kill-shell-delay"] = draw(durations)
    if draw(st.booleans()):
        ex["barrier-timeout"] = draw(st.sampled_from(["0", "inf", "30m"]))
    if draw(st.booleans()):
        ex["term-signal"] = draw(signals)
    if draw(st.booleans()):
        ex["sdexec-stop-timer-signal"] = draw(signals)
    if draw(st.booleans()):
        ex["sdexec-stop-timer-sec"] = draw(st.integers(min_value=1, max_value=3600))
    if draw(st.booleans()):
        ex["max-kill-count"] = draw(st.integers(min_value=1, max_value=100))
    if draw(st.booleans()):
        ex["sdexec-properties"] = {
            "MemoryMax": draw(st.sampled_from(["90%", "1G", "infinity", "12.5%"]))
        }
    sd: dict[str, Any] = {}
    if draw(st.booleans()):
        sd["start-timeout"] = draw(durations)
    if draw(st.booleans()):
        sd["request-timeout"] = draw(durations)
    if draw(st.booleans()):
        sd["max-connections"] = draw(st.integers(min_value=64, max_value=1 << 18))
        sd["max-connections-per-user"] = draw(st.integers(min_value=1, max_value=64))
    if draw(st.booleans()):
        sd["drain-command"] = ["/bin/echo", "{hostname}", "{reason}"]
    return {"exec": ex, "sdexec": sd}


@given(configs())
def test_to_dict_round_trip_property(data: dict[str, Any]) -> None:
    c = parse_config(data)
    assert parse_config(c.to_dict()) == c
    assert parse_config(c.to_dict()).to_dict() == c.to_dict()


# --- files ----------------------------------------------------------------------------------


def test_load_file(tmp_path: Path) -> None:
    f = tmp_path / "exec.toml"
    f.write_text('[exec]\nkill-timeout = "7s"\n')
    c = load_config(f)
    assert c.kill_timeout == 7.0
    assert c.sources == (str(f),)


def test_malformed_toml(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[exec]\nkill-timeout = "5s\n')
    with pytest.raises(ConfigError) as info:
        load_config(f)
    message = str(info.value)
    assert message.startswith(f"{f}: line 2, column ")
    assert "(at line" not in message
    assert "\n" not in message


def test_semantic_error_names_file(tmp_path: Path) -> None:
    f = tmp_path / "exec.toml"
    f.write_text('[exec]\nservice = "teleport"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(f))
    assert (
        str(info.value)
        == f'{f}: exec.service: "teleport" is not a service (one of "rexec", "sdexec")'
    )
    assert info.value.exit_code == 2


def test_missing_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_config(tmp_path / "nope.toml")


def test_conf_d_merged_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "10-exec.toml").write_text('[exec]\nservice = "sdexec"\n')
    (tmp_path / "20-props.toml").write_text('[exec.sdexec-properties]\nMemoryMax = "1G"\n')
    (tmp_path / "30-more.toml").write_text('[exec.sdexec-properties]\nMemoryHigh = "512M"\n')
    (tmp_path / "00-flux.toml").write_text("[resource]\nnoverify = true\n")
    (tmp_path / "README").write_text("not toml [[[")
    c = load_config(tmp_path)
    assert c.service == "sdexec"
    assert dict(c.sdexec_properties) == {"MemoryMax": "1G", "MemoryHigh": "512M"}
    assert c.sources == tuple(
        str(tmp_path / n) for n in ("00-flux.toml", "10-exec.toml", "20-props.toml", "30-more.toml")
    )


def test_conf_d_duplicate_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[exec]\nkill-timeout = "5s"\n')
    b.write_text('[exec]\nkill-timeout = "6s"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{b}: exec.kill-timeout: already set in {a}")


def test_conf_d_errors_name_the_right_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[exec]\nservice = "teleport"\n')
    b.write_text('[exec.sdexec-properties]\nMemoryMax = "12Q"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{a}: exec.service: ")
    assert lines[1].startswith(f"{b}: exec.sdexec-properties.MemoryMax: ")


def test_conf_d_all_malformed_files_reported(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[exec\n")
    (tmp_path / "b.toml").write_text("x = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert len(str(info.value).splitlines()) == 2


def test_empty_conf_d_gives_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path) == ExecConfig()


def test_default_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_file = tmp_path / "exec.toml"
    monkeypatch.setattr(config_mod, "DEFAULT_CONF_DIR", str(conf_d))
    monkeypatch.setattr(config_mod, "DEFAULT_CONF_FILE", str(conf_file))
    monkeypatch.delenv("SDEXEC_CONFIG", raising=False)
    assert load_config() == ExecConfig()  # nothing there: built-in defaults

    conf_file.write_text('[exec]\nkill-timeout = "1s"\n')
    assert load_config().kill_timeout == 1.0

    conf_d.mkdir()
    (conf_d / "exec.toml").write_text('[exec]\nkill-timeout = "2s"\n')
    assert load_config().kill_timeout == 2.0  # the directory wins over the file

    env_file = tmp_path / "env.toml"
    env_file.write_text('[exec]\nkill-timeout = "3s"\n')
    monkeypatch.setenv("SDEXEC_CONFIG", str(env_file))
    assert load_config().kill_timeout == 3.0

    monkeypatch.setenv("SDEXEC_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml: no such file"):
        load_config()


# --- hostile config paths (issue 9, low): bounded reads, nothing skipped silently ----------


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "exec.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_dev_zero_and_huge_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that would have been read whole
    with pytest.raises(ConfigError, match="at most 1 MiB"):
        load_config(big)


def test_dangling_link_in_conf_d_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    d.mkdir()
    (d / "10-ok.toml").write_text('[exec]\nservice = "sdexec"\n')
    (d / "20-gone.toml").symlink_to(tmp_path / "nowhere.toml")
    with pytest.raises(ConfigError, match="dangling symbolic link") as e:
        load_config(d)
    assert "20-gone.toml" in str(e.value)


def test_guest_credentials_key() -> None:
    assert parse_config({}).sdexec.guest_credentials == "imp"
    cfg = parse_config({"sdexec": {"guest-credentials": "systemd"}})
    assert cfg.sdexec.guest_credentials == "systemd"
    with pytest.raises(ConfigError, match=r'sdexec.guest-credentials: .*"imp".*"systemd"'):
        parse_config({"sdexec": {"guest-credentials": "root"}})
