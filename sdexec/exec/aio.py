"""The one "first of these, then cancel the rest" helper every waiting loop here uses.

3.11's ``TaskGroup`` cancels siblings only when one fails, not when one finishes, and
``asyncio.timeout`` only bounds wall time, which the fake-clock state machines cannot use; so
the race of two waits (a deadline or a wake-up, a client's hang-up or the barrier's decision,
an accept or the stop request) is written once, here, with the part that is easy to get wrong:
the losers are cancelled *and reaped*, so no task is left pending when the loop closes and no
exception goes unretrieved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

__all__ = ["first_completed"]


async def first_completed(*aws: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Wait until one of ``aws`` is done; cancel and reap the others; return the done ones
    (whose ``result()`` re-raises what they raised). If the caller is cancelled, all are."""
    futures = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in futures:
            if not f.done():
                f.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
    return set(done)
