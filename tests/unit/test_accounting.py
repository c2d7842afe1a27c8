"""End-of-job accounting (issue 14): what the shell measures, what the launcher makes of it,
and the JSON shape scripts read. The real figures are the integration tests'
(tests/integration/test_accounting.py); here the pure parts, and the shell's notify protocol
against a real datagram socket standing in for systemd's."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sdexec.exec import accounting as acct
from sdexec.exec.accounting import FIGURES, Accounting
from sdexec.exec.command import BUILTIN_SHELL
from sdexec.jobexec.handle import Handle
from sdexec.protocol.args import build_parser
from sdexec.protocol.request import outcome, wants_accounting
from sdexec.systemd.start import UnitPlan, properties

HYBRID = """\
9:name=systemd:/sdexec.slice/shell-0-7.service
8:pids:/sdexec.slice/shell-0-7.service
7:blkio:/sdexec.slice/shell-0-7.service
4:memory:/sdexec.slice/shell-0-7.service
2:cpuacct:/
1:cpu:/
0::/sdexec.slice/shell-0-7.service
"""
UNIFIED = "0::/system.slice/shell-0-8.service\n"

SCHEMA: dict[str, tuple[type, ...]] = {
    "wall_time": (float,),
    "cpu_time": (float,),
    "cpu_user": (float,),
    "cpu_system": (float,),
    "memory_peak": (int,),
    "io_read_bytes": (int,),
    "io_write_bytes": (int,),
    "tasks_peak": (int,),
}


def check_schema(report: dict[str, Any]) -> None:
    """Every figure key is there, a number of its type or None (never a string, never 0 for
    unknown: that is the caller's to check), and ``sources`` names where each came from."""
    assert set(report) == {*FIGURES, "sources"}, report
    for key, types in SCHEMA.items():
        value = report[key]
        assert value is None or (isinstance(value, types) and not isinstance(value, bool)), (
            key,
            value,
        )
        assert value is None or (isinstance(value, int | float) and value >= 0), (key, value)
    assert isinstance(report["sources"], dict)
    assert set(report["sources"]) <= set(FIGURES)
    for key, value in report.items():
        if key != "sources" and value is not None:
            assert key in report["sources"], key


def rusage(**kw: float) -> SimpleNamespace:
    base = dict(ru_utime=0.25, ru_stime=0.125, ru_maxrss=4096, ru_inblock=8, ru_oublock=2)
    base.update(kw)
    return SimpleNamespace(**base)


# --- the unit's own cgroup, read from inside ---------------------------------------------------


def test_own_cgroups_keeps_only_controllers_realized_for_the_unit() -> None:
    groups = acct.own_cgroups(HYBRID)
    # cpu/cpuacct at "/" are the machine's: never reported as the job's
    assert groups == {
        "systemd": "/sdexec.slice/shell-0-7.service",
        "pids": "/sdexec.slice/shell-0-7.service",
        "blkio": "/sdexec.slice/shell-0-7.service",
        "memory": "/sdexec.slice/shell-0-7.service",
        "": "/sdexec.slice/shell-0-7.service",
    }
    assert acct.own_cgroups("0::/\n") == {}  # the root: nothing of ours
    assert acct.own_cgroups("garbage") == {}


def test_cgroup_figures_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    d = tmp_path / "system.slice" / "shell-0-8.service"
    d.mkdir(parents=True)
    (d / "memory.peak").write_text("209715200\n")
    (d / "pids.peak").write_text("3\n")
    (d / "io.stat").write_text("8:0 rbytes=1000 wbytes=24 rios=2 wios=1\n8:16 rbytes=5 wbytes=0\n")
    assert acct.cgroup_figures(UNIFIED, root=str(tmp_path)) == {
        "memory_peak": 209715200,
        "tasks_peak": 3,
        "io_read_bytes": 1005,
        "io_write_bytes": 24,
    }


def test_cgroup_figures_v1_hybrid(tmp_path: Path) -> None:
    rel = "sdexec.slice/shell-0-7.service"
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    (tmp_path / "unified" / rel).mkdir(parents=True)  # no memory.peak on a hybrid's v2 tree
    for name in ("memory", "pids", "blkio"):
        (tmp_path / name / rel).mkdir(parents=True)
    (tmp_path / "memory" / rel / "memory.max_usage_in_bytes").write_text("217206784\n")
    (tmp_path / "pids" / rel / "pids.peak").write_text("2\n")
    (tmp_path / "blkio" / rel / "blkio.throttle.io_service_bytes").write_text(
        "8:0 Read 52428800\n8:0 Write 4096\n8:0 Sync 0\n8:0 Total 52432896\nTotal 52432896\n"
    )
    assert acct.cgroup_figures(HYBRID, root=str(tmp_path)) == {
        "memory_peak": 217206784,
        "tasks_peak": 2,
        "io_read_bytes": 52428800,
        "io_write_bytes": 4096,
    }


def test_cgroup_figures_without_files_gives_nothing(tmp_path: Path) -> None:
    assert acct.cgroup_figures(HYBRID, root=str(tmp_path)) == {}
    # blkio realized but no IO at all: only "Total 0", which is no device line
    rel = "sdexec.slice/shell-0-7.service"
    (tmp_path / "blkio" / rel).mkdir(parents=True)
    (tmp_path / "blkio" / rel / "blkio.throttle.io_service_bytes").write_text("Total 0\n")
    assert acct.cgroup_figures(HYBRID, root=str(tmp_path)) == {}


# --- the status text: the shell writes it, the launcher parses it ----------------------------


def test_measure_and_parse_round_trip() -> None:
    text = acct.measure(rusage(), 1.5, proc_self_cgroup="0::/\n")
    assert text.startswith("sdexec-accounting ")
    got = acct.parse_status(text)
    assert got == {
        "wall_time": (1.5, "shell"),
        "cpu_user": (0.25, "rusage"),
        "cpu_system": (0.125, "rusage"),
        "memory_peak": (4096 * 1024, "rusage"),  # ru_maxrss is KiB
        "io_read_bytes": (8 * 512, "rusage"),  # 512-byte blocks
        "io_write_bytes": (2 * 512, "rusage"),
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ready",
        "sdexec-accountingX memory_peak=1/cgroup",
        "sdexec-accounting memory_peak=-5/cgroup",
        "sdexec-accounting memory_peak=abc/cgroup",
        "sdexec-accounting cpu_user=nan/rusage",
        "sdexec-accounting cpu_user=inf/rusage",
        "sdexec-accounting memory_peak=1e30/cgroup",
        "sdexec-accounting memory_peak=5/elsewhere",
        "sdexec-accounting evil=1/cgroup",
        "sdexec-accounting " + "x" * 100000,
    ],
)
def test_a_malformed_or_hostile_status_gives_nothing(text: str) -> None:
    assert acct.parse_status(text) == {}


