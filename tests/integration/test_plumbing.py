"""The plumbing, with nothing of ours in between: from Python, over the system bus, start a
transient /bin/true with MemoryMax and see it finish with status 0 through PropertiesChanged."""

from __future__ import annotations

import asyncio
import os

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

UNIT = f"plumbing-{os.getpid()}.service"


async def test_transient_true_with_memorymax() -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    path = "/org/freedesktop/systemd1/unit/" + "".join(
        c if c.isalnum() else f"_{ord(c):02x}" for c in UNIT
    )
    changes: list[dict[str, object]] = []
    done = asyncio.Event()

    def on_msg(msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.path == path:
            props = {k: v.value for k, v in msg.body[1].items()}
            changes.append(props)
            if props.get("ExecMainCode") is not None and props.get("ExecMainCode") != 0:
                done.set()

    bus.add_message_handler(on_msg)

    async def call(member: str, sig: str, body: list[object], **kw: str) -> Message:
        reply = await bus.call(
            Message(
                destination=kw.get("dest", "org.freedesktop.systemd1"),
                path=kw.get("path", "/org/freedesktop/systemd1"),
                interface=kw.get("iface", "org.freedesktop.systemd1.Manager"),
                member=member,
                signature=sig,
                body=body,
            )
        )
        assert reply is not None
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return reply

    await call(
        "AddMatch",
        "s",
        [f"type='signal',path='{path}'"],
        dest="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        iface="org.freedesktop.DBus",
    )
    await call("Subscribe", "", [])
    props = [
        ["ExecStart", Variant("a(sasb)", [["/bin/true", ["/bin/true"], False]])],
        ["MemoryMax", Variant("t", 64 * 1024 * 1024)],
        ["RemainAfterExit", Variant("b", True)],
    ]
    await call("StartTransientUnit", "ssa(sv)a(sa(sv))", [UNIT, "fail", props, []])
    await asyncio.wait_for(done.wait(), 10)
    final: dict[str, object] = {}
    for c in changes:
        final.update(c)
    assert final["ExecMainCode"] == 1  # CLD_EXITED
    assert final["ExecMainStatus"] == 0
    reply = await call(
        "GetAll",
        "s",
        ["org.freedesktop.systemd1.Service"],
        path=path,
        iface="org.freedesktop.DBus.Properties",
    )
    assert reply.body[0]["MemoryMax"].value == 64 * 1024 * 1024
    await call("StopUnit", "ss", [UNIT, "fail"])
    bus.disconnect()
