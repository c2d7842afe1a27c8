"""Unit names and object paths for jobs.

Job ids come from a resource manager (Flux's are f58 strings, Slurm's integers) and, through
the CLI, from users: they must end up in a unit name verbatim when safe, escaped otherwise,
and never able to name some other unit (``..``, ``/``, ``@`` and friends are escaped, as
``systemd-escape`` does).
"""

from __future__ import annotations

import string

from sdexec.errors import UsageError

UNIT_NAME_MAX = 255
_SAFE = frozenset(string.ascii_letters + string.digits + ":_.")
JOBID_MAX = 128


def check_jobid(jobid: str) -> str:
    """Refuse job ids that cannot be carried safely, with the accepted form in the message."""
    if not jobid:
        raise UsageError("--job: the job id is empty (e.g. --job 123 or --job fA3xK9)")
    if len(jobid) > JOBID_MAX:
        raise UsageError(f"--job: the job id is {len(jobid)} characters long (at most {JOBID_MAX})")
    try:
        jobid.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--job: the job id is not valid UTF-8 text") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in jobid):
        raise UsageError(
            "--job: the job id contains control characters (letters, digits, - _ . : only)"
        )
    return jobid


def unit_name(jobid: str, rank: int = 0, *, guest: bool = False) -> str:
    """``shell-RANK-JOBID.service`` (``imp-shell-...`` for guest jobs), as the reference names them.

    Dashes inside the job id are kept readable; anything else unsafe is escaped. The prefix
    ends before the first dash of the id, so the name stays unique per (rank, jobid).
    """
    check_jobid(jobid)
    if rank < 0:
        raise UsageError(f"--rank: {rank} is negative (a shell rank is 0 or more)")
    safe_id = "".join(
        c if c in _SAFE or c == "-" else "".join(f"\\x{b:02x}" for b in c.encode("utf-8"))
        for c in jobid
    )
    prefix = "imp-shell" if guest else "shell"
    name = f"{prefix}-{rank}-{safe_id}.service"
    if len(name) > UNIT_NAME_MAX:
        raise UsageError(
            f"--job: the job id is too long for a unit name (at most {UNIT_NAME_MAX} bytes)"
        )
    return name


_PATH_BYTES = [chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in range(256)]


def object_path(name: str) -> str:
    """The systemd D-Bus object path of a unit: every byte outside [A-Za-z0-9] becomes _XX."""
    return "/org/freedesktop/systemd1/unit/" + "".join(_PATH_BYTES[b] for b in name.encode("utf-8"))
