"""Connection admission for ``sdexec serve``: who may hold how many connections, and fd limits.

The server runs as root and its socket is world-writable, so one user must not be able to use
up what every user's jobs need: each connection holds a descriptor (four until its job's unit
has the client's stdio), and at the descriptor limit ``accept()`` fails and ``recvmsg()``
drops the stdio a client sent (issue 9, H2/H3). The caps here are checked at ``accept()``,
from the peer's uid (SO_PEERCRED), before a byte of the request is read: a refused client
costs the server one ``send()`` and one ``close()``.

Pure bookkeeping (no socket, no event loop), so the policy is unit-tested as it is.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

FDS_PER_CONNECTION = 4
"""A connection's socket and, until the unit holds its own copies, the client's three stdio."""
FDS_RESERVED = 256
"""The bus, the state database, a drain command's pipes, logging: what no connection may take."""


@dataclass(frozen=True)
class Limits:
    """``[sdexec] max-connections`` and ``max-connections-per-user``."""

    total: int
    per_user: int


class Admission:
    """Counts open connections per peer uid; says whether one more may be served.

    ``exempt`` uids (root, and the server's own user: the instance owner, whose jobs the
    resource manager starts) count towards the total only; every other uid is also held to
    ``per_user``, so one user cannot keep the others out.
    """

    def __init__(self, limits: Limits, exempt: frozenset[int]) -> None:
        self.limits = limits
        self.exempt = exempt
        self.total = 0
        self.by_uid: Counter[int] = Counter()
        self.refused = 0

    def admit(self, uid: int) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        if self.total >= self.limits.total:
            self.refused += 1
            return (
                f"the sdexec server is busy ({self.total} connections open, the most "
                "[sdexec] max-connections allows); retry later"
            )
        if uid not in self.exempt and self.by_uid[uid] >= self.limits.per_user:
            self.refused += 1
            return (
                f"the sdexec server is busy for uid {uid} ({self.by_uid[uid]} of its "
                "connections open, the most [sdexec] max-connections-per-user allows); "
                "retry later"
            )
        self.total += 1
        self.by_uid[uid] += 1
        return None

    def release(self, uid: int) -> None:
        """A connection admitted for ``uid`` is closed."""
        if self.by_uid[uid] <= 0:
            raise ValueError(f"release of uid {uid} that holds no connection")
        self.total -= 1
        self.by_uid[uid] -= 1
        if not self.by_uid[uid]:
            del self.by_uid[uid]


def raise_fd_limit() -> int:
    """Soft descriptor limit = hard (the unit's ``LimitNOFILE=`` sets both; a server started
    another way gets what its hard limit allows): returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. a hard limit above fs.nr_open
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return int(soft)


def fds_needed(limits: Limits) -> int:
    """Descriptors the server may need with every admitted connection open."""
    return limits.total * FDS_PER_CONNECTION + FDS_RESERVED
