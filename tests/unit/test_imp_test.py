"""The test IMP: cgroup discovery, sd_notify, user resolution, and (as root) a real run."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdexec.exec.command import encode_environment
from tests.imp.sdexec_test_imp import (
    ImpError,
    cgroup_dir,
    cgroup_path,
    cgroup_pids,
    guest_cwd,
    guest_env,
    is_unified,
    kill_cgroup,
    main,
    resolve_user,
    sd_notify,
)

ROOT = Path(__file__).resolve().parents[2]

V1 = """\
12:pids:/system.slice/imp-shell-0-f1.service
11:memory:/system.slice/imp-shell-0-f1.service
3:cpu,cpuacct:/system.slice/imp-shell-0-f1.service
1:name=systemd:/system.slice/imp-shell-0-f1.service
"""
HYBRID = V1 + "0::/system.slice/imp-shell-0-f1.service\n"
V2 = "0::/system.slice/imp-shell-0-f1.service\n"


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="sdimp", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def a_guest() -> pwd.struct_passwd:
    for pw in pwd.getpwall():
        if pw.pw_uid != 0:
            return pw
    pytest.skip("no non-root user in the password database")


# -- cgroups -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "unified"), [(V1, False), (HYBRID, False), (V2, True), (HYBRID, True)]
)
def test_cgroup_path(text: str, unified: bool) -> None:
    assert cgroup_path(text, unified=unified) == "/system.slice/imp-shell-0-f1.service"


def test_cgroup_path_missing_hierarchy() -> None:
    with pytest.raises(ImpError, match="no name=systemd line"):
        cgroup_path(V2, unified=False)
    with pytest.raises(ImpError, match="no 0:: line"):
        cgroup_path(V1, unified=True)


def test_cgroup_path_deleted_suffix() -> None:
    assert cgroup_path("0::/a.slice/b.scope (deleted)\n", unified=True) == "/a.slice/b.scope"


def test_cgroup_dir_per_hierarchy() -> None:
    assert cgroup_dir(V1, unified=False, root="/cg") == (
        "/cg/systemd/system.slice/imp-shell-0-f1.service"
    )
    assert cgroup_dir(V2, unified=True, root="/cg") == "/cg/system.slice/imp-shell-0-f1.service"
    user = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-x.scope\n"
    assert cgroup_dir(user, unified=True, root="/cg").endswith("/app.slice/run-x.scope")


@pytest.mark.parametrize("text", ["0::/\n", "0::/system.slice\n", "0::/init.scope/sub\n"])
def test_cgroup_dir_refuses_outside_a_unit(text: str) -> None:
    # SIGUSR1 kills everything below this directory: never the root, never a slice
    with pytest.raises(ImpError, match="not a systemd unit's"):
        cgroup_dir(text, unified=True, root="/cg")


def test_is_unified(tmp_path: Path) -> None:
    assert not is_unified(str(tmp_path))
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert is_unified(str(tmp_path))


def _fake_cgroup(tmp_path: Path, top: list[int], sub: list[int]) -> str:
    unit = tmp_path / "x.service"
    (unit / "payload").mkdir(parents=True)
    (unit / "cgroup.procs").write_text("".join(f"{p}\n" for p in top))
    (unit / "payload" / "cgroup.procs").write_text("".join(f"{p}\n" for p in sub))
    return str(unit)


def test_cgroup_pids_includes_sub_cgroups(tmp_path: Path) -> None:
    assert cgroup_pids(_fake_cgroup(tmp_path, [1, 2], [3])) == {1, 2, 3}
    assert cgroup_pids(str(tmp_path / "gone")) == set()


def test_kill_cgroup_kills_all_but_the_excluded(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "30"])
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        d = _fake_cgroup(tmp_path, [bystander.pid], [victim.pid])
        # a fake cgroup.procs does not empty itself: one pass is all this can check
        assert kill_cgroup(d, exclude=[bystander.pid], passes=1) == 1
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()


# -- sd_notify ---------------------------------------------------------------------------


def test_sd_notify_to_a_path_socket(short_dir: str) -> None:
    path = f"{short_dir}/notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        assert sd_notify("READY=1\nMAINPID=42", path) is True
        assert srv.recv(4096) == b"READY=1\nMAINPID=42"


def test_sd_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"sdexec-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("STOPPING=1") is True
        assert srv.recv(4096) == b"STOPPING=1"


def test_sd_notify_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    assert sd_notify("READY=1", "vsock:2:1234") is False


def test_sd_notify_to_a_missing_socket_raises(short_dir: str) -> None:
    with pytest.raises(OSError):
        sd_notify("READY=1", f"{short_dir}/none")


# -- the guest ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "])
def test_user_must_be_set(value: str | None) -> None:
    with pytest.raises(ImpError, match="SDEXEC_IMP_USER is not set"):
        resolve_user(value)


@pytest.mark.parametrize("value", ["root", "0"])
def test_root_is_refused(value: str) -> None:
    with pytest.raises(ImpError, match="refusing to run a job as root"):
        resolve_user(value)


def test_unknown_user() -> None:
    with pytest.raises(ImpError, match="no such user 'sdexec-no-such-user'"):
        resolve_user("sdexec-no-such-user")
    with pytest.raises(ImpError, match="no such user"):
        resolve_user("4000000000")


def test_user_by_name_or_uid() -> None:
    pw = a_guest()
    assert resolve_user(pw.pw_name).pw_uid == pw.pw_uid
    assert resolve_user(str(pw.pw_uid)).pw_name == pw.pw_name


def test_guest_env_is_the_handed_over_one_never_the_imps() -> None:
    """The IMP runs as root with sdexec's fixed environment; the shell gets the guest's."""
    pw = a_guest()
    handed = {"PATH": "/guest/bin", "SDEXEC_RANK": "1", "HOME": "/root", "LD_PRELOAD": "x.so"}
    env = guest_env(
        {
            "PATH": "/bin",
            "SDEXEC_IMP_USER": "x",
            "SDEXEC_IMP_ENV": encode_environment(handed),
            "NOTIFY_SOCKET": "@n",
            "ROOT_SECRET": "s",
        },
        pw,
    )
    assert env == {
        "PATH": "/guest/bin",
        "SDEXEC_RANK": "1",
        "LD_PRELOAD": "x.so",  # the guest's own, applied only once the IMP is the guest
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
    }
    with pytest.raises(ImpError, match="SDEXEC_IMP_ENV is not set"):
        guest_env({"PATH": "/bin"}, pw)
    with pytest.raises(ImpError, match="SDEXEC_IMP_ENV"):
        guest_env({"SDEXEC_IMP_ENV": "not base64!"}, pw)
    assert guest_cwd({"SDEXEC_IMP_CWD": "/tmp"}) == "/tmp"
    with pytest.raises(ImpError, match="not an absolute path"):
        guest_cwd({"SDEXEC_IMP_CWD": "tmp"})


def test_main_usage_and_refusals(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([]) == 2
    assert main(["run", "sh"]) == 2
    monkeypatch.delenv("SDEXEC_IMP_USER", raising=False)
    assert main(["exec", "sh"]) == 1
    monkeypatch.setenv("SDEXEC_IMP_USER", "root")
    assert main(["exec", "sh"]) == 1
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "SDEXEC_IMP_USER is not set" in err
    assert "refusing to run a job as root" in err


# -- a real run, as root (outside systemd: no unit cgroup, so no lingering) ---------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


SLEEPER = "sleep 30 </dev/null >/dev/null 2>&1 &"


def _imp(short_dir: str, *cmd: str) -> tuple[subprocess.Popen[str], socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{short_dir}/notify")
    notify.settimeout(20)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "SDEXEC_IMP_USER": "nobody",
        "SDEXEC_IMP_ENV": encode_environment({"PATH": "/usr/bin:/bin"}),
        "SDEXEC_IMP_CWD": "/",
        "NOTIFY_SOCKET": f"{short_dir}/notify",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "imp" / "sdexec_test_imp.py"), "exec", *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    return proc, notify


@needs_root
def test_runs_the_shell_as_the_guest_and_notifies(short_dir: str) -> None:
    script = 'id -u; echo "$USER ${NOTIFY_SOCKET:-none} ${SDEXEC_IMP_USER:-none}"; exit 5'
    proc, notify = _imp(short_dir, "sh", "-c", script)
    with notify:
        out, err = proc.communicate(timeout=20)
        assert "Traceback" not in err
        assert notify.recv(4096) == f"READY=1\nMAINPID={proc.pid}".encode()
        assert notify.recv(4096) == b"STOPPING=1"
    nobody = pwd.getpwnam("nobody")
    assert out == f"{nobody.pw_uid}\nnobody none none\n"
    assert proc.returncode == 5


@needs_root
def test_proxies_sigterm_to_the_shell(short_dir: str) -> None:
    script = f'trap "echo got-term; exit 0" TERM; {SLEEPER} echo ready; wait'
    proc, notify = _imp(short_dir, "sh", "-c", script)
    with notify:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert notify.recv(4096).startswith(b"READY=1")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert out == "got-term\n"
    assert proc.returncode == 0


@needs_root
def test_sigusr1_kills_and_the_imp_dies_the_same_way(short_dir: str) -> None:
    script = f'trap "echo survived" USR1 TERM; {SLEEPER} echo ready; wait'
    proc, notify = _imp(short_dir, "sh", "-c", script)
    with notify:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=20)
    assert out == ""
    assert proc.returncode == -signal.SIGKILL


def test_cgroup_path_above_the_namespace_root_is_the_unit_path() -> None:
    """In a container's cgroup namespace v1 paths may climb above its root: drop the climb."""
    text = "9:name=systemd:/../../sdexec.slice/imp-shell-0-1.service\n0::/sdexec.slice/x\n"
    assert cgroup_path(text, unified=False) == "/sdexec.slice/imp-shell-0-1.service"
