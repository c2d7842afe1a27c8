"""Issue 9: an ordinary local user against the root server, as an attacker would try it.

The node's user ``guest`` (uid 1500) plays mallory: through the CLI and with hand-made
requests on the server's socket. The server is the node's socket-activated ``sdexec.service``;
a test that needs another server configuration writes a conf.d drop-in and restarts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import SDEXEC, main_pid, start_until_ready

SOCKET = "/run/sdexec/sdexec.sock"
DROPIN = Path("/etc/sdexec/conf.d/90-test.toml")
IMP = "/usr/local/libexec/sdexec-test-imp"
RAW = str(Path(__file__).with_name("raw_client.py"))
PY = "/opt/sdexec/bin/python"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
GUEST = "guest"
GUEST_UID = 1500
GUEST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/guest", "LANG": "C.UTF-8"}

ServerConf = Callable[[str], None]


def _lines(value: object) -> list[str]:
    """The stderr lines of a reply, typed (a reply is JSON: anything until checked)."""
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), value
    return value


def _server_pid() -> int:
    return main_pid("sdexec.service")


def _restart_server() -> None:
    subprocess.run(["systemctl", "stop", "sdexec.service"], check=True, timeout=60)
    subprocess.run(["systemctl", "reset-failed", "sdexec.service", "sdexec.socket"], check=False)
    subprocess.run(["systemctl", "start", "sdexec.socket"], check=True, timeout=60)


@pytest.fixture
def server_conf() -> Iterator[ServerConf]:
    """server_conf(TOML): the node's server runs with this drop-in until the test ends."""

    def apply(text: str) -> None:
        DROPIN.write_text(text)
        _restart_server()

    try:
        yield apply
    finally:
        DROPIN.unlink(missing_ok=True)
        _restart_server()


def server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SDEXEC_CONFIG", "SDEXEC_NO_SERVER")}


def as_root(
    *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*SDEXEC, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env or server_env(),
        **kw,
    )


