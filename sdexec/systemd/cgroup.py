"""Reading and killing a unit's cgroup from outside systemd: leftovers must be seen.

A unit can report inactive while processes remain in its cgroup (``KillMode=process``, an IMP
that died: Flux #6501); only the cgroup tells. Shared by the launcher and the test IMP, and
stdlib-only, since the IMP starts for every guest job.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable

CGROUP_ROOT = "/sys/fs/cgroup"


def is_unified(root: str = CGROUP_ROOT) -> bool:
    """True on a cgroup v2 host (cgroup2 mounted at ``root``)."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def unit_cgroup_dir(control_group: str, root: str = CGROUP_ROOT) -> str | None:
    """The cgroupfs directory of a unit's ``ControlGroup`` property, if it exists.

    On v1/hybrid hosts systemd tracks processes in its own ``name=systemd`` hierarchy.
    """
    if not control_group or not control_group.startswith("/"):
        return None
    rel = control_group.lstrip("/")
    # cgroup v2; else the hybrid hosts' unified tree (the one systemd tracks processes with,
    # private to a container's cgroup namespace), else v1's name=systemd hierarchy.
    bases = (
        [root]
        if is_unified(root)
        else [os.path.join(root, "unified"), os.path.join(root, "systemd")]
    )
    for base in bases:
        path = os.path.join(base, rel)
        if os.path.isdir(path):
            return path
    return None


def cgroup_pids(directory: str) -> set[int]:
    """Every process in the cgroup and its descendants (a job may create sub-cgroups)."""
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.update(int(line) for line in f if line.strip())
        except (FileNotFoundError, ProcessLookupError):
            continue  # a sub-cgroup removed while we walked
        except OSError as e:
            if e.errno != errno.ENODEV:  # ENODEV: the cgroup was being removed as we read it
                raise
            continue
    return pids


def kill_cgroup(directory: str, *, exclude: Iterable[int] = (), passes: int = 3) -> int:
    """SIGKILL every process in the cgroup but ``exclude``; return how many were signalled.

    Several passes, since a process may fork between the read and the kill.
    """
    skip = set(exclude)
    killed = 0
    for _ in range(passes):
        victims = cgroup_pids(directory) - skip
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
