"""The launcher's start when systemd or the bus goes away under it (issue 9, H5 and the
daemon-reexec item): what it decides from what systemd says. The manager is a scripted stand-in
(the real one is exercised in the node by tests/integration/test_server_load.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from sdexec.config.table import ExecConfig, SiteConfig
from sdexec.errors import LaunchError
from sdexec.exec.channel import DEVNULL
from sdexec.exec.launcher import Job, JobSpec, Launcher
from sdexec.systemd.bus import BusCallError

NO_REPLY = BusCallError("StartTransientUnit", "org.freedesktop.DBus.Error.NoReply", "gone")
RUNNING = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running",
           "ExecMainPID": 4242, "Job": [0, "/"]}  # fmt: skip
QUEUED = {"LoadState": "loaded", "ActiveState": "inactive", "Job": [7, "/job/7"]}
DROPPED = {"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead",
           "ExecMainPID": 0, "ExecMainCode": 0, "Result": "success", "Job": [0, "/"]}  # fmt: skip
NOT_FOUND = {"LoadState": "not-found", "ActiveState": "inactive"}


class ScriptedManager:
    """Answers StartTransientUnit from ``starts`` (an exception, or the start job's result sent
    as JobRemoved, or None: no JobRemoved ever) and GetAll from ``states`` (the last repeats)."""

    user = False  # the system manager

    def __init__(self, starts: list[Any], states: list[dict[str, Any]]) -> None:
        self.starts = starts
        self.states = states
        self.sent: list[list[int]] = []
        self.calls: list[str] = []
        self.generation = 0
        self.launcher: Launcher | None = None
        self.start_sent = asyncio.Event()
        self.state_read = asyncio.Event()

    async def watch_unit(self, path: str, handler: Any, keys: Any = None) -> None:
        pass

    async def unwatch_unit(self, path: str) -> None:
        pass

    async def job_call(self, member: str, signature: str, body: Sequence[Any], **kw: Any) -> str:
        self.calls.append(member)
        if member != "StartTransientUnit":
            return "/job/stop"
        self.sent.append(list(kw["unix_fds"]))
        self.start_sent.set()
        outcome = self.starts.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        path = f"/job/{len(self.sent)}"
        if outcome is not None:
            assert self.launcher is not None
            unit = body[0]
            asyncio.get_running_loop().call_soon(self.launcher._on_job_removed, path, unit, outcome)
        return path

    async def call(self, member: str, *args: Any, **kw: Any) -> list[Any]:
        self.calls.append(member)
        return []

    async def get_all(self, path: str, interface: str = "", keys: Any = None) -> dict[str, Any]:
        self.calls.append("GetAll")
        self.state_read.set()
        return dict(self.states.pop(0) if len(self.states) > 1 else self.states[0])

    async def get_some(self, path: str, names: Sequence[str]) -> dict[str, Any]:
        return {"ControlGroup": "/sdexec.slice/x.service"}

    async def get_one(self, path: str, interface: str, name: str) -> Any:
        return None  # the slice's cgroup unknown: the unit is asked (test_cgroup_path.py)


def _launcher(manager: ScriptedManager) -> Launcher:
    launcher = Launcher(ExecConfig(sdexec=SiteConfig(start_timeout=2.0)))
    launcher.manager = manager  # type: ignore[assignment]
    manager.launcher = launcher
    return launcher


def _spec(jobid: str) -> JobSpec:
    return JobSpec(jobid=jobid, argv=["/bin/true"], env={"PATH": "/bin"}, cwd="/",
                   stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)  # fmt: skip


async def test_no_reply_and_no_unit_sends_the_start_again_with_the_same_stdio() -> None:
    m = ScriptedManager([NO_REPLY, "done"], [NOT_FOUND, RUNNING])
    job = await _launcher(m).start(_spec("r1"))
    assert isinstance(job, Job) and job.pid == 4242
    assert m.calls.count("StartTransientUnit") == 2
    assert m.sent[0] == m.sent[1] and len(m.sent[0]) == 3


async def test_no_reply_but_the_unit_exists_is_followed_not_started_twice() -> None:
    m = ScriptedManager([NO_REPLY], [RUNNING])  # its JobRemoved was lost: never comes
    job = await _launcher(m).start(_spec("r2"))
    assert job.pid == 4242
    assert m.calls.count("StartTransientUnit") == 1


async def test_no_reply_with_the_start_job_still_queued_waits_for_its_jobremoved() -> None:
    m = ScriptedManager([NO_REPLY], [QUEUED, RUNNING])
    launcher = _launcher(m)
    task = asyncio.ensure_future(launcher.start(_spec("r3")))
    await m.state_read.wait()
    done, _ = await asyncio.wait({task}, timeout=0.05)
    assert not done  # queued: its JobRemoved will come on the live connection
    launcher._on_job_removed("/job/7", "shell-0-r3.service", "done")
    assert (await task).pid == 4242


async def test_jobremoved_lost_in_a_reconnect_is_settled_by_the_resync() -> None:
    m = ScriptedManager([None], [RUNNING])  # the start went through; its JobRemoved did not
    launcher = _launcher(m)
    task = asyncio.ensure_future(launcher.start(_spec("r4")))
    await m.start_sent.wait()
    await asyncio.sleep(0)
    await launcher.resync()  # what the bus's reconnect handler calls
    assert (await asyncio.wait_for(task, 1)).pid == 4242


async def test_a_start_job_systemd_dropped_across_a_reexec_is_started_again() -> None:
    m = ScriptedManager([None, "done"], [DROPPED, RUNNING])
    launcher = _launcher(m)
    task = asyncio.ensure_future(launcher.start(_spec("r5")))
    await m.start_sent.wait()
    m.generation += 1  # systemd re-registered on the bus
    launcher._on_job_removed("/job/1", "shell-0-r5.service", "failed")
    assert (await asyncio.wait_for(task, 1)).pid == 4242
    assert m.calls.count("StartTransientUnit") == 2
    assert "ResetFailedUnit" in m.calls


async def test_a_start_job_that_failed_without_a_reexec_is_a_failure() -> None:
    m = ScriptedManager(["failed"], [DROPPED])
    with pytest.raises(LaunchError, match="could not be started: start job failed"):
        await _launcher(m).start(_spec("r6"))
    assert m.calls.count("StartTransientUnit") == 1


async def test_a_unit_collected_before_the_resync_settles_the_start() -> None:
    m = ScriptedManager([None], [NOT_FOUND])
    launcher = _launcher(m)
    task = asyncio.ensure_future(launcher.start(_spec("r7")))
    await m.start_sent.wait()
    await asyncio.sleep(0)
    await launcher.resync()
    with pytest.raises(LaunchError, match="could not be started: start job collected"):
        await asyncio.wait_for(task, 1)


async def test_the_dead_unit_of_a_dropped_start_is_waited_away_then_started_again() -> None:
    exists = BusCallError("StartTransientUnit", "org.freedesktop.systemd1.UnitExists", "exists")
    m = ScriptedManager([None, exists, "done"], [DROPPED, DROPPED, RUNNING])
    launcher = _launcher(m)
    task = asyncio.ensure_future(launcher.start(_spec("r8")))
    await m.start_sent.wait()
    m.generation += 1
    launcher._on_job_removed("/job/1", "shell-0-r8.service", "failed")
    assert (await asyncio.wait_for(task, 5)).pid == 4242
    assert m.calls.count("StartTransientUnit") == 3


async def test_unit_exists_on_a_resend_after_no_reply_is_our_start_followed() -> None:
    exists = BusCallError("StartTransientUnit", "org.freedesktop.systemd1.UnitExists", "exists")
    m = ScriptedManager([NO_REPLY, exists], [NOT_FOUND, RUNNING])
    job = await _launcher(m).start(_spec("r9"))
    assert job.pid == 4242
    assert m.calls.count("StartTransientUnit") == 2


async def test_unit_exists_on_a_first_start_is_still_refused() -> None:
    exists = BusCallError("StartTransientUnit", "org.freedesktop.systemd1.UnitExists", "exists")
    m = ScriptedManager([exists, exists], [RUNNING])
    with pytest.raises(LaunchError, match="already exists and is not failed"):
        await _launcher(m).start(_spec("r10"))


async def test_a_late_jobremoved_of_a_dropped_start_does_not_end_the_next_one() -> None:
    m = ScriptedManager([None, None], [DROPPED, DROPPED, RUNNING])
    launcher = _launcher(m)
    task = asyncio.ensure_future(launcher.start(_spec("r11")))
    await m.start_sent.wait()
    m.start_sent.clear()
    m.generation += 1
    await launcher.resync()  # settles the first attempt from the state (dropped): again
    await asyncio.wait_for(m.start_sent.wait(), 5)
    launcher._on_job_removed("/job/1", "shell-0-r11.service", "failed")  # late, the first's
    done, _ = await asyncio.wait({task}, timeout=0.05)
    assert not done, "the first attempt's JobRemoved ended the second"
    launcher._on_job_removed("/job/2", "shell-0-r11.service", "done")
    assert (await asyncio.wait_for(task, 1)).pid == 4242


async def test_a_start_job_over_the_timeout_that_ran_is_followed() -> None:
    m = ScriptedManager([None], [RUNNING])  # no JobRemoved within start-timeout (0.2 s)
    launcher = _launcher(m)
    launcher.config = ExecConfig(sdexec=SiteConfig(start_timeout=0.2))
    assert (await launcher.start(_spec("r12"))).pid == 4242


async def test_a_start_job_still_queued_at_the_timeout_is_cancelled_retry() -> None:
    m = ScriptedManager([None], [QUEUED])
    launcher = _launcher(m)
    launcher.config = ExecConfig(sdexec=SiteConfig(start_timeout=0.2))
    with pytest.raises(LaunchError, match=r"did not start .* within 0.2s.*did not run; retry"):
        await launcher.start(_spec("r13"))
    assert "StopUnit" in m.calls
