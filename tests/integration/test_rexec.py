"""rexec: the job as a plain local process group, with sdexec's termination semantics.

What a host without systemd gets (and what ``service-override`` can pick): its exit status
or fatal signal, leftovers in its group treated like a unit lingering in *deactivating*
(SIGTERM when the main process exits, SIGKILL from the stop timer), a cancel that escalates
from term-signal to kill-signal, a signal for the shell alone, and a start that fails with
126 when the kernel refuses the program. Real processes, in the node (whose systemd, as PID 1,
reaps the leftovers these tests orphan: on a host without a reaping init they would linger
as zombies and keep the group alive).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from sdexec.config.table import ExecConfig, parse_config
from sdexec.errors import CommandNotExecutable
from sdexec.exec.channel import DEVNULL
from sdexec.exec.rexec import RexecJob

WAIT = 60.0  # a bound for events that take milliseconds: only a broken rexec reaches it


def _cfg(**exec_table: object) -> ExecConfig:
    return parse_config({"exec": {"service": "rexec", **exec_table}})


async def _start(cfg: ExecConfig, script: str, jobid: str, cwd: Path) -> RexecJob:
    return await RexecJob.start(
        cfg, jobid=jobid, argv=["sh", "-c", script], env=dict(os.environ), cwd=str(cwd),
        stdin=DEVNULL,
    )  # fmt: skip


async def _line(job: RexecJob) -> str:
    assert job.stdout is not None
    return (await asyncio.wait_for(job.stdout.readline(), WAIT)).decode()


def _dead(pid: int) -> bool:
    """Gone, or a zombie (dead, not yet reaped by the init it was orphaned to)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + WAIT
    while not _dead(pid):  # a foreign process's end: no event to wait for
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        await asyncio.sleep(0.02)


async def test_exit_status_and_output(tmp_path: Path) -> None:
    job = await _start(_cfg(), "echo out; echo err >&2; exit 7", "rx-exit", tmp_path)
    assert job.stdout is not None and job.stderr is not None
    out, err = await asyncio.gather(job.stdout.read(), job.stderr.read())
    assert await asyncio.wait_for(job.wait(), WAIT) == 7
    assert (out, err) == (b"out\n", b"err\n")
    assert job.exit_code == 7 and not job.running and job.error is None
    assert job.pgid == job.pid  # its own session and group


async def test_fatal_signal_is_the_status(tmp_path: Path) -> None:
    job = await _start(_cfg(), "kill -USR1 $$", "rx-sig", tmp_path)
    assert await asyncio.wait_for(job.wait(), WAIT) == -signal.SIGUSR1
    assert job.exit_code == 128 + signal.SIGUSR1
    assert os.WIFSIGNALED(job.wait_status or 0)


async def test_leftovers_get_sigterm_when_the_main_process_exits(tmp_path: Path) -> None:
    job = await _start(_cfg(), "sleep 300 >/dev/null 2>&1 & echo $!; exit 3", "rx-left", tmp_path)
    leftover = int(await _line(job))
    assert await asyncio.wait_for(job.wait(), WAIT) == 3  # the main process's status
    await _wait_dead(leftover)
    # seen lingering (the timer armed), gone on SIGTERM (never needed the timer's signal)
    assert job.stop_timer is not None and job.stop_timer.armed_at is not None
    assert job.stop_timer.signalled_at is None and job.stop_timer.state == "done"


async def test_leftovers_ignoring_sigterm_get_the_stop_timers_sigkill(tmp_path: Path) -> None:
    """The stop timer's signal, at its default, is SIGKILL without the IMP."""
    cfg = _cfg(**{"sdexec-stop-timer-sec": 1})
    job = await _start(
        cfg, "trap '' TERM; sleep 300 >/dev/null 2>&1 & echo $!; exit 0", "rx-stubborn", tmp_path
    )
    leftover = int(await _line(job))
    assert await asyncio.wait_for(job.wait(), WAIT) == 0
    await _wait_dead(leftover)
    assert job.stop_timer is not None and job.stop_timer.signalled_at is not None
    assert job.result != "abandoned" and job.error is None


async def test_cancel_sends_term_signal_to_the_group(tmp_path: Path) -> None:
    job = await _start(_cfg(), "sleep 300 & echo ready; wait", "rx-cancel", tmp_path)
    assert await _line(job) == "ready\n"
    job.cancel()
    assert await asyncio.wait_for(job.wait(), WAIT) == -signal.SIGTERM


async def test_cancel_escalates_to_kill_signal_after_kill_timeout(tmp_path: Path) -> None:
    cfg = _cfg(**{"kill-timeout": "0.2s"})
    job = await _start(
        cfg, "trap '' TERM; echo ready; while :; do sleep 0.05; done", "rx-kill", tmp_path
    )
    assert await _line(job) == "ready\n"
    job.cancel()
    assert await asyncio.wait_for(job.wait(), WAIT) == -signal.SIGKILL


async def test_main_signal_reaches_the_shell_only(tmp_path: Path) -> None:
    script = (
        "sleep 300 & child=$!; "
        "trap 'kill -0 $child && echo child-alive; kill $child; exit 5' USR1; "
        "echo ready; while :; do sleep 0.05; done"
    )
    job = await _start(_cfg(), script, "rx-main", tmp_path)
    assert await _line(job) == "ready\n"
    await job.signal(signal.SIGUSR1, "main")
    assert await _line(job) == "child-alive\n"
    assert await asyncio.wait_for(job.wait(), WAIT) == 5


async def test_signals_after_the_end_are_no_error(tmp_path: Path) -> None:
    job = await _start(_cfg(), "exit 0", "rx-late", tmp_path)
    assert await asyncio.wait_for(job.wait(), WAIT) == 0
    await job.signal(signal.SIGTERM, "all")  # the group is gone
    await job.signal(signal.SIGTERM, "main")  # so is the main process
    await job.forget()
    assert job.error is None and job.returncode == 0


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\x01\x02 not a program\n", "Exec format error"),
        (b"#!/no/such/interpreter\n", "No such file or directory"),
    ],
)
async def test_a_program_the_kernel_refuses_is_126(
    tmp_path: Path, content: bytes, why: str
) -> None:
    prog = tmp_path / "prog"
    prog.write_bytes(content)
    prog.chmod(0o755)
    with pytest.raises(CommandNotExecutable, match=f"could not be started: {why}") as e:
        await RexecJob.start(
            _cfg(), jobid="rx-bad", argv=[str(prog)], env=dict(os.environ), cwd=str(tmp_path),
            stdin=DEVNULL,
        )  # fmt: skip
    assert e.value.exit_code == 126


async def test_an_interpreter_without_exec_permission_is_126(tmp_path: Path) -> None:
    """execve's EACCES (root included: no x bit at all) is "permission denied", not a crash."""
    interp = tmp_path / "interp"
    interp.write_text("#!/bin/sh\n")
    interp.chmod(0o644)
    prog = tmp_path / "prog"
    prog.write_text(f"#!{interp}\n")
    prog.chmod(0o755)
    with pytest.raises(CommandNotExecutable, match="Permission denied") as e:
        await RexecJob.start(
            _cfg(), jobid="rx-perm", argv=[str(prog)], env=dict(os.environ), cwd=str(tmp_path),
            stdin=DEVNULL,
        )  # fmt: skip
    assert e.value.exit_code == 126