def test_parse_status_keeps_the_well_formed_part() -> None:
    got = acct.parse_status("sdexec-accounting memory_peak=12/cgroup junk tasks_peak=x/cgroup")
    assert got == {"memory_peak": (12, "cgroup")}


# --- the launcher's merge, and the report's shape ----------------------------------------------


def test_nothing_known_is_null_not_zero() -> None:
    report = Accounting().as_dict()
    check_schema(report)
    assert all(report[k] is None for k in FIGURES)
    assert report["sources"] == {}


def test_systemd_figures_win_and_unset_ones_are_null() -> None:
    a = Accounting()
    a.note_wall_time(0.3)
    a.update_from_unit(
        {
            "StatusText": acct.measure(rusage(), 0.2, proc_self_cgroup="0::/\n"),
            "CPUUsageNSec": (1 << 64) - 1,  # "[not set]" (v1 without cpuacct)
            "MemoryPeak": 300 << 20,  # systemd 254+: the host's own
            "IOReadBytes": (1 << 64) - 1,
            "ExecMainStartTimestampMonotonic": 1_000_000,
            "ExecMainExitTimestampMonotonic": 3_500_000,
        }
    )
    report = a.as_dict()
    check_schema(report)
    assert report["memory_peak"] == 300 << 20 and report["sources"]["memory_peak"] == "systemd"
    assert report["wall_time"] == 2.5 and report["sources"]["wall_time"] == "systemd"
    assert report["cpu_time"] == 0.375 and report["sources"]["cpu_time"] == "rusage"


