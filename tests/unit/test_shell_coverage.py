"""The job shell writes its coverage data when measured (tests/run), though it never exits
normally: it ends with os._exit, or by re-raising its job's fatal signal on itself, and
neither runs coverage's atexit. Unmeasured, it does not even import coverage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import coverage
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL_PY = str(ROOT / "sdexec" / "exec" / "shell.py")


def _unmeasured_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}


def _measured_shell(tmp_path: Path, script: str) -> tuple[int, set[int]]:
    """Run ``sdexec-shell -- sh -c script`` under coverage; its status and shell.py's lines."""
    data = tmp_path / "data"
    data.mkdir()
    env = {
        **_unmeasured_env(),
        "COVERAGE_PROCESS_START": str(ROOT / "pyproject.toml"),
        "COVERAGE_FILE": str(data / "shell"),
    }
    p = subprocess.run(
        [sys.executable, "-m", "sdexec.exec.shell", "--", "sh", "-c", script],
        cwd=ROOT, env=env, timeout=60, check=False,
    )  # fmt: skip
    files = list(data.iterdir())
    assert len(files) == 1, f"the shell wrote {files}"
    cov = coverage.CoverageData(basename=str(files[0]))
    cov.read()
    lines = {ln for f in cov.measured_files() if f.endswith("sdexec/exec/shell.py")
             for ln in cov.lines(f) or ()}  # fmt: skip
    return p.returncode, lines


def _line_of(text: str) -> int:
    for n, line in enumerate(Path(SHELL_PY).read_text().splitlines(), 1):
        if text in line:
            return n
    raise AssertionError(f"{text!r} is not in shell.py")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_shell_dying_by_its_jobs_signal_saves_its_data(tmp_path: Path, sig: int) -> None:
    rc, lines = _measured_shell(tmp_path, f"kill -{int(sig)} $$")
    assert rc == -sig  # still dies the job's way
    assert _line_of("sig = os.WTERMSIG(status)") in lines
    assert _line_of("resource.setrlimit(resource.RLIMIT_CORE") in lines  # up to the kill
    assert _line_of("def run_shell(") in lines and _line_of("pid = spawn(argv, env)") in lines


def test_a_shell_exiting_with_its_jobs_code_saves_its_data(tmp_path: Path) -> None:
    rc, lines = _measured_shell(tmp_path, "exit 3")
    assert rc == 3
    assert _line_of("code = os.waitstatus_to_exitcode(status)") in lines


def test_unmeasured_the_shell_never_imports_coverage() -> None:
    code = (
        "import sys; from sdexec.exec import shell; shell._save_coverage(); "
        "print('coverage' in sys.modules)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_unmeasured_env(), capture_output=True,
        text=True, timeout=60, check=True,
    )  # fmt: skip
    assert p.stdout == "False\n"
