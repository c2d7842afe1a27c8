"""Exceptions that carry their own exit code and a one-line message.

The CLI turns any :class:`SdexecError` into ``sdexec: MESSAGE`` on stderr and its exit code,
so no code path needs to format errors itself and no traceback ever reaches a user.
"""

from __future__ import annotations


class SdexecError(Exception):
    """Base of all errors a user is meant to read."""

    exit_code = 1


class UsageError(SdexecError):
    """Bad arguments or bad configuration: exit 2, like argparse."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration error, naming the file (when known) and the full dotted key."""

    def __init__(self, key: str | None, message: str, file: str | None = None) -> None:
        self.key = key
        self.file = file
        self.detail = message
        parts = [p for p in (file, key) if p]
        super().__init__(": ".join([*parts, message]))


class LaunchError(SdexecError):
    """The launcher itself failed (systemd refused, bus gone...): 125, as ``docker run`` does.

    Kept below 128 and apart from 126/127 so a script can tell it from the job's own status.
    """

    exit_code = 125


class CommandNotFound(LaunchError):
    """The job's program does not exist: 127, as a shell reports it."""

    exit_code = 127


class CommandNotExecutable(LaunchError):
    """The job's program exists but could not be executed: 126, as a shell reports it."""

    exit_code = 126


class RefusedError(LaunchError):
    """A policy refused the job before anything started (drained node, guest without imp...)."""

    exit_code = 125
