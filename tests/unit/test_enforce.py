"""What the kernel applied, on fake cgroup trees: v2, hybrid (memory on v1), not mounted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.config.properties import cpuset_bitmap
from sdexec.systemd.enforce import (
    bitmap_cpus,
    check_cgroup,
    controller_hierarchy,
    format_cpus,
    parse_cpus,
    unenforceable,
)
from sdexec.systemd.gate import Gate

UNIT = "/sdexec.slice/shell-0-1.service"
PAGE = 4096


def _v2(tmp_path: Path, files: dict[str, str], controllers: str = "cpuset cpu memory pids") -> str:
    root = tmp_path / "cg"
    unit = root / UNIT.lstrip("/")
    unit.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    for name, text in files.items():
        (unit / name).write_text(text + "\n")
    return str(root)


def _hybrid(tmp_path: Path, v1: dict[str, dict[str, str]]) -> str:
    root = tmp_path / "cg"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("\n")
    for controller, files in v1.items():
        d = root / controller / UNIT.lstrip("/")
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text + "\n")
    return str(root)


def test_v2_matching_limits_pass(tmp_path: Path) -> None:
    root = _v2(
        tmp_path,
        {"memory.max": str(64 << 20), "memory.high": "max", "cpuset.cpus.effective": "0-1,3"},
    )
    applied = {
        "MemoryMax": 64 << 20,
        "MemoryHigh": 2**64 - 1,
        "AllowedCPUs": cpuset_bitmap("0,1,3"),
    }
    assert check_cgroup(applied, UNIT, root=root, page=PAGE) == []


def test_v2_mismatch_names_property_expected_found_and_hint(tmp_path: Path) -> None:
    root = _v2(tmp_path, {"cpuset.cpus.effective": "0-1"})
    problems = check_cgroup({"AllowedCPUs": cpuset_bitmap("0-3")}, UNIT, root=root, page=PAGE)
    assert problems == [
        "AllowedCPUs not enforced: expected 0-3 got 0-1 "
        "(is the cpuset controller delegated, and are those CPUs/nodes online?)"
    ]


def test_v2_missing_file_is_a_mismatch(tmp_path: Path) -> None:
    root = _v2(tmp_path, {})
    (problem,) = check_cgroup({"MemoryHigh": 1 << 30}, UNIT, root=root, page=PAGE)
    assert problem.startswith("MemoryHigh not enforced: expected 1073741824 got no such file")


def test_memory_limits_compare_rounded_to_pages(tmp_path: Path) -> None:
    """A percentage gives bytes that are no page multiple; the kernel rounds down."""
    root = _v2(tmp_path, {"memory.max": str(1000 * PAGE)})
    assert check_cgroup({"MemoryMax": 1000 * PAGE + 123}, UNIT, root=root, page=PAGE) == []
    (problem,) = check_cgroup({"MemoryMax": 999 * PAGE}, UNIT, root=root, page=PAGE)
    assert f"expected {999 * PAGE} got {1000 * PAGE}" in problem


def test_hybrid_checks_v1_memory_max_and_skips_v2_only(tmp_path: Path) -> None:
    root = _hybrid(tmp_path, {"memory": {"memory.limit_in_bytes": str(48 << 20)}})
    assert check_cgroup({"MemoryMax": 48 << 20, "MemoryHigh": 1 << 20}, UNIT, root=root) == []
    (problem,) = check_cgroup({"MemoryMax": 32 << 20}, UNIT, root=root)
    assert problem.startswith(f"MemoryMax not enforced: expected {32 << 20} got {48 << 20}")


def test_hybrid_v1_unlimited_reads_as_max(tmp_path: Path) -> None:
    root = _hybrid(tmp_path, {"memory": {"memory.limit_in_bytes": "9223372036854771712"}})
    assert check_cgroup({"MemoryMax": 2**64 - 1}, UNIT, root=root) == []


def test_unenforceable_on_hybrid_names_v2_only_limits(tmp_path: Path) -> None:
    root = _hybrid(tmp_path, {"memory": {}, "cpuset": {}, "pids": {}})
    assert controller_hierarchy("memory", root) == "v1"
    bad = unenforceable(
        ["MemoryMax", "MemoryHighScale", "MemoryMin", "MemoryLow", "MemorySwapMax",
         "AllowedCPUs", "AllowedMemoryNodes", "TasksMax", "OOMScoreAdjust"],
        root,
    )  # fmt: skip
    assert sorted(bad) == [
        "AllowedCPUs", "AllowedMemoryNodes", "MemoryHigh", "MemoryLow", "MemoryMin",
        "MemorySwapMax",
    ]  # fmt: skip
    assert "memory controller is on cgroup v1" in bad["MemoryHigh"]
    assert "\n" not in bad["MemoryHigh"]


def test_unenforceable_on_v2_only_missing_controllers(tmp_path: Path) -> None:
    root = _v2(tmp_path, {}, controllers="cpu memory pids")
    assert unenforceable(["MemoryHigh", "AllowedCPUs"], root) == {
        "AllowedCPUs": "the cpuset controller is not mounted on this host"
    }


@given(st.frozensets(st.integers(0, 300)))
def test_cpu_lists_round_trip(ids: frozenset[int]) -> None:
    assert parse_cpus(format_cpus(ids)) == ids
    if ids:
        assert bitmap_cpus(cpuset_bitmap(format_cpus(ids))) == ids


def test_gate_word_waits_in_the_fifo_until_read(tmp_path: Path) -> None:
    gate = Gate()
    try:
        argv = gate.wrap(["/bin/echo", "$HOME", "a b"])
        assert argv[:2] == ("/bin/sh", "-c") and argv[3] == gate.path
        assert oct(os.stat(gate.dir).st_mode & 0o777) == "0o700"
        gate.open()
        with open(gate.path) as f:  # the reader comes after the word was written
            assert f.readline() == "go\n"
    finally:
        gate.close()
    assert not os.path.exists(gate.dir)


@pytest.mark.parametrize("word", [b"go\n", b"no\n"])
def test_gate_shell_runs_the_program_only_on_go(tmp_path: Path, word: bytes) -> None:
    gate = Gate()
    try:
        proc = subprocess.Popen(
            [*gate.wrap(["/bin/echo", "$HOME", "a b"])], stdout=subprocess.PIPE, text=True
        )
        if word == b"go\n":
            gate.open()
        else:
            fd = os.open(gate.path, os.O_RDWR)
            os.write(fd, word)
            proc.wait(timeout=10)
            os.close(fd)
        out, _ = proc.communicate(timeout=10)
    finally:
        gate.close()
    if word == b"go\n":
        assert proc.returncode == 0 and out == "$HOME a b\n"
    else:
        assert proc.returncode == 125 and out == ""
