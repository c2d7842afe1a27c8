"""The thin D-Bus layer: one connection to a systemd manager, calls, signals, reconnection.

Everything systemd-specific that is not a method call lives elsewhere; this module knows the
bus. It exists separately because the bus is the part that fails in production: the peer
lessons (docs/design-notes.md) are mostly about it:

- ``Subscribe()`` before expecting signals, and match rules before ``StartTransientUnit``;
- bound the calls in flight (the system bus caps pending replies per connection at 128);
- after a disconnect or a ``daemon-reexec`` signals in between are lost: reconnect with
  back-off, re-subscribe, re-add the matches and let the owner re-read what it tracks.

As root on the system manager it can also talk to systemd directly, on systemd's private
socket (``/run/systemd/private``, what systemctl uses as root): no dbus-daemon in between, so
none of its per-connection caps (match rules, pending replies) and nothing to lose when it
restarts; systemd sends every signal to every direct connection, so there are no match rules
at all. ``connection=`` (or ``$SDEXEC_SYSTEMD_CONNECTION``) picks it: ``bus``, ``direct``,
or ``auto`` (direct when allowed, else the bus; the bus also whenever a direct connect
fails). bench/README.md has the figures behind the default.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import sys
import termios
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from sdexec.errors import LaunchError

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
SLICE_IFACE = "org.freedesktop.systemd1.Slice"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
MAX_IN_FLIGHT = 64
RETRY_FOR = 60.0
CONNECT_TIMEOUT = 5.0
"""Bound on one connection attempt (connect, Hello, matches, Subscribe): then a new one."""
CALL_TIMEOUT = 90.0
"""Bound on one call's reply: longer than dbus-daemon's own 25 s, so ours is the backstop (a
direct connection has no other)."""
TRANSIENT_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.Timeout",
    }
)
"""What a call gets while systemd re-executes or the bus restarts: worth sending again."""
MAX_PENDING_JOBS = 128
"""systemd adds a match rule on its own bus connection for every job a client has queued; at
dbus-daemon's 512 per connection *systemd* is dropped from the bus. Bounding our calls in
flight does not bound queued jobs (StopUnit returns once queued), so jobs get their own bound."""
UNIT_MATCH_MAX = 256
"""Per-unit match rules up to here, then one rule for the unit namespace, filtered in-process:
dbus-daemon refuses more than 512 rules per connection, and the switch must leave room."""
UNIT_NAMESPACE = "/org/freedesktop/systemd1/unit"
SYSTEMD_PRIVATE = "/run/systemd/private"
"""systemd's own socket for direct (peer-to-peer) D-Bus connections; root only."""
CONNECTION_ENV = "SDEXEC_SYSTEMD_CONNECTION"
CONNECTIONS = ("auto", "bus", "direct")
DEFAULT_CONNECTION = "auto"
"""Direct for root on the system manager (bench/README.md: fewer CPU ms per job in systemd
and dbus-daemon, no dbus-daemon caps, every fault test passes), else the bus; the bus also
when a direct connect fails."""
DIRECT_CONNECT_TIMEOUT = 2.0
"""A direct connect that takes longer is given up for the bus (``auto``) or retried."""

PropsHandler = Callable[[str, dict[str, Any]], None]
"""(object path, changed properties unwrapped) -> None"""
PropsFilter = frozenset[str] | None
"""The properties a watcher reads: only those are unwrapped and kept (a unit has ~400)."""
JobRemovedHandler = Callable[[str, str, str], None]
"""(job path, unit name, result) -> None"""


class BusCallError(LaunchError):
    """A D-Bus method call failed; ``name`` is the D-Bus error name."""

    def __init__(self, member: str, name: str, text: str) -> None:
        self.member = member
        self.name = name
        self.text = text
        super().__init__(f"systemd refused {member}: {text} ({name})")


