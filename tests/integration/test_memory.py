"""sdexec-properties reach the unit, and a memory limit is enforced and reported (issue 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

from .conftest import run_sdexec

Config = Callable[..., str]

ALLOC = "b = bytearray(300 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\nprint('survived')"


def _show(unit: str, *props: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", unit, *(f"--property={p}" for p in props)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_memory_max_kills_and_is_reported(config: Config) -> None:
    cfg = config('[exec.sdexec-properties]\nMemoryMax = "48M"\n')
    p = run_sdexec("run", "--config", cfg, "--job", "mem1", "--", sys.executable, "-c", ALLOC)
    assert p.returncode == 137, (p.stdout, p.stderr)
    assert "survived" not in p.stdout
    assert "memory limit" in p.stderr and "MemoryMax=48M" in p.stderr, p.stderr


def test_memory_limit_is_on_the_unit(config: Config) -> None:
    """The limit is 48 MiB in the unit's own cgroup (v1 memory.limit_in_bytes here)."""
    cfg = config('[exec.sdexec-properties]\nMemoryMax = "48M"\n')
    script = textwrap.dedent("""
        import pathlib
        for line in pathlib.Path('/proc/self/cgroup').read_text().splitlines():
            _, ctrl, path = line.split(':', 2)
            if ctrl == 'memory':
                v1 = pathlib.Path('/sys/fs/cgroup/memory' + path, 'memory.limit_in_bytes')
                print(v1.read_text().strip())
            elif ctrl == '':
                f = pathlib.Path('/sys/fs/cgroup' + path, 'memory.max')
                if f.exists():
                    print(f.read_text().strip())
    """)
    p = run_sdexec("run", "--config", cfg, "--job", "mem2", "--", sys.executable, "-c", script)
    assert p.returncode == 0, p.stderr
    assert str(48 * 1024 * 1024) in p.stdout.split(), p.stdout


def test_memory_properties_and_percentages_reach_the_unit(config: Config) -> None:
    """On the hybrid node MemoryHigh/Min/Low are not enforced: the site accepts that here
    (allow-unenforced) to see them reach the unit; on v2 they are enforced and checked."""
    cfg = config(
        '[exec.sdexec-properties]\nMemoryMax = "90%"\nMemoryHigh = "1G"\n'
        'MemoryMin = "16M"\nMemoryLow = "50%"\n',
        sdexec='allow-unenforced = ["MemoryHigh", "MemoryMin", "MemoryLow"]\n',
    )
    # The job reads its own unit's properties while it runs.
    p = run_sdexec(
        "run",
        "--config",
        cfg,
        "--job",
        "mem3",
        "--",
        "systemctl",
        "show",
        "shell-0-mem3.service",
        "--property=MemoryMax",
        "--property=MemoryHigh",
        "--property=MemoryMin",
        "--property=MemoryLow",
    )
    assert p.returncode == 0, p.stderr
    props = dict(line.split("=", 1) for line in p.stdout.splitlines())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert props["MemoryHigh"] == str(1024**3)
    assert props["MemoryMin"] == str(16 * 1024**2)
    # percentages are of physical memory, as systemd computes them (page-rounded)
    assert abs(int(props["MemoryMax"]) - total * 0.9) < total * 0.01, props
    assert abs(int(props["MemoryLow"]) - total * 0.5) < total * 0.01, props
