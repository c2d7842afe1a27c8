"""A stand-in for flux-imp in systemd mode, for the tests and the test node. NOT for production.

It ships with the tests only (``containers/node`` installs it in the node as
``/usr/local/libexec/sdexec-test-imp``), never with the package: unlike the real IMP it checks
no signature, so anyone able to start it as root in a unit could run anything as anyone but root.

``sdexec-test-imp exec SHELL [ARG...]`` runs as root as the main process of a guest job's unit
(Type=notify, KillMode=process) with a fixed environment that sdexec gives it: nothing in it
comes from the guest except three opaque values, the guest (``SDEXEC_IMP_USER``), the guest's
environment (``SDEXEC_IMP_ENV``, encoded) and working directory (``SDEXEC_IMP_CWD``). It forks,
becomes the guest, and only then enters the directory and execs SHELL with that environment:
a guest's LD_PRELOAD or PYTHONPATH, or a directory only root may enter, never act as root. It
reports READY=1, proxies signals to the shell, turns SIGUSR1 into SIGKILL for everything else
in the unit's cgroup, and after the shell exits reports STOPPING=1 and lingers while processes
remain, so systemd keeps the unit "deactivating" and the launcher's stop timer can act.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

from sdexec.errors import SdexecError
from sdexec.exec.command import IMP_CWD_VAR, IMP_ENV_VAR, IMP_USER_VAR, decode_environment
from sdexec.exec.shell import exit_like
from sdexec.systemd.cgroup import CGROUP_ROOT, cgroup_pids, is_unified, kill_cgroup

__all__ = [
    "ImpError",
    "cgroup_dir",
    "cgroup_path",
    "cgroup_pids",
    "is_unified",
    "kill_cgroup",
    "main",
    "resolve_user",
    "sd_notify",
]

log = logging.getLogger(__name__)

PROG = "sdexec-imp"
POLL_INTERVAL = 0.2
#: signals proxied to the shell's process group; SIGUSR1 is handled apart (SIGKILL the unit)
PROXIED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGALRM,
    signal.SIGUSR2,
    signal.SIGCONT,
)
_HANDLED = (*PROXIED, signal.SIGUSR1)
# ignored by the Python runtime; an ignored disposition would survive exec
_RESET_IN_CHILD = (*_HANDLED, signal.SIGPIPE, signal.SIGXFSZ)


class ImpError(SdexecError):
    """The IMP refuses to run or cannot set up the job."""


def resolve_user(value: str | None) -> pwd.struct_passwd:
    """The guest named by SDEXEC_IMP_USER (a name or a uid); never root."""
    if value is None or not value.strip():
        raise ImpError("SDEXEC_IMP_USER is not set: name the guest user (a name or a uid)")
    text = value.strip()
    try:
        pw = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        raise ImpError(f"SDEXEC_IMP_USER: no such user {text!r}") from None
    if pw.pw_uid == 0:
        raise ImpError(f"SDEXEC_IMP_USER: refusing to run a job as root ({text!r})")
    return pw


def cgroup_path(proc_self_cgroup: str, *, unified: bool) -> str:
    """The cgroup path systemd tracks the unit by, from the text of /proc/self/cgroup.

    On cgroup v2 that is the ``0::`` line; on v1 (and hybrid) hosts the ``name=systemd``
    hierarchy, which is the one systemd itself uses to find a unit's processes.
    """
    for line in proc_self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if unified:
            found = hid == "0" and controllers == ""
        else:
            found = "name=systemd" in controllers.split(",")
        if found:
            # Inside a container's cgroup namespace a v1 path can climb above the
            # namespace root ("/../../sdexec.slice/x.service"); systemd's own hierarchy is
            # mounted at that root, so the unit lives at the path without the climb.
            kept = [p for p in path.removesuffix(" (deleted)").split("/") if p not in ("", "..")]
            return "/" + "/".join(kept)
    which = "0::" if unified else "name=systemd"
    raise ImpError(f"/proc/self/cgroup has no {which} line: cannot find the unit's cgroup")


def cgroup_dir(proc_self_cgroup: str, *, unified: bool, root: str = CGROUP_ROOT) -> str:
    """The cgroupfs directory of the unit's cgroup.

    Refuses anything but a unit's own cgroup (``*.service`` / ``*.scope``): SIGUSR1 kills
    everything below this directory, and outside a unit that could be the whole machine.
    """
    path = cgroup_path(proc_self_cgroup, unified=unified).strip("/")
    leaf = path.rsplit("/", 1)[-1]
    if not leaf.endswith((".service", ".scope")):
        raise ImpError(f"cgroup /{path} is not a systemd unit's: not running inside a unit")
    base = root if unified else os.path.join(root, "systemd")
    return os.path.join(base, path)


def sd_notify(state: str, socket_path: str | None = None) -> bool:
    """Send ``state`` to systemd's notify socket; False when there is none to send to.

    ``socket_path`` defaults to $NOTIFY_SOCKET; a leading ``@`` names an abstract socket.
    """
    path = os.environ.get("NOTIFY_SOCKET") if socket_path is None else socket_path
    if not path:
        return False
    if path.startswith("@"):
        address = "\0" + path[1:]
    elif path.startswith("/"):
        address = path
    else:
        log.warning("unsupported NOTIFY_SOCKET address %r", path)
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def _notify(state: str) -> None:
    try:
        sd_notify(state)
    except OSError as e:
        sys.stderr.write(f"{PROG}: sd_notify {state.splitlines()[0]}: {e.strerror or e}\n")


def guest_env(environ: dict[str, str], pw: pwd.struct_passwd) -> dict[str, str]:
    """The shell's environment: the guest's own (handed over encoded), with the guest's
    identity; nothing of the IMP's own environment (root's) goes along."""
    encoded = environ.get(IMP_ENV_VAR)
    if encoded is None:
        raise ImpError(f"{IMP_ENV_VAR} is not set: the job's environment was not handed over")
    try:
        env = decode_environment(encoded)
    except ValueError as e:
        raise ImpError(f"{IMP_ENV_VAR}: {e}") from None
    env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return env


def guest_cwd(environ: dict[str, str]) -> str:
    cwd = environ.get(IMP_CWD_VAR, "")
    if not os.path.isabs(cwd):
        raise ImpError(f"{IMP_CWD_VAR}: {cwd!r} is not an absolute path")
    return cwd


def _child(
    shell: str, argv: Sequence[str], pw: pwd.struct_passwd, env: dict[str, str], cwd: str
) -> None:
    """In the forked child: become the guest, then enter the directory and exec the shell
    (in that order: as root, a directory only root may enter would open). Never returns."""
    try:
        os.setpgid(0, 0)
        for sig in _RESET_IN_CHILD:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if os.geteuid() != pw.pw_uid:
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        if os.getuid() == 0 and pw.pw_uid != 0:
            raise ImpError("could not drop root privileges")
        try:
            os.chdir(cwd)
        except OSError as e:
            os.write(2, f"{PROG}: cannot enter {cwd}: {e.strerror or e}\n".encode())
            os._exit(126)
        os.execvpe(shell, [shell, *argv], env)
    except OSError as e:
        code = 127 if e.errno == errno.ENOENT else 126
        os.write(2, f"{PROG}: {shell}: {e.strerror or e}\n".encode())
        os._exit(code)
    except BaseException as e:
        os.write(2, f"{PROG}: {shell}: {e}\n".encode())
        os._exit(126)


class _Proxy:
    """Signal handling of the parent: forward to the shell's group, SIGUSR1 kills the unit."""

    def __init__(self, pgid: int, cgroup: str | None) -> None:
        self.pgid = pgid
        self.cgroup = cgroup

    def forward(self, signum: int, frame: FrameType | None) -> None:
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_all(self, signum: int, frame: FrameType | None) -> None:
        if self.cgroup is None:
            # no cgroup to go by (not under systemd): the shell's group is all we know
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        n = kill_cgroup(self.cgroup, exclude=(os.getpid(),))
        log.debug("SIGUSR1: sent SIGKILL to %d process(es)", n)


