"""A property D-Bus cannot carry is a one-line error naming it, never dbus-fast's traceback.

dbus-fast checks values against their signatures only while it builds the message, inside
the StartTransientUnit call: the launcher must turn that into a usage error (issue 10).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from dbus_fast import Message

from sdexec.errors import UsageError
from sdexec.exec.channel import Channels
from sdexec.exec.launcher import Launcher
from sdexec.systemd.start import UnitPlan


class MarshallingManager:
    """Stands in for the bus only as far as a real dbus-fast marshals the call."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def job_call(self, member: str, signature: str, body: Sequence[Any], **kw: Any) -> str:
        msg = Message(path="/org/freedesktop/systemd1", member=member, signature=signature,
                      body=list(body))  # fmt: skip
        self.sent.append(bytes(msg._marshall(False)))
        return "/org/freedesktop/systemd1/job/1"


def _start(extra: tuple[tuple[str, str, Any], ...]) -> MarshallingManager:
    launcher = Launcher()
    manager = MarshallingManager()
    launcher.manager = manager  # type: ignore[assignment]
    plan = UnitPlan(name="shell-0-m.service", argv=("/bin/true",), env={}, cwd="/", extra=extra)
    job = launcher._new_job("m", plan.name, False, False, None, None)
    asyncio.run(launcher._start_unit(plan, Channels(), job))
    return manager


def test_marshallable_properties_are_sent() -> None:
    manager = _start((("DeviceAllow", "a(ss)", [["/dev/null", "rw"]]),))
    assert len(manager.sent) == 1 and b"DeviceAllow" in manager.sent[0]
    # what DeviceAllow was before the fix (tuples, refused by dbus-fast): now converted
    manager = _start((("DeviceAllow", "a(ss)", (("/dev/null", "rw"),)),))
    assert len(manager.sent) == 1 and b"/dev/null" in manager.sent[0]


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        # a struct of the wrong arity: refused by dbus-fast's Variant
        ((("DeviceAllow", "a(ss)", [["/dev/null"]]),), "DeviceAllow"),
        ((("OOMScoreAdjust", "i", 2**40),), "OOMScoreAdjust"),
        # passes the Variant's check, refused only while the message is marshalled
        ((("MemoryMax", "t", 1), ("DevicePolicy", "s", "\udc80")), "DevicePolicy"),
    ],
)
def test_unmarshallable_property_is_one_line_naming_it(
    extra: tuple[tuple[str, str, Any], ...], name: str
) -> None:
    with pytest.raises(UsageError) as info:
        _start(extra)
    message = str(info.value)
    assert message.startswith(f"unit property {name}: cannot be sent to systemd as D-Bus")
    assert "\n" not in message
    assert info.value.exit_code == 2
