"""A job's command, environment and working directory, checked before anything starts (bounded
like exec()'s ARG_MAX, so no request can make systemd parse a megabyte of ExecStart), and the
guest's environment packed as data for the IMP to apply after it dropped privileges.
Everything here is pure except :func:`resolve_program` (it looks at the file system as the
launcher's own user: never call it for a guest's command)."""

from __future__ import annotations

import base64
import os
import pwd
import re
import shutil
import sys
from collections.abc import Mapping, Sequence

from sdexec.config.show import show_value
from sdexec.errors import CommandNotExecutable, CommandNotFound, UsageError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# What one job may ask for, like ARG_MAX bounds exec(): systemd parses ExecStart in time that
# grows with the square of the argument count (900k arguments froze PID 1 for minutes), and a
# guest's environment crosses to the IMP encoded, so command + environment must still fit in
# one exec() (2 MiB with the default 8 MiB stack) with room to spare.
MAX_ARGS = 16384
MAX_ARGV_BYTES = 768 << 10
MAX_ENV_VARS = 4096
MAX_ENV_BYTES = 512 << 10
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""What systemd accepts as a variable name (its env_name_is_valid: a shell identifier)."""
# The unit environment of a guest job started through the IMP: nothing of the guest's, so the
# IMP (root) loads no library and reads no setting a guest chose; the guest's own environment
# and working directory ride along as data, applied by the IMP after it dropped privileges.
IMP_USER_VAR = "SDEXEC_IMP_USER"
IMP_ENV_VAR = "SDEXEC_IMP_ENV"
IMP_CWD_VAR = "SDEXEC_IMP_CWD"


def resolve_program(program: str, env: Mapping[str, str], cwd: str) -> str:
    """Find the program as a shell would, before anything starts (as systemd-run does).

    systemd only takes absolute paths; resolving here also lets a missing program fail fast
    with a clear message and exit code 127 rather than a failed unit.
    """
    if not program:
        raise UsageError("the command is empty (usage: sdexec run [OPTIONS] -- CMD [ARG...])")
    if "/" in program:
        path = program if os.path.isabs(program) else os.path.normpath(os.path.join(cwd, program))
        if not os.path.exists(path):
            raise CommandNotFound(f"{program}: no such file or directory")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise CommandNotExecutable(f"{program}: permission denied (not an executable file)")
        return path
    found = shutil.which(program, path=env.get("PATH", DEFAULT_PATH))
    if found is None:
        raise CommandNotFound(f"{program}: command not found")
    return os.path.abspath(found)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_env_name(key: str) -> bool:
    return _ENV_NAME.fullmatch(key) is not None


def usable_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment minus what systemd would refuse (a shell's exported
    functions ``BASH_FUNC_f%%``, names with dots...): a caller's odd variable must not make
    every job fail, as it would not under a shell either. Explicit ``--env`` is checked."""
    return {k: v for k, v in env.items() if valid_env_name(k) and "\0" not in v and _utf8(v)}


def check_environment(env: Mapping[str, str], origin: str = "the job's environment") -> None:
    """systemd refuses malformed assignments with an opaque InvalidArgs: say which one, and
    bound the whole (see MAX_ENV_VARS)."""
    size = 0
    for key, value in env.items():
        if not valid_env_name(key):
            raise UsageError(
                f"{origin}: {show_value(key)} is not a valid variable name "
                "(letters, digits and _, not starting with a digit; e.g. FOO=bar)"
            )
        if "\0" in value or not _utf8(value):
            raise UsageError(
                f"{origin}: the value of {show_value(key)} contains a NUL byte or is not UTF-8"
            )
        size += len(key) + len(value.encode()) + 2
    if len(env) > MAX_ENV_VARS:
        raise UsageError(f"{origin}: {len(env)} variables (at most {MAX_ENV_VARS})")
    if size > MAX_ENV_BYTES:
        raise UsageError(f"{origin}: {size} bytes (at most {MAX_ENV_BYTES >> 10} KiB)")


def check_command(argv: Sequence[str], cwd: str) -> None:
    """NUL bytes and non-UTF-8 text cannot cross D-Bus or exec(), systemd takes only an
    absolute working directory, and the command is bounded as exec() bounds it: refuse up
    front, naming the argument, rather than with systemd's opaque InvalidArgs."""
    if argv and not argv[0]:
        raise UsageError("the command is empty (usage: sdexec run [OPTIONS] -- CMD [ARG...])")
    if len(argv) > MAX_ARGS:
        raise UsageError(f"the command has {len(argv)} arguments (at most {MAX_ARGS})")
    size = 0
    for arg in argv:
        if "\0" in arg or not _utf8(arg):
            raise UsageError(f"the command: {show_value(arg)} contains a NUL byte or is not UTF-8")
        size += len(arg.encode()) + 1
    if size > MAX_ARGV_BYTES:
        raise UsageError(f"the command is {size} bytes long (at most {MAX_ARGV_BYTES >> 10} KiB)")
    if "\0" in cwd or not _utf8(cwd):
        raise UsageError(f"--cwd: {show_value(cwd)} contains a NUL byte or is not UTF-8")
    if not os.path.isabs(cwd):
        raise UsageError(f"--cwd: {show_value(cwd)} is not an absolute path (e.g. --cwd /tmp)")


def guest_base_environment(pw: pwd.struct_passwd) -> dict[str, str]:
    """A fresh login-like environment for a job run for another user (``--owner`` by root):
    the caller's own variables (secrets, agent sockets) never reach someone else's job."""
    return {
        "PATH": DEFAULT_PATH,
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh",
    }


def encode_environment(env: Mapping[str, str]) -> str:
    """The guest's environment as one opaque value (``K=V\\0``..., base64) for the IMP: no
    escaping to get wrong, and no variable a loader or interpreter would act on as root."""
    return base64.b64encode(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())).decode()


def decode_environment(text: str) -> dict[str, str]:
    """:func:`encode_environment`'s inverse; ValueError if it is not one."""
    env: dict[str, str] = {}
    for item in base64.b64decode(text.encode("ascii"), validate=True).split(b"\0")[:-1]:
        key, sep, value = item.decode().partition("=")
        if not sep or not valid_env_name(key):
            raise ValueError(f"not an environment entry: {item[:40]!r}")
        env[key] = value
    return env


def guest_passwd(user: str) -> pwd.struct_passwd:
    """The account a job runs as for another user: a name or a uid, never root."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isascii() and user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):
        raise UsageError(f"--owner: no such user {show_value(user)}") from None
    if pw.pw_uid == 0:
        raise UsageError("--owner: a guest job never runs as root")
    return pw


ENV_PROGRAM = "/usr/bin/env"


def guest_exec_prefix(program: str) -> tuple[str, ...]:
    """What looks a guest's program up on the guest's PATH, as the guest, and execs it.

    ``env`` reports 127/126 as a shell does and leaves the program as the unit's main process;
    it would take a program named ``A=B`` for an assignment, so such a name (or a system
    without /usr/bin/env) gets our job shell instead.
    """
    if "=" in program or not os.access(ENV_PROGRAM, os.X_OK):
        return (sys.executable, "-m", "sdexec.exec.shell", "--")
    return (ENV_PROGRAM, "--")
