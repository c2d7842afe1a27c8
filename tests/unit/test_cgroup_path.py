"""A unit's cgroup: read at start, to find leftovers once the unit is inactive (Flux #6501).

It is the cgroup of its slice plus its name, so the launcher asks systemd for the slice's once
and for no unit after: one call less per job (~5% of a short job's CPU on the node, bus and
systemd included). The manager is a scripted stand-in; tests/integration/test_cgroup_path.py
holds the paths against a real systemd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdexec.config.table import ExecConfig, SiteConfig
from sdexec.exec.launcher import Launcher
from sdexec.systemd.unitname import object_path

from .test_start_retry import RUNNING, ScriptedManager, _launcher, _spec


class CgroupManager(ScriptedManager):
    """Answers a slice's ControlGroup from ``slices`` (None: not realized) and a unit's with
    ``/elsewhere/`` + its name, recording who was asked what."""

    def __init__(self, slices: dict[str, str | None]) -> None:
        super().__init__(["done"] * 3, [RUNNING])
        self.slices = slices
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    async def get_one(self, path: str, interface: str, name: str) -> Any:
        slice_name = next(s for s in self.slices if object_path(s) == path)
        self.asked.append((slice_name, (name,)))
        return self.slices[slice_name]

    async def get_some(self, path: str, names: Sequence[str]) -> dict[str, Any]:
        self.asked.append(("unit", tuple(names)))
        return {"ControlGroup": "/elsewhere/u.service"} if "ControlGroup" in names else {}


async def test_the_slice_is_asked_once_and_no_unit() -> None:
    m = CgroupManager({"system.slice": "/system.slice"})
    launcher = _launcher(m)
    jobs = [await launcher.start(_spec(f"c{i}")) for i in range(3)]
    assert m.asked == [("system.slice", ("ControlGroup",))]
    assert [j.cgroup for j in jobs] == [f"/system.slice/shell-0-c{i}.service" for i in range(3)]


async def test_a_configured_slice_is_the_one_asked() -> None:
    m = CgroupManager({"sdexec-jobs.slice": "/sdexec.slice/sdexec-jobs.slice"})
    launcher = Launcher(ExecConfig(sdexec=SiteConfig(start_timeout=2.0, slice="sdexec-jobs.slice")))
    launcher.manager = m  # type: ignore[assignment]
    m.launcher = launcher
    job = await launcher.start(_spec("s1"))
    assert job.cgroup == "/sdexec.slice/sdexec-jobs.slice/shell-0-s1.service"


async def test_a_slice_not_realized_yet_leaves_it_to_the_unit_and_is_asked_again() -> None:
    m = CgroupManager({"system.slice": None})
    launcher = _launcher(m)
    first = await launcher.start(_spec("n1"))
    assert first.cgroup == "/elsewhere/u.service"  # what the unit said
    m.slices["system.slice"] = "/system.slice"
    second = await launcher.start(_spec("n2"))
    assert second.cgroup == "/system.slice/shell-0-n2.service"
    assert m.asked == [
        ("system.slice", ("ControlGroup",)),
        ("unit", ("ControlGroup",)),
        ("system.slice", ("ControlGroup",)),
    ]


async def test_a_user_managers_units_are_asked_one_by_one() -> None:
    m = CgroupManager({"app.slice": "/user.slice/user-1000.slice/user@1000.service/app.slice"})
    m.user = True
    launcher = _launcher(m)
    for i in range(2):
        await launcher.start(_spec(f"e{i}"))
    assert m.asked == [("unit", ("ControlGroup",))] * 2
