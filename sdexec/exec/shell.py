"""The built-in job shell: ``python -m sdexec.exec.shell -- CMD [ARG...]``.

It is the main process of each job unit, so what systemd records (ExecMainStatus, killed by
signal N) must be exactly the job's own status: the shell waits for CMD and dies the same way.
It starts for every job, so it imports only the standard library, and subprocess not even that.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

# typing and logging would cost more than the rest of the shell's start-up: types are for
# mypy only, and the shell has nothing to log that its exit status does not say
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import FrameType
    from typing import Any, NoReturn

__all__ = ["FORWARDED_SIGNALS", "exit_like", "main", "run_shell", "spawn"]

PROG = "sdexec-shell"
USAGE = f"usage: {PROG} -- CMD [ARG...]"

#: signals the launcher (or a user's kill) sends to the shell and that the job's tasks must see
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGALRM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
)
# Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored disposition survives exec:
# the job must get the defaults a shell would give it.
_RESET_IN_CHILD = (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ)


class ShellError(Exception):
    """CMD could not be started; carries the exit code a POSIX shell would use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Start argv in its own process group; the caller must have blocked FORWARDED_SIGNALS.

    posix_spawn reports exec failures to the parent (glibc uses CLONE_VFORK), so "not found"
    needs no pipe trick, and the new group exists before it returns.
    """
    cmd = argv[0]
    try:
        return os.posix_spawnp(
            cmd,
            list(argv),
            dict(env),
            setpgroup=0,
            setsigmask=(),
            setsigdef=_RESET_IN_CHILD,
        )
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise ShellError(f"{PROG}: {cmd}: command not found", 127) from None
        reason = e.strerror or str(e)
        raise ShellError(f"{PROG}: {cmd}: cannot execute: {reason}", 126) from None


def _forward_to(pgid: int) -> Callable[[int, FrameType | None], None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone (or holds only a setuid task): nothing left to tell

    return forward


def run_shell(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run argv, forwarding signals to its process group; return its raw wait status."""
    return run_command(argv, env)[0]


def run_command(argv: Sequence[str], env: Mapping[str, str]) -> tuple[int, Any]:
    """:func:`run_shell`, with the command's rusage (``wait4``: it and what it reaped)."""
    blocked = set(FORWARDED_SIGNALS)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = spawn(argv, env)
        handler = _forward_to(pid)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, handler)
    finally:
        # signals that arrived meanwhile are delivered now, to handlers that know the pid
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    # wait4 is retried after each handler runs (PEP 475)
    _, status, rusage = os.wait4(pid, 0)
    return status, rusage


def _save_coverage() -> None:
    """Under coverage (tests/run measures the job shells), write its data now: a fatal signal
    runs no atexit handler (os._exit is coverage's own ``patch = _exit``). Otherwise nothing:
    coverage is looked up, never imported. Measuring goes on (save() flushes what it has):
    only the kill itself goes unrecorded."""
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        current.save()


def exit_like(status: int) -> NoReturn:
    """Exit as a child with wait status ``status`` did: same exit code, or same fatal signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource

            # the child may have dumped core; the shell's own core would only mislead
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, ValueError, OSError):
            pass
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        _save_coverage()  # (a late ``sig`` meanwhile ends the shell just as the kill would)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only if the signal's default action does not terminate
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
    os._exit(code)


def _enter_barrier(path: str, env: Mapping[str, str]) -> None:
    from sdexec.exec.barrier import enter_barrier_sync

    rank_text = env.get("SDEXEC_RANK", "0")
    try:
        rank = int(rank_text)
    except ValueError:
        message = f"{PROG}: SDEXEC_RANK: {rank_text!r} is not a rank (an integer >= 0)"
        raise ShellError(message, 1) from None
    enter_barrier_sync(path, rank)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns only for a shell-side failure; otherwise exits like CMD."""
    # until CMD runs, ^C must end the shell quietly like any signal, not raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + "\n")
        return 0
    if args and args[0] == "--":
        args = args[1:]
    if not args or not args[0]:
        sys.stderr.write(f"{PROG}: no command given ({USAGE})\n")
        return 2
    env = dict(os.environ)
    # the barrier is the shell's business: a nested shell in the job must not enter it again
    barrier = env.pop("SDEXEC_BARRIER", "")
    accounting = env.pop("SDEXEC_ACCOUNTING", "") == "1"  # accounting.ENV_VAR, not imported
    try:
        if barrier:
            from sdexec.errors import SdexecError

            try:
                _enter_barrier(barrier, env)
            except SdexecError as e:
                raise ShellError(f"{PROG}: {e}", 1) from None
        started = time.monotonic() if accounting else 0.0
        status, rusage = run_command(args, env)
    except ShellError as e:
        sys.stderr.write(f"{e}\n")
        return e.exit_code
    if accounting:
        # the unit asked (sdexec run --json/-v): measured here, from inside its cgroup, which
        # systemd prunes as soon as we are gone (accounting.py says why)
        from sdexec.exec.accounting import report_from_unit

        report_from_unit(rusage, time.monotonic() - started)
    exit_like(status)


if __name__ == "__main__":
    sys.exit(main())