def as_guest(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess[str]:
    """``sdexec ARGS`` as the guest, from /tmp, with a plain user's environment (+ env)."""
    full = dict(GUEST_ENV)
    full.update(env or {})
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [RUNUSER, "-u", GUEST, "--", "/opt/sdexec/bin/sdexec", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/tmp",
        env=full,
        **kw,
    )


def raw(data: bytes, *, guest: bool = True, fds: bool = True, timeout: float = 60) -> list[str]:
    """A hand-made request; the server's answer lines (then EOF/RESET)."""
    cmd = [PY, RAW, "--timeout", str(timeout)] + ([] if fds else ["--no-fds"])
    if guest:
        cmd = [RUNUSER, "-u", GUEST, "--", *cmd]
    p = subprocess.run(
        cmd, input=data, capture_output=True, timeout=timeout + 30, check=False, cwd="/tmp"
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().splitlines()


def reply(lines: list[str]) -> dict[str, object]:
    """The final {"exit": ...} answer among the lines."""
    finals = [json.loads(x) for x in lines if x.startswith("{") and '"exit"' in x]
    assert len(finals) == 1, lines
    return finals[0]  # type: ignore[no-any-return]


def run_request(argv: list[str], **kw: object) -> bytes:
    msg = {"op": "run", "argv": argv, "env": GUEST_ENV, "cwd": "/tmp", **kw}
    return json.dumps(msg).encode() + b"\n"


def assert_server_alive(pid: int) -> None:
    assert _server_pid() == pid != 0, "the server restarted (it must answer, not exit)"
    state = subprocess.run(
        ["systemctl", "is-failed", "sdexec.socket"], capture_output=True, text=True, check=False
    ).stdout.strip()
    assert state != "failed", "sdexec.socket failed"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp the guest may read and write (pytest's tmp_path is root's)."""
    d = Path(tempfile.mkdtemp(prefix="sdexec-sec-", dir="/tmp"))
    d.chmod(0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def root_only_dir() -> Iterator[Path]:
    """/root/sub-like: a 0755 directory with a secret inside a 0700 one."""
    top = Path(tempfile.mkdtemp(prefix="sdexec-root-", dir="/root"))
    top.chmod(0o700)
    sub = top / "sub"
    sub.mkdir(mode=0o755)
    (sub / "secret").write_text("the-root-secret\n")
    (sub / "secret").chmod(0o644)
    try:
        yield sub
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _markers(d: Path) -> list[int]:
    return sorted(int(f.read_text()) for f in d.glob("uid-*"))


def _evil_python_path(d: Path) -> Path:
    """A PYTHONPATH whose sitecustomize records the uid of every Python that imports it."""
    evil = d / "evil"
    evil.mkdir(mode=0o777)
    evil.chmod(0o777)
    (evil / "sitecustomize.py").write_text(
        f"import os\nopen(f'{d}/uid-{{os.getpid()}}', 'w').write(str(os.getuid()))\n"
    )
    return evil


# --- C1 / H7: nothing of a guest's request acts as root ----------------------------------------

GUEST_MODES = {
    "imp": f'[exec]\nimp = "{IMP}"\n',
    "systemd": '[sdexec]\nguest-credentials = "systemd"\n',
}


@pytest.mark.parametrize("mode", sorted(GUEST_MODES))
def test_a_guests_environment_never_reaches_a_root_process(
    server_conf: ServerConf, public_dir: Path, mode: str
) -> None:
    """C1: LD_PRELOAD / PYTHONPATH of a guest load nothing as root, whatever the mode.

    The unit's main process (the IMP, root) gets none of the guest's variables; every
    Python that imported the guest's sitecustomize ran as the guest."""
    server_conf(GUEST_MODES[mode])
    evil = _evil_python_path(public_dir)
    probe = public_dir / "main-environ"
    script = (
        f"cat /proc/$(systemctl show -P MainPID imp-shell-0-sec1.service shell-0-sec1.service"
        f" | grep -E '^[1-9]' | head -1)/status | grep ^Uid: > {probe}.uid; "
        "python3 -c pass; echo done"
    )
    p = as_guest(
        "run",
        "--job",
        "sec1",
        "--env",
        f"PYTHONPATH={evil}",
        "--env",
        f"LD_PRELOAD={public_dir}/none.so",
        "--env",
        "GUEST_MARK=m4rk",
        "--",
        "sh",
        "-c",
        script,
        env={"PYTHONPATH": str(evil)},
    )
    assert p.returncode == 0, p.stderr
    assert "done" in p.stdout
    uids = _markers(public_dir)
    assert uids and set(uids) == {GUEST_UID}, f"a Python ran with the guest's PYTHONPATH as {uids}"
    main_uid = Path(f"{probe}.uid").read_text().split()[1:]
    if mode == "systemd":
        assert main_uid == [str(GUEST_UID)] * 4, main_uid  # the unit's main process: the guest
    else:
        assert main_uid[0] == "0"  # the IMP is root: and so it must have none of the guest's env


def test_the_imps_environment_is_fixed(server_conf: ServerConf) -> None:
    """C1 directly: the IMP's own /proc/PID/environ has nothing of the guest's."""
    server_conf(GUEST_MODES["imp"])
    proc = subprocess.Popen(
        [
            RUNUSER,
            "-u",
            GUEST,
            "--",
            "/opt/sdexec/bin/sdexec",
            "run",
            "--job",
            "sec2",
            "--env",
            "LD_PRELOAD=/tmp/none.so",
            "--env",
            "GUEST_MARK=m4rk",
            "--",
            "sh",
            "-c",
            "echo ready; sleep 30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/tmp",
        env=GUEST_ENV,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        pid = main_pid("imp-shell-0-sec2.service")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {e.partition(b"=")[0] for e in environ if e}
        assert b"LD_PRELOAD" not in names and b"GUEST_MARK" not in names, names
        assert not any(b"m4rk" in e for e in environ)
        assert Path(f"/proc/{pid}/status").read_text().count("Uid:\t0\t") == 1  # root indeed
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


@pytest.mark.parametrize("mode", sorted(GUEST_MODES))
def test_a_guest_cannot_enter_a_directory_only_root_may(
    server_conf: ServerConf, root_only_dir: Path, mode: str
) -> None:
    """H7: the working directory is entered as the guest (after the privilege drop)."""
    server_conf(GUEST_MODES[mode])
    p = as_guest("run", "--job", "sec3", "--cwd", str(root_only_dir), "--", "cat", "secret")
    assert "the-root-secret" not in p.stdout
    assert p.returncode == 126, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    assert "enter" in p.stderr, p.stderr


@pytest.mark.parametrize("mode", sorted(GUEST_MODES))
@pytest.mark.parametrize("path", ["server", "in-process"])
def test_roots_environment_never_reaches_a_guests_job(
    server_conf: ServerConf, config: Callable[..., str], mode: str, path: str
) -> None:
    server_conf(GUEST_MODES[mode])
    env = server_env()
    env.update(ROOT_SECRET="s3cret", SSH_AUTH_SOCK="/root/agent.sock")
    args = ["run", "--owner", GUEST, "--", "sh", "-c", "env; id -u; pwd"]
    if path == "in-process":
        body = f'imp = "{IMP}"\n' if mode == "imp" else ""
        site = 'guest-credentials = "systemd"\n' if mode == "systemd" else ""
        args[1:1] = ["--config", config(body, sdexec=site)]
    p = as_root(*args, env=env)
    assert p.returncode == 0, p.stderr
    assert "s3cret" not in p.stdout and "agent.sock" not in p.stdout, p.stdout
    lines = p.stdout.splitlines()
    assert lines[-2:] == [str(GUEST_UID), "/home/guest"], lines[-3:]
    assert "USER=guest" in lines and "HOME=/home/guest" in lines


def test_guest_runs_as_the_guest_with_systemd_credentials(server_conf: ServerConf) -> None:
    """The production path for a root server: the unit's User= (issue 13's Slurm users)."""
    server_conf(GUEST_MODES["systemd"])
    p = as_guest(
        "run",
        "--job",
        "sec4",
        "--",
        "sh",
        "-c",
        "id -u; id -G; cat /proc/self/cgroup | grep -o 'shell-0-sec4.service' | head -1",
    )
    assert p.returncode == 0, p.stderr
    uid, groups, unit = p.stdout.split("\n")[:3]
    assert uid == str(GUEST_UID) and "0" not in groups.split(), p.stdout
    assert unit == "shell-0-sec4.service"
    p = as_guest("run", "--", "no-such-program-here")
    assert p.returncode == 127, p.stderr
    p = as_guest("run", "--owner", "root", "--", "id")
    assert p.returncode == 125 and "only the instance owner" in p.stderr, p.stderr


# --- H1 / M5 / low: bad requests get one line, and the server stays ------------------------


BAD_CLI: list[tuple[list[str], int, str]] = [
    (["--he", "--", "true"], 2, "--he"),
    (["--hel"], 2, "--hel"),
    (["--conf=/etc/passwd", "--", "true"], 2, "--conf"),
    (["--conf", "/etc/passwd", "--", "true"], 2, "--conf"),
    (["--jo", "1", "--", "true"], 2, "--jo"),
    (["--rank", "x", "--", "true"], 2, "--rank"),
    (["--rank", "-1", "--", "true"], 2, "--rank"),
    (["--rank", "1.5", "--", "true"], 2, "--rank"),
    (["--shells", "0", "--", "true"], 2, "--shells"),
    (["--shells", "x", "--", "true"], 2, "--shells"),
    (["--job", "", "--", "true"], 2, "--job"),
    (["--job", "a\x01b", "--", "true"], 2, "--job"),
    (["--job", "x" * 300, "--", "true"], 2, "--job"),
    (["--job"], 2, "--job"),
    (["--setattr", "noequals", "--", "true"], 2, "--setattr"),
    (["--setattr", "=1", "--", "true"], 2, "--setattr"),
    (["--setattr", "system.exec.teleport=1", "--", "true"], 2, "teleport"),
    (["--setattr", "system.exec.bulkexec.service=rexec", "--", "true"], 125, "service-override"),
    (["--setattr", "system.exec.test.run_duration=x", "--", "true"], 2, "run_duration"),
    (["--setattr", "system.exec.test.wait_status=999", "--", "true"], 2, "wait_status"),
    (["--env", "noequals", "--", "true"], 2, "--env"),
    (["--env", "=x", "--", "true"], 2, "--env"),
    (["--env", "A B=c", "--", "true"], 2, "--env"),
    (["--env", "1A=c", "--", "true"], 2, "--env"),
    (["--env", "A-B=c", "--", "true"], 2, "--env"),
    (["--env", "A.B=c", "--", "true"], 2, "--env"),
    (["--time-limit", "abc", "--", "true"], 2, "--time-limit"),
    (["--time-limit", "-1", "--", "true"], 2, "--time-limit"),
    (["--time-limit", "1x", "--", "true"], 2, "--time-limit"),
    (["--cwd", "relative/dir", "--", "true"], 2, "--cwd"),
    (["--cwd", "", "--", "pwd"], 0, ""),  # empty: the current directory, as the flag's absence
    (["--owner", "no-such-user-x", "--", "true"], 2, "--owner"),
    (["--owner", "root", "--", "true"], 125, "--owner"),
    (["--owner", "0", "--", "true"], 125, "--owner"),
    (["--bogus", "--", "true"], 2, "--bogus"),
    (["-x", "--", "true"], 2, "-x"),
    ([], 2, "no command"),
    (["--"], 2, "no command"),
    (["--keep-unit=yes", "--", "true"], 2, "--keep-unit"),
    (["--json=1", "--", "true"], 2, "--json"),
    (["--rank", "", "--", "true"], 2, "--rank"),
    (["--", "/no/such/program"], 127, "/no/such/program"),
    (["--", "/etc/passwd"], 126, "/etc/passwd"),
    (["--", "/tmp"], 126, "/tmp"),
    (["--", ""], 2, "empty"),
    (["--setattr", "system.exec.test.mock_exception=bogus", "--", "true"], 2, "mock_exception"),
    (["--time-limit", "", "--", "true"], 2, "--time-limit"),
    (["--shells", "100000", "--", "true"], 2, "--shells"),
]


@pytest.fixture(scope="module")
def guest_server() -> Iterator[None]:
    """The server with guests on (systemd credentials), once for the bad-CLI cases."""
    DROPIN.write_text(GUEST_MODES["systemd"])
    _restart_server()
    try:
        yield
    finally:
        DROPIN.unlink(missing_ok=True)
        _restart_server()


@pytest.mark.parametrize(
    ("argv", "code", "named"), BAD_CLI, ids=[" ".join(a)[:40] for a, _, _ in BAD_CLI]
)
def test_bad_cli_through_the_server_as_a_guest(
    guest_server: None, argv: list[str], code: int, named: str
) -> None:
    """The 48 bad-CLI cases: one line naming the argument, the right code, server alive."""
    as_guest("run", "--", "true")  # start the server
    pid = _server_pid()
    p = as_guest("run", *argv)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    if code in (2, 125):
        errors = [line for line in p.stderr.splitlines() if line.startswith("sdexec:")]
        assert len(errors) == 1 and named in errors[0], p.stderr
    assert_server_alive(pid)


def test_help_abbreviations_do_not_stop_the_server() -> None:
    """H1: ten `--he` in a row (and hand-made --help/--version) leave the server serving."""
    as_root("run", "--", "true")
    pid = _server_pid()
    for _ in range(10):
        p = as_guest("run", "--he", "--", "true")
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    for argv in (
        ["--help"],
        ["-h"],
        ["--version"],
        ["--config", "/x", "--", "true"],
        ["-c/x", "--", "true"],
        ["--config=/x", "--", "true"],
    ):
        answer = reply(raw(run_request(argv)))
        assert answer["exit"] == 2, answer
        (line,) = _lines(answer["stderr"])
        assert "--help" in line or "--config" in line, line
    assert_server_alive(pid)
    assert as_root("run", "--", "true").returncode == 0


@pytest.mark.parametrize(
    "data",
    [
        b"[1, 2]\n",
        b'"just a string"\n',
        b"not json at all\n",
        b"[" * 200_000 + b"]" * 200_000 + b"\n",
        b'{"op": "run", "argv": [["nested"]], "env": {}, "cwd": "/"}\n',
        b'{"op": "run", "argv": ["--", "true"], "env": [], "cwd": "/"}\n',
        b'{"op": "run", "argv": ["--", "true"], "env": {"A": 1}, "cwd": "/"}\n',
        b'{"op": "run", "argv": ["--", "true"], "env": {}, "cwd": 5}\n',
        b'{"op": "attach", "jobid": 5}\n',
        b'{"op": "teleport"}\n',
        b'{"op": "run", "argv": ["--", "true\\u0000x"], "env": {}, "cwd": "/"}\n',
        b'{"op": "run", "argv": ["--", "true"], "env": {}, "cwd": "/tmp\\u0000"}\n',
    ],
    ids=lambda d: d[:30].decode(errors="replace"),
)
def test_hand_made_bad_requests_get_one_answer(data: bytes) -> None:
    as_root("run", "--", "true")
    pid = _server_pid()
    answer = reply(raw(data))
    assert answer["exit"] == 2, answer
    assert len(answer["stderr"]) == 1  # type: ignore[arg-type]
    assert_server_alive(pid)


def test_argv_and_environment_are_bounded() -> None:
    """H4: 600k arguments are refused at once (they froze PID 1 for minutes); root's next
    job runs normally."""
    as_root("run", "--", "true")
    pid = _server_pid()
    t0 = time.monotonic()
    answer = reply(raw(run_request(["--", "true", *["x"] * 600_000])))
    assert answer["exit"] == 2 and "arguments" in str(answer["stderr"]), answer
    answer = reply(raw(run_request(["--", "true"], env={f"V{i}": "x" for i in range(5000)})))
    assert answer["exit"] == 2 and "variables" in str(answer["stderr"]), answer
    answer = reply(raw(run_request(["--", "true"], env={"BIG": "x" * (600 << 10)})))
    assert answer["exit"] == 2 and "KiB" in str(answer["stderr"]), answer
    p = as_root("run", "--", "echo", "still-fast")
    assert (p.returncode, p.stdout) == (0, "still-fast\n"), p.stderr
    assert time.monotonic() - t0 < 60, "refusing the oversized requests took PID 1's time"
    assert_server_alive(pid)
    big = ["x"] * 10_000  # what a real command line may hold still runs
    p = as_root("run", "--", "sh", "-c", 'echo "$#"', "sh", *big)
    assert (p.returncode, p.stdout) == (0, "10000\n"), p.stderr


# --- M1 / M2 / M3 / M4: attach and records ---------------------------------------------------


def test_a_guest_cannot_attach_to_roots_job() -> None:
    """M1: refused before anything is adopted, and nothing of root's job is told."""
    proc = start_until_ready(
        "run", "--job", "rootC", "--", "sh", "-c", "echo ready; sleep 2; exit 7", env=server_env()
    )
    answer = reply(raw(b'{"op": "attach", "jobid": "rootC"}\n', fds=False))
    assert answer["exit"] == 125, answer
    text = " ".join(answer["stderr"])  # type: ignore[arg-type]
    assert "no job rootC of yours" in text and "shell-" not in text, text
    p = as_guest("attach", "--job", "rootC")
    assert p.returncode == 125 and "of yours" in p.stderr, p.stderr
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err  # root's own client still gets its job's end


def test_attach_after_the_client_was_killed(public_dir: Path) -> None:
    """M2: the README's recovery, through the server: running, and ended meanwhile."""
    proc = start_until_ready(
        "run", "--job", "k9", "--", "sh", "-c", "echo ready; sleep 2; exit 11", env=server_env()
    )
    proc.kill()
    proc.wait()
    p = as_root("attach", "--job", "k9")
    assert p.returncode == 11, p.stderr
    flag = public_dir / "go"
    proc = start_until_ready(
        "run",
        "--job",
        "k10",
        "--",
        "sh",
        "-c",
        f"echo ready; while [ ! -e {flag} ]; do sleep 0.05; done; exit 12",
        env=server_env(),
    )
    proc.kill()
    proc.wait()
    flag.touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the job ends with nobody connected
        jobs = json.loads(as_root("jobs", "--json").stdout)
        if any(j["jobid"] == "k10" and j["state"] == "finished" for j in jobs):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"job k10 never finished: {jobs}")
    p = as_guest("run", "--job", "k10", "--", "true")  # M3: root's kept record is root's
    assert p.returncode == 125 and "another user" in p.stderr, p.stderr
    p = as_root("attach", "--job", "k10")
    assert p.returncode == 12, p.stderr
    assert not [j for j in json.loads(as_root("jobs", "--json").stdout) if j["jobid"] == "k10"]
    p = as_root("attach", "--job", "k10")  # given once
    assert p.returncode == 125 and "no record" in p.stderr


def test_job_ids_with_dots_survive_a_server_kill() -> None:
    """M4: job 8.1 is job "8.1", never job 8 rank 1 (also after a re-adopt)."""
    proc = start_until_ready(
        "run", "--job", "8.1", "--", "sh", "-c", "echo ready; sleep 3; exit 11", env=server_env()
    )
    subprocess.run(["systemctl", "kill", "-s", "KILL", "sdexec.service"], check=True)
    _out, err = proc.communicate(timeout=90)
    assert proc.returncode == 11, err
    assert "following job 8.1 again" in err
    a = subprocess.Popen(
        [
            *SDEXEC,
            "run",
            "--job",
            "7",
            "--shells",
            "2",
            "--",
            "sh",
            "-c",
            "sleep 1; exit $SDEXEC_RANK",
        ],
        env=server_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    b = as_root("run", "--job", "7.1", "--", "sh", "-c", "exit 5")
    assert b.returncode == 5, b.stderr
    _out, err = a.communicate(timeout=60)
    assert a.returncode == 1, err  # the highest of the shells' codes: rank 1's


def test_guest_barrier_failure_does_not_drain_the_node(
    server_conf: ServerConf, public_dir: Path
) -> None:
    """M6: a guest can stop its own shells; that fails its job, never the node."""
    lazy = public_dir / "lazy-shell"
    lazy.write_text(
        '#!/bin/sh\nif [ "$SDEXEC_RANK" = 1 ]; then exec sleep 60; fi\n'
        'exec /opt/sdexec/bin/python -m sdexec.exec.shell "$@"\n'
    )
    lazy.chmod(0o755)
    server_conf(
        f'[exec]\njob-shell = "{lazy}"\nbarrier-timeout = "2s"\n'
        '[sdexec]\nguest-credentials = "systemd"\n'
    )
    p = as_guest("run", "--job", "gbar", "--shells", "2", "--", "echo", "ran")
    assert p.returncode == 125 and "barrier" in p.stderr, p.stderr
    drains = json.loads(as_root("drain", "list", "--json").stdout)
    assert drains == [], drains
    assert as_guest("run", "--", "true").returncode == 0


# --- M7 / M8: a broken state directory ---------------------------------------------------------


def test_corrupt_state_database_is_one_line_and_the_server_stays(
    server_conf: ServerConf,
) -> None:
    state = Path("/var/lib/sdexec-corrupt")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o700)
    (state / "state.sqlite3").write_bytes(b"this is not a database" * 100)
    (state / "state.sqlite3").chmod(0o600)
    try:
        server_conf(f'[sdexec]\nstate-dir = "{state}"\n')
        for _ in range(7):  # more than systemd's start limit, had the server died each time
            p = as_root("run", "--", "true")
            assert p.returncode == 125, p.stderr
            assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
            assert "state database" in p.stderr
        pid = _server_pid()
        assert pid != 0
        (state / "state.sqlite3").unlink()  # the admin fixes it: no restart needed
        p = as_root("run", "--", "echo", "works")
        assert (p.returncode, p.stdout) == (0, "works\n"), p.stderr
        assert_server_alive(pid)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_full_state_directory_leaves_no_stale_running_record(
    server_conf: ServerConf,
) -> None:
    state = Path("/run/sdexec-full")
    state.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], check=True
    )
    try:
        server_conf(f'[sdexec]\nstate-dir = "{state}"\n')
        procs = [
            start_until_ready(
                "run",
                "--job",
                f"full{i}",
                "--",
                "sh",
                "-c",
                "echo ready; sleep 1; exit 3",
                env=server_env(),
            )
            for i in range(1, 6)
        ]
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={state}/filler", "bs=64k"], capture_output=True, check=False
        )
        for proc in procs:
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode == 3, err
        (state / "filler").unlink()
        p = as_root("run", "--job", "full1", "--", "echo", "again")
        assert (p.returncode, p.stdout) == (0, "again\n"), p.stderr
        jobs = json.loads(as_root("jobs", "--json").stdout)
        assert [j for j in jobs if j.get("jobid")] == [], jobs
    finally:
        DROPIN.unlink(missing_ok=True)
        _restart_server()
        subprocess.run(["umount", str(state)], check=False)


