"""sdexec under a real Slurm: steps through sdexec, the PMI start barrier, drain through
scontrol, cancellation, ordinary users, allocation limits (issue 13)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

from .conftest import (
    HELD_SHELL,
    configure,
    drain_reasons,
    hold_shells,
    job_units,
    no_job_units,
    node_states,
    on,
    read_lines,
    release_shells,
    start,
    wait_for,
)

# the job prints its Slurm job id once its trap is set: the test then knows whom to cancel
TRAPPED = (
    "trap 'echo {sig} >> /tmp/sdexec-test-sig-$SLURM_JOB_ID; exit 0' {sig}; "
    "echo ready $SLURM_JOB_ID $(hostname); while :; do sleep 0.1; done"
)


def srun(
    args: str, *, check: bool = False, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return on("ctl", f"srun {args}", check=check, timeout=timeout)


# --- steps through sdexec -------------------------------------------------------------------


def test_each_node_runs_the_step_in_a_unit_named_for_the_job() -> None:
    p = srun("-l -N2 --mpi=pmi2 sdexec run -- cat /proc/self/cgroup")
    assert p.returncode == 0, p.stderr
    # systemd's own hierarchy names the unit: "0::..." (unified) or "1:name=systemd:..."
    units = sorted(set(re.findall(r"^(\d): .*/(shell-\d+-\d+\.\d+\.service)$", p.stdout, re.M)))
    assert len(units) == 2, p.stdout
    (t0, u0), (t1, u1) = units
    job0 = re.fullmatch(r"shell-0-(\d+)\.0\.service", u0)
    job1 = re.fullmatch(r"shell-1-(\d+)\.0\.service", u1)
    assert (t0, t1) == ("0", "1") and job0 and job1, units
    assert job0.group(1) == job1.group(1)  # one job, both nodes


def test_statuses_reach_srun() -> None:
    # --kill-on-bad-exit=0: each task ends by itself (with the cluster's KillOnBadExit=1 the
    # first to fail would get the other one's client terminated: 143 from a slower node)
    step = "-N2 --kill-on-bad-exit=0 sdexec run --"
    assert srun(f"{step} true").returncode == 0
    assert srun(f"{step} sh -c 'exit 3'").returncode == 3
    killed = srun(f"{step} sh -c 'kill -KILL $$'")
    assert killed.returncode == 137, killed.stderr


def test_job_identity_comes_from_slurm() -> None:
    p = srun("-l -N2 sdexec run -- sh -c 'echo $SDEXEC_JOBID $SDEXEC_RANK $SDEXEC_SIZE'")
    assert p.returncode == 0, p.stderr
    lines = sorted(p.stdout.split("\n")[:2])
    m = [re.fullmatch(r"(\d): (\d+)\.0 (\d) 2", line) for line in lines]
    assert all(m) and [x.group(1) for x in m if x] == ["0", "1"], lines
    assert [x.group(3) for x in m if x] == ["0", "1"]


# --- the start barrier over PMI ---------------------------------------------------------------


def test_barrier_holds_every_node_until_all_arrive() -> None:
    configure('[exec]\nbarrier-timeout = "60s"')
    configure(f'[exec]\nbarrier-timeout = "60s"\njob-shell = "{HELD_SHELL}"', ("node2",))
    hold_shells("node2")
    proc = start(
        "ctl",
        "srun -N2 --mpi=pmi2 sdexec run -- sh -c 'date +%s.%N > /tmp/sdexec-test-ran; echo ran'",
    )
    try:
        # node1's shell is in its unit and at the barrier; node2's is held before it
        wait_for("node1's unit", lambda: job_units("node1"))
        wait_for("node2's held shell", lambda: job_units("node2"))
        time.sleep(1)  # room for a wrong early start on node1 (asserted absent below)
        assert on("node1", "test -e /tmp/sdexec-test-ran", check=False).returncode == 1
        released = time.time()
        release_shells("node2")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.count("ran") == 2
    ran_at = float(on("node1", "cat /tmp/sdexec-test-ran").stdout)
    assert ran_at >= released - 1, (ran_at, released)  # node1 went only once node2 arrived


def test_barrier_timeout_fails_the_job_everywhere_and_drains_the_waiting_node() -> None:
    timeout = 5
    configure(f'[exec]\nbarrier-timeout = "{timeout}s"')
    configure(f'[exec]\nbarrier-timeout = "{timeout}s"\njob-shell = "{HELD_SHELL}"', ("node2",))
    hold_shells("node2")
    t0 = time.monotonic()
    p = srun("-N2 --mpi=pmi2 sdexec run -- sh -c 'echo ran'", timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "ran" not in p.stdout  # on no node did the command start
    assert "start barrier failed" in p.stderr, p.stderr
    assert elapsed >= timeout
    reasons = drain_reasons()
    assert set(reasons) == {"node1"}, reasons  # node1 waited; node2 was held
    jobid = re.search(r"job (\d+)\.0", reasons["node1"])
    assert jobid and "start barrier failed" in reasons["node1"], reasons
    local = json.loads(on("node1", "sdexec drain list --json").stdout)
    assert local and jobid.group(1) in local[0]["reason"]
    no_job_units()  # node2's held shell too: the epilog ended it


def test_barrier_timeout_zero_waits_forever() -> None:
    timeout = 5
    configure('[exec]\nbarrier-timeout = "0"')
    configure(f'[exec]\nbarrier-timeout = "0"\njob-shell = "{HELD_SHELL}"', ("node2",))
    hold_shells("node2")
    proc = start("ctl", "srun -N2 --mpi=pmi2 sdexec run -- sh -c 'echo ran'")
    try:
        wait_for("node2's held shell", lambda: job_units("node2"))
        time.sleep(3 * timeout)  # what is tested: still waiting after 3x a timeout
        assert proc.poll() is None
        assert job_units("node1") and not drain_reasons()
        release_shells("node2")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.count("ran") == 2


# --- drain through the resource manager -------------------------------------------------------


LINGER = "sh -c 'trap \"\" TERM USR1; exec sleep 60' & sleep 0.3; echo main-done; exit 0"


def test_abandoned_unit_drains_the_node_in_slurm_until_cleared() -> None:
    configure("[exec]\nsdexec-stop-timer-sec = 2\nsdexec-stop-timer-signal = 10", ("node2",))
    p = srun(f"-N1 -w node2 sdexec run -- sh -c {shlex.quote(LINGER)}")
    assert p.returncode == 125, (p.stdout, p.stderr)
    assert "abandoned" in p.stderr
    reasons = drain_reasons()
    jobid = re.search(r"job (\d+)", reasons.get("node2", ""))
    assert set(reasons) == {"node2"} and jobid, reasons
    assert "abandoned" in reasons["node2"] or "did not respond" in reasons["node2"], reasons
    # systemd's own stop timeout ends the abandoned unit; then clear both drains
    no_job_units()
    on("node2", "sdexec drain clear")
    on("ctl", "scontrol update NodeName=node2 State=RESUME")
    wait_for("node2 idle", lambda: node_states().get("node2") == "idle")
    again = srun("-N1 -w node2 sdexec run -- echo back")
    assert again.returncode == 0 and again.stdout.strip() == "back", again.stderr


def test_drain_refused_by_slurm_is_reported_and_kept() -> None:
    # a drain command Slurm refuses (no such node): logged, the local record stays, and the
    # Epilog's failure makes Slurm drain the node anyway
    configure(
        "[exec]\nsdexec-stop-timer-sec = 2\nsdexec-stop-timer-signal = 10\n[sdexec]\n"
        'drain-command = ["scontrol", "update", "NodeName=nosuchnode", "State=DRAIN", '
        '"Reason={reason}"]',
        ("node2",),
    )
    p = srun(f"-N1 -w node2 sdexec run -- sh -c {shlex.quote(LINGER)}")
    assert p.returncode == 125 and "abandoned" in p.stderr, p.stderr
    local = json.loads(on("node2", "sdexec drain list --json").stdout)
    assert len(local) == 1 and "abandoned" in local[0]["reason"], local
    log = on("node2", "journalctl -q -u sdexec.service --no-pager | tail -50").stdout
    assert "drain-command scontrol failed" in log, log
    wait_for("Slurm to drain node2 for its Epilog", lambda: "node2" in drain_reasons())
    assert drain_reasons()["node2"] == "Epilog error"
    no_job_units()


# --- cancellation -----------------------------------------------------------------------------


def _signals_seen(job: str) -> dict[str, str]:
    return {h: on(h, f"cat /tmp/sdexec-test-sig-{job} 2>/dev/null", check=False).stdout
            for h in ("node1", "node2")}  # fmt: skip


def test_scancel_ends_every_unit_with_term_first() -> None:
    proc = start("ctl", "srun -N2 sdexec run -- sh -c " + shlex.quote(TRAPPED.format(sig="TERM")))
    try:
        ready = read_lines(proc, 2, r"^ready ")
        job = ready[0].split()[1]
        on("ctl", f"scancel {job}")
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    no_job_units()
    assert _signals_seen(job) == {"node1": "TERM\n", "node2": "TERM\n"}


def test_interrupted_srun_ends_every_unit_with_term_first() -> None:
    proc = start(
        "ctl",
        "echo $$ > /tmp/sdexec-test-srun.pid; exec srun -N2 sdexec run -- sh -c "
        + shlex.quote(TRAPPED.format(sig="TERM")),
    )
    try:
        ready = read_lines(proc, 2, r"^ready ")
        job = ready[0].split()[1]
        # Ctrl-C twice within a second: srun forwards SIGINT and ends the step
        on("ctl", "p=$(cat /tmp/sdexec-test-srun.pid); kill -INT $p; sleep 0.3; kill -INT $p")
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    no_job_units()
    assert _signals_seen(job) == {"node1": "TERM\n", "node2": "TERM\n"}


def test_clients_killed_by_slurm_leave_no_unit() -> None:
    # task 1 fails once task 0 runs: KillOnBadExit SIGKILLs task 0's client at once (no
    # cancel from it); the Epilog ends its unit, term-signal first
    script = (
        'if [ "$SLURM_PROCID" = 1 ]; then '
        "while [ ! -e /tmp/sdexec-test-go ]; do sleep 0.1; done; exit 1; fi; "
        + TRAPPED.format(sig="TERM")
    )
    proc = start("ctl", "srun -N2 sdexec run -- sh -c " + shlex.quote(script))
    try:
        ready = read_lines(proc, 1, r"^ready ")
        job = ready[0].split()[1]
        on("node2", "touch /tmp/sdexec-test-go")
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    no_job_units()
    assert _signals_seen(job)["node1"] == "TERM\n"


def test_time_limit_sends_sigalrm_first() -> None:
    script = (
        "trap 'echo TERM >> /tmp/sdexec-test-sig-$SLURM_JOB_ID; exit 0' TERM; "
        + TRAPPED.format(sig="ALRM")
    )
    proc = start("ctl", "srun -N2 --time=1 sdexec run -- sh -c " + shlex.quote(script))
    try:
        ready = read_lines(proc, 2, r"^ready ")
        job = ready[0].split()[1]
        proc.communicate(timeout=150)  # Slurm's minute, and its enforcement interval
    finally:
        proc.kill()
    no_job_units()
    seen = _signals_seen(job)
    assert {h: s.split("\n")[0] for h, s in seen.items()} == {"node1": "ALRM", "node2": "ALRM"}, (
        seen
    )


# --- limits from the allocation ---------------------------------------------------------------


def test_allocation_memory_becomes_memory_max_capped_by_the_site() -> None:
    # Slurm exports an allocation's memory (salloc/sbatch) to its steps' tasks
    configure('[exec.sdexec-properties]\nMemoryMax = "512M"\n[sdexec]\nallocation-memory = true')
    show = (
        "cat /sys/fs/cgroup/memory$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup)"
        "/memory.limit_in_bytes"
    )
    step = f"srun sdexec run -- sh -c {shlex.quote(show)}"
    small = on("ctl", f"salloc -Q -N2 --mem=100M {step}", check=False)
    assert small.returncode == 0, small.stderr
    assert small.stdout.split() == [str(100 << 20)] * 2
    per_cpu = on("ctl", f"salloc -Q -N1 --mem-per-cpu=60M {step}", check=False)
    assert per_cpu.returncode == 0, per_cpu.stderr
    assert per_cpu.stdout.split() == [str(60 << 20)]  # x 1 CPU per node
    big = on("ctl", f"salloc -Q -N1 --mem=900M {step}", check=False)
    assert big.returncode == 0, big.stderr
    assert big.stdout.split() == [str(512 << 20)]  # the site's bound holds
    configure('[exec.sdexec-properties]\nMemoryMax = "512M"')
    off = on("ctl", f"salloc -Q -N1 --mem=100M {step}", check=False)
    assert off.stdout.split() == [str(512 << 20)], off.stderr  # a site option: off by default


# --- ordinary users ---------------------------------------------------------------------------

ALICE = 1600

# A hand-made client of the node's server: one request with our own stdin, a pipe as stdout
# and our stderr; prints {"exit": N, "stdout": "...", "stderr": [...]}.
HAND_MADE = r"""
import json, os, socket, sys
request = json.loads(sys.argv[1])
nfds = int(sys.argv[2])
r, w = os.pipe()
sock = socket.socket(socket.AF_UNIX)
sock.connect("/run/sdexec/sdexec.sock")
fds = [0, w, 2, 0][:nfds]
socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], fds)
os.close(w)
answer = {}
for line in sock.makefile("rb"):
    msg = json.loads(line)
    if "exit" in msg:
        answer = msg
        break
