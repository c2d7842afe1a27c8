"""A job running across `systemctl daemon-reexec` / `daemon-reload` still reports its own status."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import pytest
from dbus_fast import BusType, Message, MessageFlag
from dbus_fast.aio import MessageBus

from sdexec.config.table import ExecConfig
from sdexec.exec.launcher import JobSpec, Launcher
from sdexec.systemd.bus import MANAGER_IFACE, MANAGER_PATH, SYSTEMD

from .conftest import SDEXEC, wait_unit

Config = Callable[..., str]


@pytest.mark.parametrize("action", ["daemon-reexec", "daemon-reload"])
def test_status_survives_systemd_reexec(config: Config, action: str) -> None:
    """The job is running (its unit active) when systemd re-executes or reloads."""
    cfg = config()
    proc = subprocess.Popen(
        [
            *SDEXEC,
            "-v",
            "run",
            "--config",
            cfg,
            "--job",
            f"reexec-{action}",
            "--",
            "sh",
            "-c",
            "sleep 3; echo still-here; exit 42",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_unit(f"shell-0-reexec-{action}.service", ("running",))
    subprocess.run(["systemctl", action], check=True, timeout=120)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 42, err
    assert out == "still-here\n"


REEXEC_REPEATS = 40
REEXEC_HITS = 2


async def _reexec_now(bus: MessageBus) -> None:
    """Ask systemd to re-execute without waiting: it never replies, it leaves the bus."""
    await bus.send(
        Message(
            destination=SYSTEMD,
            path=MANAGER_PATH,
            interface=MANAGER_IFACE,
            member="Reexecute",
            flags=MessageFlag.NO_REPLY_EXPECTED,
        )
    )


async def test_connect_survives_a_reexec_inside_its_window() -> None:
    """A daemon-reexec while the launcher connects: Subscribe/AddMatch are retried, not fatal.

    Each round sends Reexecute, waits a little longer than the round before (0-78 ms), then
    connects a launcher and runs a job to its end (its status only arrives through the signals
    the subscription gives). A round "hits" the window when a connect call got a transient
    error and was retried; the test goes on until it has hit it REEXEC_HITS times, so it proves
    the retry, not just a lucky ordering. Before the fix a hit ended in
    "systemd refused Subscribe: ... (NoReply)".
    """
    watcher = await MessageBus(bus_type=BusType.SYSTEM).connect()
    back: asyncio.Queue[str] = asyncio.Queue()

    def on_owner(msg: Message) -> None:
        if msg.member == "NameOwnerChanged" and msg.body[0] == SYSTEMD and msg.body[2]:
            back.put_nowait(msg.body[2])

    watcher.add_message_handler(on_owner)
    await watcher.call(
        Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',member='NameOwnerChanged',arg0='{SYSTEMD}'"],
        )
    )  # fmt: skip
    hits = rounds = 0
    try:
        for rounds in range(1, REEXEC_REPEATS + 1):
            await _reexec_now(watcher)
            await asyncio.sleep((rounds % 40) * 0.002)
            launcher = Launcher(ExecConfig())
            await launcher.connect()
            try:
                job = await launcher.start(JobSpec(jobid=f"rxc{rounds}", argv=["true"]))
                assert await asyncio.wait_for(job.wait(), 120) == 0
            finally:
                hit = launcher.manager.connect_retries > 0
                await launcher.close()
            await asyncio.wait_for(back.get(), 120)  # systemd is back on the bus
            while not back.empty():
                back.get_nowait()
            hits += hit
            if hits >= REEXEC_HITS:
                break
    finally:
        watcher.disconnect()
    print(f"\nreexec during connect: {hits} hits in {rounds} rounds")
    assert hits >= REEXEC_HITS, f"the window was hit {hits} times in {rounds} rounds"