def _find_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            text = f.read()
        if is_unified():
            return cgroup_dir(text, unified=True)
        hybrid = os.path.join(CGROUP_ROOT, "unified")
        if os.path.isdir(os.path.join(hybrid, "init.scope")) or os.path.exists(
            os.path.join(hybrid, "cgroup.procs")
        ):
            # hybrid host: systemd tracks processes in the unified tree too, and that one is
            # private to a container's cgroup namespace (name=systemd may be shared)
            return cgroup_dir(text, unified=True, root=hybrid)
        return cgroup_dir(text, unified=False)
    except (OSError, ImpError) as e:
        sys.stderr.write(f"{PROG}: warning: {e}; SIGUSR1 will only kill the shell's group\n")
        return None


def run(shell: str, argv: Sequence[str], pw: pwd.struct_passwd) -> int:
    """Run the shell as the guest; return its raw wait status once the cgroup is empty."""
    cgroup = _find_cgroup()
    env = guest_env(dict(os.environ), pw)
    cwd = guest_cwd(dict(os.environ))
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(_HANDLED))
    try:
        pid = os.fork()
        if pid == 0:
            _child(shell, argv, pw, env, cwd)
        try:
            os.setpgid(pid, 0)  # also in the parent, so the group exists before any forward
        except OSError:
            pass  # the child already did it, or already exec'd
        proxy = _Proxy(pid, cgroup)
        for sig in PROXIED:
            signal.signal(sig, proxy.forward)
        signal.signal(signal.SIGUSR1, proxy.kill_all)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    _notify(f"READY=1\nMAINPID={os.getpid()}")
    _, status = os.waitpid(pid, 0)
    _notify("STOPPING=1")
    if cgroup is not None:
        me = os.getpid()
        while cgroup_pids(cgroup) - {me}:
            time.sleep(POLL_INTERVAL)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "exec":
        sys.stderr.write(f"{PROG}: usage: sdexec-test-imp exec SHELL [ARG...]\n")
        return 2
    try:
        pw = resolve_user(os.environ.get(IMP_USER_VAR))
    except ImpError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    try:
        status = run(args[1], args[2:], pw)
    except ImpError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    exit_like(status)


if __name__ == "__main__":
    sys.exit(main())