def test_cpu_time_is_user_plus_system_when_the_shell_split_it() -> None:
    """systemd's CPUUsageNSec (v2) counts the shell's start-up: never next to a split."""
    a = Accounting()
    a.update_from_unit(
        {
            "StatusText": acct.measure(rusage(), 0.2, proc_self_cgroup="0::/\n"),
            "CPUUsageNSec": 2_483_172_000,
        }
    )
    report = a.as_dict()
    assert report["cpu_time"] == report["cpu_user"] + report["cpu_system"] == 0.375
    assert report["io_read_bytes"] == 4096 and report["sources"]["io_read_bytes"] == "rusage"
    assert report["tasks_peak"] is None


def test_without_a_shell_report_only_what_systemd_and_the_launcher_know() -> None:
    a = Accounting()
    a.note_wall_time(0.25)
    a.update_from_unit({"StatusText": "", "CPUUsageNSec": 42_000_000})
    report = a.as_dict()
    check_schema(report)
    assert report["wall_time"] == 0.25 and report["sources"]["wall_time"] == "launcher"
    assert report["cpu_time"] == 0.042 and report["cpu_user"] is None
    assert report["memory_peak"] is None


def test_record_round_trip() -> None:
    a = Accounting()
    a.update_from_unit({"StatusText": acct.measure(rusage(), 1.0, proc_self_cgroup="0::/\n")})
    stored = json.loads(json.dumps(a.as_dict()))  # as the state database keeps it
    again = Accounting.from_dict(stored).as_dict()
    assert again == a.as_dict()
    check_schema(Accounting.from_dict({"memory_peak": "lots", "cpu_user": -1}).as_dict())
    assert Accounting.from_dict(None).as_dict() == Accounting().as_dict()


def test_human_line_reads_like_systemd_run() -> None:
    a = Accounting()
    a.update_from_unit({"StatusText": acct.measure(rusage(), 0.141, proc_self_cgroup="0::/\n")})
    line = acct.human_line("shell-0-1.service", "success", "code=exited/status=0", a.as_dict())
    assert line == (
        "sdexec: shell-0-1.service: Finished with result: success; "
        "Main process terminated with: code=exited/status=0; Service runtime: 141ms; "
        "CPU time consumed: 375ms (user 250ms, system 125ms); Memory peak: 4.0M; "
        "IO bytes read: 4.0K, written: 1.0K; Tasks peak: n/a"
    )
    unknown = acct.human_line("u", None, "status unknown", Accounting().as_dict())
    assert "Memory peak: n/a" in unknown and "CPU time consumed: n/a" in unknown


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0000005, "0us"), (0.141, "141ms"), (2.5, "2.500s"), (62.0, "1min 2.000s"),
     (3723.0, "1h 2min 3s")],
)  # fmt: skip
def test_format_timespan(seconds: float, text: str) -> None:
    assert acct.format_timespan(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0B"), (1023, "1023B"), (1536, "1.5K"), (217206784, "207.1M")]
)
def test_format_bytes(n: int, text: str) -> None:
    assert acct.format_bytes(n) == text


class _Shell:
    """A finished shell as the report reads it (pure: no unit behind it)."""

    def __init__(self, name: str, returncode: int, result: str) -> None:
        self.name = name
        self.pid = 7
        self.returncode = returncode
        self.exit_code = returncode if returncode >= 0 else 128 - returncode
        self.result = result
        self.error = None
        self.memory_note = None
        self.accounting = Accounting()
        self.accounting.update_from_unit(
            {"StatusText": acct.measure(rusage(), 0.5, proc_self_cgroup="0::/\n")}
        )


def test_the_json_report_pins_keys_and_types_per_shell() -> None:
    shells = [_Shell("shell-0-j.service", 0, "success"), _Shell("shell-1-j.service", -9, "signal")]
    handle = Handle(jobid="j", service="sdexec", jobs=shells)  # type: ignore[arg-type]
    code, lines = outcome(handle, handle.exit_code(), json_out=True, verbose=True)
    assert code == 137
    report = json.loads(lines[0])
    assert [s["unit"] for s in report["shells"]] == ["shell-0-j.service", "shell-1-j.service"]
    for shell in report["shells"]:
        assert {"result", "exit_code", "returncode", "signal", "accounting"} <= set(shell)
        check_schema(shell["accounting"])
    assert report["shells"][1]["signal"] == 9
    # -v: one line per shell, last, systemd-run's wording
    assert lines[-2].startswith("sdexec: shell-0-j.service: Finished with result: success;")
    assert "code=killed/signal=SIGKILL" in lines[-1]