sock.close()
out = b""
while chunk := os.read(r, 65536):
    out += chunk
answer["stdout"] = out.decode()
print(json.dumps(answer))
"""


def _as_alice(request: dict[str, object], nfds: int = 3) -> dict[str, object]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/alice"}
    full: dict[str, object] = {"op": "run", "env": env, "cwd": "/tmp"}
    full.update(request)
    p = on(
        "node1",
        "runuser -u alice -- /opt/sdexec/bin/python -c "
        f"{shlex.quote(HAND_MADE)} {shlex.quote(json.dumps(full))} {nfds}",
    )
    result: dict[str, object] = json.loads(p.stdout)
    return result


def test_alices_step_runs_as_alice_in_its_unit() -> None:
    p = on(
        "ctl",
        "runuser -u alice -- srun -l -N2 --chdir=/tmp sdexec run -- "
        "sh -c 'id -u; grep -o -m1 \"shell-[0-9]*-[0-9.]*service\" /proc/self/cgroup'",
        check=False,
    )
    assert p.returncode == 0, p.stderr
    by_task: dict[str, list[str]] = {}
    for line in p.stdout.splitlines():
        task, _, value = line.partition(": ")
        by_task.setdefault(task, []).append(value)
    assert sorted(by_task) == ["0", "1"], p.stdout
    for task, (uid, unit) in by_task.items():
        assert uid == str(ALICE), p.stdout
        assert re.fullmatch(rf"shell-{task}-\d+\.0\.service", unit), p.stdout


def test_alice_cannot_run_a_job_as_anyone_else() -> None:
    # through the CLI, in a step
    p = on(
        "ctl",
        "runuser -u alice -- srun -N1 --chdir=/tmp sdexec run --owner root -- id -u",
        check=False,
    )
    assert p.returncode == 125 and "only the instance owner" in p.stderr, (p.stdout, p.stderr)
    assert "0\n" not in p.stdout
    # a hand-made request naming root (by name and by uid), or another user
    for owner in ("root", "0", "guest"):
        refused = _as_alice({"argv": ["--owner", owner, "--", "id", "-u"]})
        assert refused["exit"] == 125 and refused["stdout"] == "", refused
    # root's identity in the environment changes nothing: SO_PEERCRED decides
    forged = _as_alice(
        {
            "argv": ["--", "id", "-u"],
            "env": {"PATH": "/usr/bin:/bin", "USER": "root", "LOGNAME": "root",
                    "SDEXEC_IMP_USER": "root", "SLURM_JOB_UID": "0"},
        }
    )  # fmt: skip
    assert forged["exit"] == 0 and forged["stdout"] == f"{ALICE}\n", forged
    # a PMI fd announced but not sent: a bad request, nothing runs
    bad = _as_alice({"argv": ["--", "id", "-u"], "pmi_fd": True})
    assert bad["exit"] == 2 and bad["stdout"] == "", bad
