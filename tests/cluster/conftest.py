"""The Slurm cluster tests: real slurmctld/slurmd/munge and sdexec servers in three systemd
containers (``containers/cluster``), driven from this host through ``containers/cluster exec``.

Run with ``containers/cluster test`` (it boots the cluster and sets ``SDEXEC_CLUSTER``).
Every test starts from idle, undrained nodes with the cluster's own sdexec config, and ends
with no job unit left on any node: that is part of what each test checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CLUSTER = os.environ.get("SDEXEC_CLUSTER", "")
NODES = ("node1", "node2")
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = "/run/sdexec-test-hold"
HELD_SHELL = "/usr/local/bin/sdexec-test-held-shell"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not CLUSTER:
        raise pytest.UsageError(
            "tests/cluster need the Slurm test cluster: run them with `containers/cluster test`"
        )


def on(
    host: str, script: str, *, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a shell script on a host of the cluster (as root); its output."""
    p = subprocess.run(
        [CLUSTER, "exec", host, "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"on {host}: {script!r} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def start(host: str, script: str) -> subprocess.Popen[str]:
    """Start a script on a host in the background (srun that a test interrupts or watches)."""
    return subprocess.Popen(
        [CLUSTER, "exec", host, "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 60) -> object:
    """Until ``predicate`` holds (asked every 0.2 s), else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def read_lines(
    proc: subprocess.Popen[str], count: int, pattern: str, timeout: float = 60
) -> list[str]:
    """Read ``proc``'s stdout until ``count`` lines match ``pattern``; those lines."""
    assert proc.stdout is not None
    found: list[str] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        assert time.monotonic() < deadline, f"no {count} lines matching {pattern!r} in time"
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"output ended before {count} lines matched {pattern!r}: {found}")
        if re.search(pattern, line):
            found.append(line.strip())
    return found


def job_units(host: str) -> list[str]:
    out = on(
        host,
        "systemctl list-units --all --plain --no-legend 'shell-*.service' 'imp-shell-*.service'",
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def node_states() -> dict[str, str]:
    out = on("ctl", "sinfo -h -N -o '%N %t'").stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def drain_reasons() -> dict[str, str]:
    out = on("ctl", "sinfo -h -R -o '%n|%E'").stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


BASE_CONF = "/etc/sdexec/conf.d/50-cluster.toml"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    out = [f"[{prefix}]"] if prefix and scalars else []
    out += [f"{json.dumps(k) if '.' in k else k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        out.append(_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out) + "\n"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def configure(text: str, hosts: tuple[str, ...] = NODES) -> None:
    """The cluster's sdexec config with ``text`` (TOML) laid over it, on the nodes; the next
    job's server reads it (a conf.d may set a key only once: the file is replaced)."""
    with open(os.path.join(SRC, "containers", "cluster.d", "exec.toml"), "rb") as f:
        base = tomllib.load(f)
    merged = _toml(_merge(base, tomllib.loads(text)))
    for host in hosts:
        on(
            host,
            f"cat > {BASE_CONF} <<'EOF'\n{merged}EOF\nsystemctl stop sdexec.service 2>/dev/null",
        )


def hold_shells(host: str) -> None:
    """The next job shells on ``host`` wait (before their barrier) until release_shells()."""
    on(
        host,
        f"rm -f {HOLD} && mkfifo {HOLD} && cat > {HELD_SHELL} <<'EOF'\n"
        "#!/bin/sh\n# test job-shell: held until the test writes to the fifo\n"
        f'read _ < {HOLD}\nexec /opt/sdexec/bin/python -m sdexec.exec.shell "$@"\nEOF\n'
        f"chmod 755 {HELD_SHELL}",
    )


def release_shells(host: str) -> None:
    on(host, f"timeout 20 sh -c 'echo go > {HOLD}'")


def reset_cluster() -> None:
    for host in NODES:
        on(
            host,
            f"install -m 0644 /src/containers/cluster.d/exec.toml {BASE_CONF}; "
            f"rm -f {HOLD} /tmp/sdexec-test-* /etc/sdexec/conf.d/6*.toml; "
            "systemctl stop sdexec.service 2>/dev/null; systemctl reset-failed sdexec.service "
            "sdexec.socket; systemctl start sdexec.socket; sdexec drain clear >/dev/null",
        )
    wait_for("nodes to finish their jobs", lambda: all(
        s in ("idle", "drain", "drng") for s in node_states().values()))  # fmt: skip
    if drain_reasons():
        on("ctl", "scontrol update NodeName=node1,node2 State=RESUME", check=False)
    wait_for("both nodes idle", lambda: set(node_states().values()) == {"idle"})


def no_job_units() -> dict[str, list[str]]:
    """Every node's job units once none is left (waits for the termination sequences)."""
    left: dict[str, list[str]] = {}

    def none_left() -> bool:
        left.clear()
        left.update({h: u for h in NODES if (u := job_units(h))})
        return not left

    try:
        wait_for("every job unit to end", none_left, timeout=90)
    except AssertionError:
        raise AssertionError(f"job units left behind: {left}") from None
    return left


@pytest.fixture(autouse=True)
def clean_cluster() -> Iterator[None]:
    reset_cluster()
    yield
    no_job_units()
