"""What the kernel applied: a configured limit is only a limit if the unit's cgroup has it.

systemd accepts MemoryHigh, AllowedCPUs... on any host and silently does nothing where the
controller is not on cgroup v2 (these project's hosts: memory, cpuset, devices on v1), or not
delegated, or where the request cannot be met (AllowedCPUs=0-3 on 2 CPUs gives 0-1). So:

- before anything starts, :func:`unenforceable` names every configured limit this host's
  hierarchy cannot enforce (refused unless ``[sdexec] allow-unenforced`` lists it);
- after the unit started, and before the job's own code runs (the launcher's start gate),
  :func:`check_cgroup` reads the unit's cgroup files and names every mismatch.

Stdlib only, and pure except for reading files under ``root``, so it is unit-tested on a fake
cgroup tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdexec.config.memory import UINT64_MAX
from sdexec.config.properties import ENFORCED
from sdexec.systemd.cgroup import CGROUP_ROOT, is_unified


@dataclass(frozen=True)
class Check:
    """Where the kernel shows one property: controller, v2 file, v1 file (None: v2 only)."""

    controller: str
    v2_file: str
    v1_file: str | None
    kind: str  # "bytes", "cpus" or "count"


CHECKS: Mapping[str, Check] = {
    "MemoryMax": Check("memory", "memory.max", "memory.limit_in_bytes", "bytes"),
    "MemoryHigh": Check("memory", "memory.high", None, "bytes"),
    "MemoryMin": Check("memory", "memory.min", None, "bytes"),
    "MemoryLow": Check("memory", "memory.low", None, "bytes"),
    "MemorySwapMax": Check("memory", "memory.swap.max", None, "bytes"),
    "AllowedCPUs": Check("cpuset", "cpuset.cpus.effective", None, "cpus"),
    "AllowedMemoryNodes": Check("cpuset", "cpuset.mems.effective", None, "cpus"),
    "TasksMax": Check("pids", "pids.max", "pids.max", "count"),
}
"""Properties the kernel enforces and shows in a file. DeviceAllow/DevicePolicy are enforced
too (a BPF program on v2, devices.list on v1) but show no value to compare: tests prove them."""
assert set(CHECKS) <= ENFORCED, "a checked property missing from config.properties.ENFORCED"
HINTS = {
    "memory": "is the memory controller on cgroup v2 and delegated?",
    "cpuset": "is the cpuset controller delegated, and are those CPUs/nodes online?",
    "pids": "is the pids controller enabled?",
}


def base_name(name: str) -> str:
    """MemoryMaxScale (a percentage) is MemoryMax to the kernel."""
    return name.removesuffix("Scale")


def controller_hierarchy(controller: str, root: str = CGROUP_ROOT) -> str | None:
    """ "v2", "v1" or None (not mounted) for one controller on this host."""
    if is_unified(root):
        try:
            with open(os.path.join(root, "cgroup.controllers")) as f:
                return "v2" if controller in f.read().split() else None
        except OSError:
            return None
    unified = os.path.join(root, "unified", "cgroup.controllers")
    try:
        with open(unified) as f:
            if controller in f.read().split():
                return "v2"
    except OSError:
        pass
    return "v1" if os.path.isdir(os.path.join(root, controller)) else None


def unenforceable(names: Iterable[str], root: str = CGROUP_ROOT) -> dict[str, str]:
    """Configured properties this host cannot enforce, each with the reason (one line)."""
    out: dict[str, str] = {}
    for name in names:
        check = CHECKS.get(base_name(name))
        if check is None:
            continue
        where = controller_hierarchy(check.controller, root)
        prop = base_name(name)
        if where is None:
            out[prop] = f"the {check.controller} controller is not mounted on this host"
        elif where == "v1" and check.v1_file is None:
            out[prop] = (
                f"the {check.controller} controller is on cgroup v1 here, and {prop} needs "
                "cgroup v2 (systemd accepts it and the kernel ignores it)"
            )
    return out


def parse_cpus(text: str) -> frozenset[int]:
    """A kernel CPU/node list ("0-3,5") as a set; empty text is the empty set."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(ids)


def format_cpus(ids: Iterable[int]) -> str:
    """A set as the kernel writes it: "0-3,5"; "" for none."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def bitmap_cpus(value: bytes | Sequence[int]) -> frozenset[int]:
    """systemd's D-Bus CPU bitmap (byte i bit j = CPU 8i+j) as a set."""
    return frozenset(i * 8 + j for i, b in enumerate(bytes(value)) for j in range(8) if b >> j & 1)


def _expected_bytes(value: int, page: int) -> str:
    """The kernel keeps memory limits in pages: a limit reads back rounded down to one."""
    if value >= UINT64_MAX:
        return "max"
    return str(value // page * page)


def _v1_bytes(text: str) -> str:
    """v1 writes "no limit" as the largest page multiple below 2**63."""
    return "max" if text.isdigit() and int(text) >= 2**63 - 2**20 else text


def read_text(path: str) -> str | None:
    """A sysfs/cgroupfs file's stripped text, or None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def check_cgroup(
    applied: Mapping[str, Any],
    control_group: str,
    *,
    root: str = CGROUP_ROOT,
    page: int | None = None,
) -> list[str]:
    """Mismatches between what systemd says it applied and the unit's cgroup files.

    ``applied``: property name -> value as systemd reports it (MemoryMax in bytes even for a
    percentage; AllowedCPUs as its bitmap). One line per mismatch, e.g. ``AllowedCPUs not
    enforced: expected 0-1 got 0-3 (is the cpuset controller delegated...?)``.
    """
    page = page or os.sysconf("SC_PAGE_SIZE")
    unified = is_unified(root)
    problems: list[str] = []
    for name, value in applied.items():
        check = CHECKS.get(name)
        if check is None:
            continue
        if unified:
            path = os.path.join(root, control_group.lstrip("/"), check.v2_file)
        else:
            where = controller_hierarchy(check.controller, root)
            if where == "v2":
                path = os.path.join(root, "unified", control_group.lstrip("/"), check.v2_file)
            elif where == "v1" and check.v1_file is not None:
                # systemd mirrors the unit's ControlGroup in each v1 hierarchy it manages
                rel = control_group.lstrip("/")
                path = os.path.join(root, check.controller, rel, check.v1_file)
            else:
                continue  # refused (or explicitly allowed) before the start
        got = read_text(path)
        if check.kind == "cpus":
            want_set = bitmap_cpus(value) if not isinstance(value, str) else parse_cpus(value)
            if not want_set:
                continue  # empty: systemd leaves the set unrestricted
            want = format_cpus(want_set)
            ok = got is not None and parse_cpus(got) == want_set
        elif check.kind == "bytes":
            want = _expected_bytes(int(value), page)
            shown = got if unified or got is None or check.v1_file is None else _v1_bytes(got)
            ok = shown == want
            got = shown
        else:
            want = "max" if int(value) >= UINT64_MAX else str(int(value))
            ok = got == want
        if not ok:
            found = "no such file" if got is None else (got or "(empty)")
            problems.append(
                f"{name} not enforced: expected {want} got {found} ({HINTS[check.controller]})"
            )
    return problems