def unwrap(value: Any) -> Any:
    """Variants all the way down to plain Python values."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def _pick(props: dict[str, Any], keys: PropsFilter) -> dict[str, Any]:
    if keys is None:
        return {k: unwrap(v) for k, v in props.items()}
    return {k: unwrap(v) for k, v in props.items() if k in keys}


def _user_bus_address() -> str:
    addr = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if addr:
        return addr
    path = f"/run/user/{os.getuid()}/bus"
    if os.path.exists(path):
        return f"unix:path={path}"
    raise LaunchError(
        "--user: no user bus (DBUS_SESSION_BUS_ADDRESS is unset and "
        f"{path} does not exist; is user@{os.getuid()}.service running?)"
    )


class _DirectBus(MessageBus):
    """dbus-fast on systemd's private socket.

    systemd's sd-bus (252 here) does not look at a message that arrives in the same read as
    the authentication's ``BEGIN`` until more bytes come, and dbus-fast sends its Hello right
    after ``BEGIN``: the connect would then wait forever. So once authenticated this waits
    (bounded) until systemd has read all we sent (``SIOCOUTQ``: our bytes it has not read
    yet) before the Hello goes. systemd answers that Hello with UnknownObject (a direct
    connection has no bus driver), which dbus-fast takes as the connection's name: harmless.
    """

    async def _authenticate(self) -> None:
        await super()._authenticate()
        sock = getattr(self, "_sock", None)
        if sock is None:  # another dbus-fast: the connect timeout covers a lost Hello
            return
        # nothing tells when a peer has read: look again every 0.5 ms, for up to a second
        # (typically systemd has read it by the first look)
        for _ in range(2000):
            if _unread(sock.fileno()) == 0:
                return
            await asyncio.sleep(0.0005)


def _unread(fd: int) -> int:
    """Bytes we wrote on this unix socket that its peer has not read yet."""
    try:
        out = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ
    except OSError:
        return 0
    return int.from_bytes(out, sys.byteorder)


def connection_mode(user: bool, asked: str | None = None) -> str:
    """``bus`` or ``direct``: what ``asked`` (else $SDEXEC_SYSTEMD_CONNECTION, else the
    default) means for this manager; ``auto`` is direct only as root on the system manager
    with systemd's private socket there."""
    mode = asked or os.environ.get(CONNECTION_ENV) or DEFAULT_CONNECTION
    if mode not in CONNECTIONS:
        raise LaunchError(f"${CONNECTION_ENV}: {mode!r} is not one of {', '.join(CONNECTIONS)}")
    allowed = not user and os.geteuid() == 0 and os.path.exists(SYSTEMD_PRIVATE)
    if mode == "direct" and not allowed:
        raise LaunchError(
            f"a direct connection to systemd needs root, the system manager and "
            f"{SYSTEMD_PRIVATE}; use connection 'bus' or 'auto'"
        )
    if mode == "auto":
        return "direct" if allowed else "bus"
    return mode