def test_json_and_verbose_ask_for_accounting() -> None:
    parse = build_parser("run").parse_args
    assert not wants_accounting(parse(["run", "--", "true"]))
    assert wants_accounting(parse(["run", "--json", "--", "true"]))
    assert wants_accounting(parse(["run", "-v", "--", "true"]))  # after run: the server's
    assert wants_accounting(parse(["-v", "run", "--", "true"]))  # before run: in-process
    assert parse(["-vv", "run", "--", "true"]).verbose == 2  # not reset by run's own -v


def test_unit_properties_when_accounting() -> None:
    plan = UnitPlan(name="u.service", argv=("/bin/true",), env={}, cwd="/", accounting=True)
    names = dict(properties(plan))
    assert names["NotifyAccess"] == ("s", "main")
    assert names["IOAccounting"] == ("b", True)
    assert "NotifyAccess" not in dict(properties(UnitPlan("u", ("/bin/true",), {}, "/")))
    # a notify unit (the IMP's) hears its main process already; a site's setting stays its own
    imp = UnitPlan(
        "u", ("/bin/true",), {}, "/", type="notify", accounting=True,
        extra=(("IOAccounting", "b", False),),
    )  # fmt: skip
    props = properties(imp)
    assert "NotifyAccess" not in dict(props)
    assert [v for k, v in props if k == "IOAccounting"] == [("b", False)]


# --- the shell's side: a real process, a datagram socket standing in for systemd's ----------


def _fake_systemd(path: str, messages: list[tuple[bytes, list[int]]]) -> threading.Thread:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)

    def serve() -> None:
        with sock:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
                messages.append((data, fds))
                for fd in fds:
                    os.close(fd)  # the barrier: "processed"
                if data == b"BARRIER=1":
                    return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_the_shell_reports_its_commands_figures_then_exits_like_it(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    messages: list[tuple[bytes, list[int]]] = []
    t = _fake_systemd(path, messages)
    env = {**os.environ, "NOTIFY_SOCKET": path, "SDEXEC_ACCOUNTING": "1"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    code = "import os; x = bytearray(40 << 20); os.kill(os.getpid(), 15)"
    p = subprocess.run(
        [*BUILTIN_SHELL, sys.executable, "-c", code], env=env, timeout=60, check=False
    )
    t.join(10)
    assert p.returncode == -15  # died like its command: the report changes nothing of that
    (status, fds), (barrier, barrier_fds) = messages
    assert barrier == b"BARRIER=1" and len(barrier_fds) == 1 and not fds
    got = acct.parse_status(status.decode().removeprefix("STATUS="))
    assert got["cpu_user"][1] == "rusage" and got["cpu_user"][0] + got["cpu_system"][0] > 0
    assert got["memory_peak"][0] >= 40 << 20  # this host's cgroup or the command's maxrss
    assert not math.isnan(got["wall_time"][0]) and got["wall_time"][1] == "shell"


def test_the_shell_says_nothing_unless_asked(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    env = {**os.environ, "NOTIFY_SOCKET": path, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SDEXEC_ACCOUNTING", None)
    p = subprocess.run([*BUILTIN_SHELL, "true"], env=env, timeout=60, check=False)
    assert p.returncode == 0
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    sock.close()


def test_the_shells_command_does_not_inherit_the_request(tmp_path: Path) -> None:
    env = {
        **os.environ, "SDEXEC_ACCOUNTING": "1", "NOTIFY_SOCKET": str(tmp_path / "none"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }  # fmt: skip
    p = subprocess.run(
        [*BUILTIN_SHELL, "sh", "-c", 'echo "[$SDEXEC_ACCOUNTING]"'],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # a nested shell in the job must not report (systemd would not hear it anyway)
    assert (p.returncode, p.stdout) == (0, "[]\n"), p.stderr
