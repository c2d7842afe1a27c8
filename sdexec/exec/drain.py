"""Draining this node: the last resort when a job's processes cannot be killed.

The drain is recorded locally first, so this node refuses new jobs even if the resource
manager cannot be told; then the site's ``[sdexec] drain-command`` (if any) tells it, e.g.::

    drain-command = ["flux", "resource", "drain", "{hostname}", "{reason}"]
    drain-command = ["scontrol", "update", "NodeName={hostname}", "State=DRAIN", "Reason={reason}"]

Placeholders ``{hostname}`` (short name), ``{reason}``, ``{jobid}`` and ``{unit}`` are replaced
inside each argv word (``{{``/``}}`` for literal braces); there is no shell, so a reason cannot
inject anything. A failing or hung
command is logged, never raised: the local drain already holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import string
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sdexec.errors import SdexecError
from sdexec.exec.statedb import DrainRecord, StateDB, short_hostname

if TYPE_CHECKING:
    from sdexec.config.table import ExecConfig

log = logging.getLogger(__name__)

DRAIN_COMMAND_TIMEOUT_SEC = 30.0
_STDERR_TAIL_CHARS = 500


def expand_drain_command(template: Sequence[str], rec: DrainRecord) -> list[str]:
    """Substitute the placeholders in each word, with ``str.format`` quoting.

    ``{{``/``}}`` are literal braces, as the config check tells users; an unknown placeholder
    (which the config check rejects anyway) is kept as written rather than failing a drain.
    """
    values = {
        "hostname": rec.hostname,
        "reason": rec.reason,
        "jobid": rec.jobid or "",
        "unit": rec.unit or "",
    }
    argv = []
    for word in template:
        try:
            parts = list(string.Formatter().parse(word))
        except ValueError:  # a lone brace: take the word as it is
            argv.append(word)
            continue
        out = []
        for literal, name, spec, conv in parts:
            out.append(literal)
            if name is None:
                continue
            if name in values and not spec and conv is None:
                out.append(values[name])
            else:
                out.append(
                    "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                )
        argv.append("".join(out))
    return argv


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    if len(text) > _STDERR_TAIL_CHARS:
        text = "..." + text[-_STDERR_TAIL_CHARS:]
    return " | ".join(line for line in text.splitlines() if line.strip())


async def run_drain_command(argv: Sequence[str], *, command_timeout: float) -> bool:
    """Run the site's drain command; True if it exited 0. Failures are logged, not raised."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a timeout can kill what it spawned too
        )
    except OSError as e:
        log.error("drain-command %s could not be run: %s", argv[0], e.strerror or e)
        return False
    try:
        _, err = await asyncio.wait_for(proc.communicate(), command_timeout)
    except TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        log.error("drain-command %s timed out after %gs; killed it", argv[0], command_timeout)
        return False
    if proc.returncode != 0:
        status = (
            f"exit status {proc.returncode}"
            if proc.returncode is not None and proc.returncode >= 0
            else f"signal {-(proc.returncode or 0)}"
        )
        tail = _tail(err)
        log.error("drain-command %s failed (%s)%s", argv[0], status, f": {tail}" if tail else "")
        return False
    log.info("drain-command %s succeeded", argv[0])
    return True


async def drain_node(
    db: StateDB,
    cfg: ExecConfig,
    reason: str,
    *,
    jobid: str | None,
    unit: str | None,
    command_timeout: float = DRAIN_COMMAND_TIMEOUT_SEC,
) -> DrainRecord:
    """Drain this node locally, then tell the resource manager if a command is configured.

    If the local record cannot be written, the command still runs and the error is re-raised.
    """
    failure: SdexecError | None = None
    try:
        rec = db.drain(reason, jobid=jobid, unit=unit)
    except SdexecError as e:
        # still tell the resource manager: this is the drain that matters most
        log.error("could not record the drain locally: %s", e)
        rec = DrainRecord(" ".join(reason.split()), jobid, unit, time.time(), short_hostname())
        failure = e
    log.error("draining node %s: %s", rec.hostname, rec.reason)  # the reason names the job
    template = tuple(cfg.sdexec.drain_command or ())
    if template:
        await run_drain_command(
            expand_drain_command(template, rec), command_timeout=command_timeout
        )
    if failure is not None:
        raise failure
    return rec