class Manager:
    """A connection to systemd's manager (system, or the calling user's with ``user=True``).

    ``connection``: ``bus`` (through dbus-daemon), ``direct`` (systemd's private socket) or
    ``auto``; None: ``$SDEXEC_SYSTEMD_CONNECTION``, else DEFAULT_CONNECTION.
    """

    def __init__(
        self,
        *,
        user: bool = False,
        max_in_flight: int = MAX_IN_FLIGHT,
        connection: str | None = None,
    ) -> None:
        self.user = user
        self.connection = connection or os.environ.get(CONNECTION_ENV) or DEFAULT_CONNECTION
        self.direct = False
        """Whether the current connection is the direct one (else through dbus-daemon)."""
        self._bus: MessageBus | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        self._props_handlers: dict[str, tuple[PropsHandler, PropsFilter]] = {}
        self._job_slots = asyncio.Semaphore(MAX_PENDING_JOBS)
        self._pending_jobs: set[str] = set()
        self._removed_jobs: collections.deque[str] = collections.deque(maxlen=4096)
        self._match_lock = asyncio.Lock()
        self._job_handlers: list[JobRemovedHandler] = []
        self._reconnect_handlers: list[Callable[[], Awaitable[None]]] = []
        self._matched: set[str] = set()
        self._namespace_match = False
        self._closing = False
        self._connected = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.reconnects = 0
        """Bus connections made again after a drop."""
        self.reregistrations = 0
        """Times systemd (re)registered on the bus under us (re-exec, or back after a bus
        restart): each a re-subscribe and re-read, but not a reconnect of ours."""
        self.generation = 0
        """Bumped, as soon as it is known, whenever signals may have been lost: the bus
        dropped, or systemd re-registered on it (re-exec). A start compares it."""
        self.connect_retries = 0  # transient errors retried in the connect sequence (tests)
        self._bg: set[asyncio.Task[None]] = set()

    # --- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._connect_once()
        self._watch_task = asyncio.create_task(self._watch(), name="sdexec-bus-watch")

    async def _connect_once(self) -> None:
        """One connection attempt, bounded by CONNECT_TIMEOUT: while dbus-daemon restarts, a
        connect can be accepted and then never answered (issue 9, H5); the caller retries."""
        which = "user" if self.user else "system"
        try:
            await asyncio.wait_for(self._connect_attempt(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise LaunchError(
                f"cannot connect to the {which} bus: no answer within {CONNECT_TIMEOUT:g}s"
            ) from None
        except LaunchError:
            raise
        except Exception as e:  # AuthError, EOF in the handshake...: all worth a retry
            raise LaunchError(f"cannot connect to the {which} bus: {e!r}") from e

    async def _connect_attempt(self) -> None:
        mode = connection_mode(self.user, self.connection)
        bus: MessageBus | None = None
        if mode == "direct":
            bus = await self._connect_direct(fallback=self.connection == "auto")
        self.direct = bus is not None
        if bus is None:
            if self.user:
                bus = MessageBus(bus_address=_user_bus_address(), negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            try:
                await bus.connect()
            except (OSError, DBusError, EOFError) as e:
                which = "user" if self.user else "system"
                raise LaunchError(f"cannot connect to the {which} bus: {e}") from e
        try:
            bus.add_message_handler(self._on_message)
            self._bus = bus
            self._matched.clear()  # a new connection has none of the old rules
            self._namespace_match = False
            if self.direct:
                # every signal comes on a direct connection: no rules; Subscribe is a no-op
                # there but harmless, and says systemd is ready for calls
                await self._retrying(bus, "Subscribe")
                self._connected.set()
                return
            # Signals before Subscribe are not sent (moonshine #124); matches before any start.
            # The calls are independent: sent together, they cost one round trip, not three.
            # Each is idempotent and retried while systemd is away: a daemon-reexec during this
            # sequence answers Subscribe with NoReply, then ServiceUnknown until systemd is
            # back. (If the old systemd answered and then re-executed, NameOwnerChanged,
            # matched first on the same connection, re-subscribes.)
            await asyncio.gather(
                self._add_match(
                    f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',"
                    f"interface='{MANAGER_IFACE}',member='JobRemoved'"
                ),
                self._add_match(
                    f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',"
                    f"arg0='{SYSTEMD}'"
                ),
                self._retrying(bus, "Subscribe"),
            )
            for path in list(self._props_handlers):
                await self._match_unit(path)
        except BaseException:
            # a half-made connection is dropped, never kept (nor its socket leaked)
            if self._bus is bus:
                self._bus = None
            bus.disconnect()
            raise
        self._connected.set()

    async def _connect_direct(self, *, fallback: bool) -> MessageBus | None:
        """A connection on systemd's private socket; None (``fallback``: use the bus) when
        that fails. Without a fallback a refused or reset connect (systemd re-executing: its
        socket is away, or the connection is dropped in the handshake) is tried again with
        back-off, as the bus path retries Subscribe, until CONNECT_TIMEOUT ends the attempt."""
        delay = 0.02
        while True:
            bus = _DirectBus(bus_address=f"unix:path={SYSTEMD_PRIVATE}", negotiate_unix_fd=True)
            try:
                await asyncio.wait_for(bus.connect(), DIRECT_CONNECT_TIMEOUT)
                return bus
            except (OSError, DBusError, EOFError, TimeoutError) as e:
                bus.disconnect()
                if fallback:
                    log.info("direct connection to systemd failed (%r); using the bus", e)
                    return None
                self.connect_retries += 1
                log.info("direct connection to systemd: %r; retrying", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _watch(self) -> None:
        """Reconnect with back-off whenever the connection drops, then tell the owners."""
        while not self._closing:
            bus = self._bus
            if bus is None:
                return
            try:
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            except Exception as e:  # dbus-fast raises the cause (EOFError...): still a drop
                log.debug("bus disconnected: %r", e)
            if self._closing:
                return
            self._connected.clear()
            self.generation += 1
            log.warning("lost the connection to the bus; reconnecting")
            delay = 0.05
            while not self._closing:
                try:
                    await self._connect_once()
                    break
                except LaunchError as e:
                    log.info("reconnect failed (%s); retrying in %.2fs", e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.reconnects += 1
            self._forget_pending_jobs()
            # In the background: if the bus drops again while the units are re-read (a second
            # restart), this loop must be free to see it and reconnect, or the re-read's calls
            # retry on a dead connection that nobody replaces (statuses lost).
            task = asyncio.get_running_loop().create_task(self._resync())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _resync(self) -> None:
        for handler in list(self._reconnect_handlers):
            try:
                await handler()
            except Exception:
                log.exception("re-reading tracked units failed")

    async def close(self) -> None:
        self._closing = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        for task in list(self._bg):  # re-reads in flight: nothing to re-read any more
            task.cancel()
        if self._bus is not None:
            self._bus.disconnect()  # closes the socket now; nothing to wait for
            self._bus = None

    # --- calls ------------------------------------------------------------------------------

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        unix_fds: Sequence[int] = (),
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        destination: str = SYSTEMD,
        retry: bool = False,
    ) -> list[Any]:
        """One method call, bounded in flight; waits out a reconnection first.

        ``retry``: the call is idempotent (StopUnit, KillUnit, GetAll...), so when systemd or
        the bus goes away under it (daemon-reexec answers NoReply; a bus restart drops the
        connection) it is sent again once they are back, for up to RETRY_FOR seconds.

        Every wait is bounded, retried or not: the reconnection by RETRY_FOR, the reply by
        CALL_TIMEOUT. A termination sequence, a stop timer or a drain that calls systemd gets
        a LaunchError in bounded time and goes on (to the next step, the drain), rather than
        stalling on a bus that is not coming back.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR
        delay = 0.05
        while True:
            if not self._connected.is_set():
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._connected.wait()
                except TimeoutError:
                    raise LaunchError(
                        f"{member}: not connected to systemd (no connection within {RETRY_FOR:g}s)"
                    ) from None
            bus = self._bus
            if bus is None:
                raise LaunchError("not connected to systemd")
            try:
                return await self._call_on(
                    bus, member, signature, body, unix_fds, path, interface, destination
                )
            except LaunchError as e:
                transient = not isinstance(e, BusCallError) or e.name in TRANSIENT_ERRORS
                if not (retry and transient) or asyncio.get_running_loop().time() > deadline:
                    raise
                log.info("%s: %s; retrying", member, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _call_on(
        self,
        bus: MessageBus,
        member: str,
        signature: str,
        body: Sequence[Any],
        unix_fds: Sequence[int] = (),
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        destination: str = SYSTEMD,
    ) -> list[Any]:
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            unix_fds=list(unix_fds),
        )
        async with self._slots:
            if not bus.connected:
                # dbus-fast would write to the closed socket and never answer: fail now, the
                # caller waits for the reconnect (or retries)
                raise LaunchError(f"{member}: the bus connection is closed")
            try:
                async with asyncio.timeout(CALL_TIMEOUT):
                    reply = await bus.call(msg)
            except TimeoutError:
                raise LaunchError(f"{member}: no reply from systemd in {CALL_TIMEOUT:g}s") from None
            except (OSError, EOFError) as e:
                raise LaunchError(f"{member}: the bus connection failed: {e}") from e
        if reply is None:
            raise LaunchError(f"{member}: no reply from systemd")
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise BusCallError(member, reply.error_name or "", text)
        return list(reply.body)

    async def get_all(
        self, path: str, interface: str = "", keys: PropsFilter = None
    ) -> dict[str, Any]:
        body = await self.call(
            "GetAll", "s", [interface], path=path, interface=PROPS_IFACE, retry=True
        )
        return _pick(body[0], keys)

    async def get_one(self, path: str, interface: str, name: str) -> Any:
        """One property of one interface of an object (None: this systemd has no such one)."""
        try:
            (value,) = await self.call(
                "Get", "ss", [interface, name], path=path, interface=PROPS_IFACE, retry=True
            )
        except BusCallError as e:
            if "UnknownProperty" in e.name or "InvalidArgs" in e.name:
                return None
            raise
        return unwrap(value)

    async def get_some(self, path: str, names: Sequence[str]) -> dict[str, Any]:
        """A few properties of a unit's Service interface, read together; unknown ones (not
        readable back on this systemd: nothing to compare) left out."""
        got = await asyncio.gather(*(self.get_one(path, SERVICE_IFACE, n) for n in names))
        return {name: value for name, value in zip(names, got, strict=True) if value is not None}

    async def job_call(self, member: str, signature: str, body: Sequence[Any], **kw: Any) -> str:
        """A call that queues a systemd job (Start*/Stop*): bounded until its JobRemoved."""
        await self._job_slots.acquire()
        try:
            (job,) = await self.call(member, signature, body, **kw)
        except BaseException:
            self._job_slots.release()
            raise
        if job in self._removed_jobs:  # finished before the reply reached us
            self._job_slots.release()
        else:
            self._pending_jobs.add(job)
        return str(job)

    def _job_done(self, job: str) -> None:
        if job in self._pending_jobs:
            self._pending_jobs.discard(job)
            self._job_slots.release()
        else:
            self._removed_jobs.append(job)

    def _forget_pending_jobs(self) -> None:
        """After a reconnect no JobRemoved comes for jobs queued before: free their slots."""
        for _ in self._pending_jobs:
            self._job_slots.release()
        self._pending_jobs.clear()

    async def _add_match(self, rule: str) -> None:
        if self._bus is None:
            raise LaunchError("not connected to systemd")
        await self._retrying(
            self._bus, "AddMatch", "s", [rule], "/org/freedesktop/DBus", DBUS, DBUS
        )

    async def _retrying(
        self,
        bus: MessageBus,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        destination: str = SYSTEMD,
    ) -> list[Any]:
        """An idempotent call of the connect sequence, sent again after a transient error.

        Unlike :meth:`call` it does not wait for ``_connected`` (it is part of getting there)
        and gives up at once if the connection itself fails (the reconnect loop handles that).
        """
        deadline = asyncio.get_running_loop().time() + RETRY_FOR
        delay = 0.02
        while True:
            try:
                return await self._call_on(
                    bus, member, signature, body, (), path, interface, destination
                )
            except BusCallError as e:
                if e.name not in TRANSIENT_ERRORS or not bus.connected:
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    raise
                self.connect_retries += 1
                log.info("%s during connect: %s; retrying", member, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # --- signals ----------------------------------------------------------------------------

    async def watch_unit(self, path: str, handler: PropsHandler, keys: PropsFilter = None) -> None:
        """Route ``PropertiesChanged`` of one unit to ``handler``; installed before any start.

        During a reconnect the rule is left to it (it adds one for every watched unit); a
        connection that drops under the AddMatch is waited out the same way.
        """
        self._props_handlers[path] = (handler, keys)
        while True:
            if not self._connected.is_set():
                await self._connected.wait()
            bus = self._bus
            try:
                await self._match_unit(path)
                return
            except LaunchError:
                if self._closing or (self._bus is bus and bus is not None and bus.connected):
                    raise  # refused by a live bus: a real error
                log.debug("%s: the bus dropped under AddMatch; after the reconnect again", path)
                await asyncio.sleep(0.01)  # the watcher has to notice the drop first

    @staticmethod
    def _unit_rule(path: str) -> str:
        return (
            f"type='signal',sender='{SYSTEMD}',path='{path}',"
            f"interface='{PROPS_IFACE}',member='PropertiesChanged'"
        )

    async def _match_unit(self, path: str) -> None:
        if self.direct:
            return  # systemd sends a direct connection every signal
        async with self._match_lock:
            if self._namespace_match or path in self._matched:
                return
            if len(self._matched) < UNIT_MATCH_MAX:
                try:
                    await self._add_match(self._unit_rule(path))
                    self._matched.add(path)
                    return
                except BusCallError as e:
                    if "LimitsExceeded" not in e.name:
                        raise  # a bus with a lower cap than ours: switch now, below
            # Many units: one rule for the whole unit namespace, filtered here by path
            # (never polling ListUnits), and the per-unit rules given back.
            log.info(
                "%d units watched: one match rule for all units from now on", len(self._matched)
            )
            namespace_rule = (
                f"type='signal',sender='{SYSTEMD}',path_namespace='{UNIT_NAMESPACE}',"
                f"interface='{PROPS_IFACE}',member='PropertiesChanged'"
            )
            freed: str | None = None
            try:
                await self._add_match(namespace_rule)
            except BusCallError as e:
                if "LimitsExceeded" not in e.name or not self._matched:
                    raise
                # no room even for that one: give a per-unit rule back first, then re-read
                # that unit (its signals in between may be lost)
                freed = self._matched.pop()
                await self._remove_match(self._unit_rule(freed))
                await self._add_match(namespace_rule)
            self._namespace_match = True
            dropped, self._matched = self._matched, set()
        for old in dropped:
            await self._remove_match(self._unit_rule(old))
        entry = self._props_handlers.get(freed) if freed else None
        if freed and entry is not None:
            handler, keys = entry
            handler(freed, await self.get_all(freed, keys=keys))

    async def _remove_match(self, rule: str) -> None:
        if self._bus is None or not self._bus.connected or self.direct:
            return
        try:
            await self.call(
                "RemoveMatch", "s", [rule],
                path="/org/freedesktop/DBus", interface=DBUS, destination=DBUS,
            )  # fmt: skip
        except LaunchError as e:
            log.debug("RemoveMatch %s: %s", rule, e)

    async def unwatch_unit(self, path: str) -> None:
        self._props_handlers.pop(path, None)
        if path in self._matched:
            self._matched.discard(path)
            await self._remove_match(self._unit_rule(path))

    def on_job_removed(self, handler: JobRemovedHandler) -> Callable[[], None]:
        self._job_handlers.append(handler)
        return lambda: self._job_handlers.remove(handler)

    def on_reconnect(self, handler: Callable[[], Awaitable[None]]) -> None:
        self._reconnect_handlers.append(handler)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "PropertiesChanged":
            entry = self._props_handlers.get(msg.path or "")
            if entry is not None and msg.body and msg.body[0] in (UNIT_IFACE, SERVICE_IFACE):
                handler, keys = entry
                handler(msg.path or "", _pick(msg.body[1], keys))
        elif msg.member == "JobRemoved" and msg.interface == MANAGER_IFACE:
            _id, job, unit, result = msg.body
            self._job_done(job)
            for jh in list(self._job_handlers):
                jh(job, unit, result)
        elif (
            msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == SYSTEMD and msg.body[2]
        ):
            # systemd re-executed (or restarted): it forgot our subscription and we may
            # have missed signals in between.
            self.generation += 1
            log.info("systemd (re)registered on the bus; re-subscribing and re-reading units")
            task = asyncio.get_running_loop().create_task(self._after_reexec())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _after_reexec(self) -> None:
        try:
            await self.call("Subscribe", retry=True)
        except BusCallError as e:
            if "AlreadySubscribed" not in e.name:  # the same manager: nothing was lost
                log.warning("re-subscribe after re-exec failed: %s", e)
        except LaunchError as e:
            log.warning("re-subscribe after re-exec failed: %s", e)
        self.reregistrations += 1
        await self._resync()
