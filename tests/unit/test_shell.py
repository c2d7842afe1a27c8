"""The built-in job shell, run as a real subprocess: exit codes, death by signal, forwarding."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdexec.exec.barrier import LocalBarrierServer
from sdexec.exec.clock import FakeClock

ROOT = Path(__file__).resolve().parents[2]
SHELL = [sys.executable, "-m", "sdexec.exec.shell"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDEXEC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run(*cmd: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHELL, "--", *cmd],
        env=_env(**env),
        input=input,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture
def short_dir() -> Iterator[str]:
    """unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="sdsh", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("code", [0, 7])
def test_exit_code_is_passed_through(code: int) -> None:
    r = run("sh", "-c", f"exit {code}")
    assert r.returncode == code
    assert r.stderr == ""


def test_stdio_is_inherited() -> None:
    r = run("sh", "-c", "read x; echo out:$x; echo err:$x >&2", input="hello\n")
    assert r.returncode == 0
    assert r.stdout == "out:hello\n"
    assert r.stderr == "err:hello\n"


def test_command_not_found_is_127() -> None:
    r = run("sdexec-no-such-command-xyz", "arg")
    assert r.returncode == 127
    assert r.stderr == "sdexec-shell: sdexec-no-such-command-xyz: command not found\n"


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    r = run(str(script))
    assert r.returncode == 126
    assert r.stdout == ""
    assert r.stderr.startswith(f"sdexec-shell: {script}: ")


def test_no_command_is_a_usage_error() -> None:
    r = subprocess.run([*SHELL, "--"], env=_env(), capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert "no command given" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_death_by_signal_is_reproduced(sig: signal.Signals) -> None:
    r = run("sh", "-c", f"kill -{sig.name.removeprefix('SIG')} $$")
    assert r.returncode == -sig


def test_child_gets_default_sigpipe() -> None:
    # Python ignores SIGPIPE; the job must not inherit that: yes dies of SIGPIPE, as in a shell
    r = run("sh", "-c", "(yes; echo yes-status=$? >&2) | head -n1 >/dev/null")
    assert r.returncode == 0
    assert r.stderr == "yes-status=141\n"


# a task to wait for, started before "ready" is printed, that never holds the test's pipes
SLEEPER = "sleep 30 </dev/null >/dev/null 2>&1 &"


def _start(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SHELL, "--", "sh", "-c", script],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_is_forwarded_to_the_child(sig: signal.Signals) -> None:
    name = sig.name.removeprefix("SIG")
    proc = _start(f'trap "echo got-{name}; exit 3" {name}; {SLEEPER} echo ready; wait')
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    assert out == f"got-{name}\n"
    assert proc.returncode == 3  # the shell survived the signal and reported the child's exit


def test_signal_reaches_the_whole_process_group() -> None:
    inner = f"trap 'echo inner-term; exit 0' TERM; {SLEEPER} echo inner-ready; wait"
    outer = f'trap "echo outer-term" TERM; sh -c "{inner}" & echo outer-ready; wait; wait; exit 4'
    proc = _start(outer)
    assert proc.stdout is not None
    ready = {proc.stdout.readline(), proc.stdout.readline()}
    assert ready == {"outer-ready\n", "inner-ready\n"}
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert sorted(out.split()) == ["inner-term", "outer-term"]
    assert proc.returncode == 4


def test_barrier_failure_does_not_run_the_command(short_dir: str) -> None:
    marker = Path(short_dir) / "ran"
    r = run("touch", str(marker), SDEXEC_BARRIER=f"{short_dir}/missing.sock", SDEXEC_RANK="0")
    assert r.returncode == 1
    assert r.stderr.startswith("sdexec-shell: start barrier")
    assert not marker.exists()


def test_bad_rank_is_refused(short_dir: str) -> None:
    r = run("true", SDEXEC_BARRIER=f"{short_dir}/b.sock", SDEXEC_RANK="one")
    assert r.returncode == 1
    assert "SDEXEC_RANK" in r.stderr


async def test_shells_wait_for_each_other_at_the_barrier(short_dir: str) -> None:
    path = f"{short_dir}/b.sock"
    server = LocalBarrierServer(path, 2, timeout=0, clock=FakeClock(auto_advance=False))
    await server.start()
    try:
        script = 'echo "rank=$SDEXEC_RANK barrier=${SDEXEC_BARRIER:-unset}"'
        procs = [
            await asyncio.create_subprocess_exec(
                *SHELL,
                "--",
                "sh",
                "-c",
                script,
                env=_env(SDEXEC_BARRIER=path, SDEXEC_RANK=str(rank), SDEXEC_SIZE="2"),
                stdout=asyncio.subprocess.PIPE,
            )
            for rank in (0, 1)
        ]
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 20)
        await server.wait()
        assert [p.returncode for p in procs] == [0, 0]
        # the job does not see the barrier socket (a nested shell must not enter it again)
        assert [o for o, _ in outs] == [b"rank=0 barrier=unset\n", b"rank=1 barrier=unset\n"]
    finally:
        await server.close()
