"""The start gate: the unit exists, its cgroup limits are applied, the job's code waits.

Why a gate and not the alternatives (README, "Limits the kernel applied"):

- checking after ``Type=exec``'s start job is too late: the job's program already runs;
- an ``ExecStartPre=`` checker inside the unit would run before the program, but its verdict
  would reach us only as a failed start, its reason on the job's own stderr, and it would put
  our code (and our Python) in every job's unit;
- a gate costs one ``/bin/sh`` in front of the program: it blocks reading a FIFO only we can
  write, and ``exec``s the program (same PID, same argv, environment untouched) once the
  launcher has read the unit's cgroup files and found them right. On a mismatch the launcher
  stops the unit: the program never ran.

The FIFO lives in a fresh 0700 directory of the launcher's user (the unit's processes run as
that user: guests are not gated, their IMP runs first).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

SH = "/bin/sh"
SCRIPT = 'IFS= read -r go < "$0" && [ "$go" = go ] || exit 125; exec "$@"'
"""$0 is the FIFO, "$@" the job's argv (argv[0] an absolute path): nothing is re-parsed."""


class Gate:
    """One job's gate; ``open()`` lets the program run, ``close()`` removes the FIFO."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else None)
        if base is not None and not os.path.isdir(base):
            base = None
        import tempfile  # ~1 ms at import (random, shutil): only jobs with a gate pay it

        self.dir = tempfile.mkdtemp(prefix="sdexec-gate-", dir=base)
        self.path = os.path.join(self.dir, "gate")
        os.mkfifo(self.path, 0o600)
        self._fd: int | None = None

    def wrap(self, argv: Sequence[str]) -> tuple[str, ...]:
        return (SH, "-c", SCRIPT, self.path, *argv)

    def open(self) -> None:
        """Let the program run. O_RDWR never blocks on a FIFO; the fd is kept until
        ``close()`` so the word survives until the gate's shell has opened the FIFO."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            os.write(self._fd, b"go\n")

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        import shutil  # loaded only for a gated job

        shutil.rmtree(self.dir, ignore_errors=True)