def test_a_guest_sees_no_orphans_of_other_users() -> None:
    proc = start_until_ready(
        "run", "--job", "rootE", "--", "sh", "-c", "echo ready; sleep 2", env=server_env()
    )
    p = as_guest("jobs", "--json")
    assert p.returncode == 0, p.stderr
    assert "rootE" not in p.stdout, p.stdout
    proc.communicate(timeout=60)


def test_killed_server_gives_every_client_its_status() -> None:
    """H6: the client knows the job id before the unit starts; a SIGKILLed server loses
    nothing (the next one re-adopts) and no client reports "not started" for a job that ran."""
    proc = start_until_ready(
        "run", "--job", "srvk", "--", "sh", "-c", "echo ready; sleep 2; exit 9", env=server_env()
    )
    subprocess.run(["systemctl", "kill", "-s", "KILL", "sdexec.service"], check=True)
    _out, err = proc.communicate(timeout=90)
    assert proc.returncode == 9, err
    assert "Traceback" not in err


def test_protocol_checks_still_hold() -> None:
    """What held up stays held: no fds, a request over 4 MiB, bytes that are not UTF-8."""
    as_root("run", "--", "true")
    pid = _server_pid()
    answer = reply(raw(run_request(["--", "true"]), fds=False))
    assert answer["exit"] == 2 and "stdin, stdout and stderr" in str(answer["stderr"]), answer
    answer = reply(raw(b'{"op": "run", "argv": ["' + b"x" * (5 << 20) + b'"]}\n'))
    assert answer["exit"] == 2 and "too large" in str(answer["stderr"]), answer
    answer = reply(raw(b'{"op": "run", "argv": ["\xff\xfe"], "env": {}, "cwd": "/"}\n'))
    assert answer["exit"] == 2, answer
    assert_server_alive(pid)
