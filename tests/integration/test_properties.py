"""Every converted sdexec-property reaches the started unit, and the kernel where it can say.

Issue 10: DeviceAllow crashed in dbus-fast before the unit existed. These start real units
with each converted property and read them back from systemd (the job asks about its own
unit while it runs) and, where this host's cgroup v1 controllers enforce them, from the
unit's cgroup files and /proc.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable

import pytest

from sdexec.systemd.cgroup import is_unified

from .conftest import run_sdexec

Config = Callable[..., str]
# These read v1 controller files (devices.list, pids.max) from the job's /proc/self/cgroup; the
# pure-v2 node's equivalents are tests/integration/test_cgroup_v2.py (devices opened, limits
# read back from the unified tree).
pytestmark = pytest.mark.skipif(
    is_unified(), reason="reads cgroup v1 controller files; test_cgroup_v2.py covers pure v2"
)

# Runs as the job: its own cgroup file (v1 controller CTRL), one line per file asked for.
CGROUP_FILE = textwrap.dedent("""
    import pathlib, sys
    paths = dict(l.split(':', 2)[1:] for l in pathlib.Path('/proc/self/cgroup').read_text().split())
    for arg in sys.argv[1:]:
        ctrl, name = arg.split('/')
        print(arg, pathlib.Path(f'/sys/fs/cgroup/{ctrl}{paths[ctrl]}/{name}').read_text().strip())
""")


DEVICE_SCRIPT = CGROUP_FILE + textwrap.dedent("""
    import subprocess
    unit = next(l.split(':', 2)[2] for l in open('/proc/self/cgroup').read().split()
                if l.startswith('0::')).rsplit('/', 1)[1]
    print(subprocess.run(['systemctl', 'show', unit, '--property=DeviceAllow',
                          '--property=DevicePolicy'], capture_output=True, text=True).stdout)
    with open('/dev/null', 'w') as f:
        f.write('x')
    print('null: written')
    try:
        open('/dev/zero', 'rb').read(1)
        print('zero: read')
    except OSError as e:
        print('zero:', e.strerror)
""")


def _devices(cfg: str, job: str) -> list[str]:
    p = run_sdexec(
        "run", "--config", cfg, "--job", job, "--",
        sys.executable, "-c", DEVICE_SCRIPT, "devices/devices.list",
    )  # fmt: skip
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p.stdout.splitlines()


def test_device_allow_is_enforced_in_the_devices_cgroup(config: Config) -> None:
    """``/dev/null rw`` alone (strict policy): v1 devices.list is exactly ``c 1:3 rw``."""
    cfg = config(
        '[exec.sdexec-properties]\nDeviceAllow = "/dev/null rw"\nDevicePolicy = "strict"\n',
        sdexec='allow-properties = ["DevicePolicy"]\n',
    )
    lines = _devices(cfg, "dev1")
    assert "DeviceAllow=/dev/null rw" in lines
    assert "DevicePolicy=strict" in lines
    listed = [line for line in lines if line.startswith("devices/devices.list ")]
    assert listed == ["devices/devices.list c 1:3 rw"], lines
    assert "null: written" in lines
    assert "zero: Operation not permitted" in lines, lines


def test_device_allow_adds_to_systemds_default_list(config: Config) -> None:
    """With the default policy (auto) a listed device joins systemd's pseudo-devices."""
    cfg = config('[exec.sdexec-properties]\nDeviceAllow = "/dev/kmsg r"\n')
    lines = _devices(cfg, "dev2")
    assert "DeviceAllow=/dev/kmsg r" in lines
    assert "DevicePolicy=auto" in lines
    # the whole list follows the first line (the file is printed as read)
    start = next(i for i, line in enumerate(lines) if line.startswith("devices/devices.list "))
    listed = [lines[start].split(" ", 1)[1], *lines[start + 1 :]]
    assert "c 1:11 r" in listed, lines  # /dev/kmsg
    assert "c 1:3 rwm" in listed  # /dev/null: systemd's own list
    assert not any(entry.startswith(("a ", "c 1:1 ")) for entry in listed), lines  # no /dev/mem
    assert "zero: read" in lines


def test_every_converted_property_reaches_the_unit(config: Config) -> None:
    cfg = config(
        """
        [exec.sdexec-properties]
        AllowedCPUs = "0"
        AllowedMemoryNodes = "0"
        OOMScoreAdjust = "500"
        TasksMax = "4096"
        SendSIGKILL = "no"
        TimeoutStopUSec = "90000000"
        MemorySwapMax = "1G"
        MemoryHigh = "50%"
        """,
        # what v1 cannot enforce is refused unless accepted: here only reaching the unit counts
        sdexec='allow-unenforced = ["AllowedCPUs", "AllowedMemoryNodes", "MemorySwapMax", '
        '"MemoryHigh"]\n',
    )
    names = ["AllowedCPUs", "AllowedMemoryNodes", "OOMScoreAdjust", "TasksMax", "SendSIGKILL",
             "TimeoutStopUSec", "MemorySwapMax", "MemoryHigh"]  # fmt: skip
    script = CGROUP_FILE + textwrap.dedent(f"""
        import subprocess
        print(subprocess.run(['systemctl', 'show', 'shell-0-props1.service',
                              *('--property=' + n for n in {names!r})],
                             capture_output=True, text=True).stdout)
        print('oom_score_adj', open('/proc/self/oom_score_adj').read().strip())
    """)
    p = run_sdexec(
        "run", "--config", cfg, "--job", "props1", "--",
        sys.executable, "-c", script, "pids/pids.max",
    )  # fmt: skip
    assert p.returncode == 0, (p.stdout, p.stderr)
    shown = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert shown["AllowedCPUs"] == "0"
    assert shown["AllowedMemoryNodes"] == "0"
    assert shown["OOMScoreAdjust"] == "500"
    assert shown["TasksMax"] == "4096"
    assert shown["SendSIGKILL"] == "no"
    assert shown["TimeoutStopUSec"] == "1min 30s"
    assert shown["MemorySwapMax"] == str(1024**3)
    assert int(shown["MemoryHigh"]) > 0  # a share of physical memory, from MemoryHighScale
    lines = p.stdout.splitlines()
    # what the kernel applies, where this host's v1 controllers enforce it
    assert "oom_score_adj 500" in lines, p.stdout
    assert "pids/pids.max 4096" in lines, p.stdout
