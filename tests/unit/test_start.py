"""What goes into StartTransientUnit, decided without a bus."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdexec.errors import CommandNotExecutable, CommandNotFound
from sdexec.exec.command import resolve_program
from sdexec.systemd.start import (
    INFINITY_USEC,
    UnitPlan,
    properties,
    stop_timeout_usec,
    verify_applied,
)


def plan(**kw: object) -> UnitPlan:
    base: dict[str, object] = {
        "name": "shell-0-1.service", "argv": ("/bin/sh", "-c", "echo $HOME"), "env": {"A": "1"},
        "cwd": "/tmp",
    }  # fmt: skip
    base.update(kw)
    return UnitPlan(**base)  # type: ignore[arg-type]


def test_the_properties_of_a_job_unit() -> None:
    props = dict(
        properties(plan(slice="sdexec.slice", fds=(0, 1, 2), extra=(("MemoryMax", "t", 5),)))
    )
    assert props["ExecStartEx"] == (
        "a(sasas)",
        [["/bin/sh", ["/bin/sh", "-c", "echo $HOME"], ["no-env-expand"]]],
    )
    assert props["RemainAfterExit"] == ("b", True)
    assert props["Type"] == ("s", "exec")
    assert props["Environment"] == ("as", ["A=1"])
    assert props["Slice"] == ("s", "sdexec.slice")
    assert props["StandardOutputFileDescriptor"] == ("h", 1)
    assert props["MemoryMax"] == ("t", 5)


def test_without_execstartex_dollars_are_escaped() -> None:
    props = dict(properties(plan(expand_env=True)))
    assert "ExecStartEx" not in props
    assert props["ExecStart"] == ("a(sasb)", [["/bin/sh", ["/bin/sh", "-c", "echo $$HOME"], False]])


def test_systemds_stop_timeout_is_a_backstop_after_ours() -> None:
    assert stop_timeout_usec(2, via_imp=False) == 9_000_000  # 2T + 5 s
    assert stop_timeout_usec(30, via_imp=True) == INFINITY_USEC
    assert stop_timeout_usec(float("inf"), via_imp=False) == INFINITY_USEC


def test_a_limit_systemd_did_not_apply_is_reported() -> None:
    wanted = [
        ("MemoryMax", "t", 48 << 20),
        ("AllowedCPUs", "ay", b"\x0f"),
        ("MemoryMaxScale", "u", 9),
    ]
    assert verify_applied(wanted, {"MemoryMax": 48 << 20, "AllowedCPUs": [15]}) == []
    problems = verify_applied(wanted, {"MemoryMax": 2**64 - 1, "AllowedCPUs": [15]})
    assert len(problems) == 1 and problems[0].startswith("MemoryMax=50331648 was not applied")


def test_programs_are_resolved_like_a_shell(tmp_path: Path) -> None:
    env = {"PATH": f"{tmp_path}:/bin:/usr/bin"}
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert resolve_program("tool", env, "/") == str(tool)
    assert resolve_program("./tool", env, str(tmp_path)) == str(tool)
    with pytest.raises(CommandNotFound, match="no-such: command not found"):
        resolve_program("no-such", env, "/")
    with pytest.raises(CommandNotFound, match="no such file"):
        resolve_program("/no/such/program", env, "/")
    tool.chmod(stat.S_IRUSR)
    if os.geteuid() != 0:  # root may execute anything with an x bit; here there is none
        with pytest.raises(CommandNotExecutable):
            resolve_program(str(tool), env, "/")
    with pytest.raises(CommandNotExecutable):
        resolve_program(str(tmp_path), env, "/")


def test_applied_as_systemd_reads_them_back() -> None:
    """DeviceAllow comes back as tuples, a CPU set padded to whole words (issue 10)."""
    wanted = [("DeviceAllow", "a(ss)", [["/dev/null", "rw"]]), ("AllowedCPUs", "ay", b"\x01")]
    got = {"DeviceAllow": [("/dev/null", "rw")], "AllowedCPUs": b"\x01" + bytes(7)}
    assert verify_applied(wanted, got) == []
    problems = verify_applied(wanted, {"DeviceAllow": [], "AllowedCPUs": b"\x03" + bytes(7)})
    assert [p.split("=")[0] for p in problems] == ["DeviceAllow", "AllowedCPUs"]
