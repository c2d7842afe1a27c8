"""The public API: ``from sdexec import ...`` is all a library user needs (issue 11)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import sdexec


def test_every_name_of_all_imports() -> None:
    assert set(sdexec.__all__) == {*sdexec._EXPORTS, "__version__"}
    for name in sdexec.__all__:
        assert getattr(sdexec, name) is not None, name
    from sdexec import JobSpec, Launcher, load_config, start_job  # the README's names

    assert callable(Launcher) and callable(JobSpec) and callable(load_config)
    assert callable(start_job)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Teleport'"):
        sdexec.Teleport  # noqa: B018


def test_import_sdexec_is_light() -> None:
    """The CLI's start-up imports the package: it must not pull dbus-fast or sqlite3 in."""
    heavy = "('dbus_fast', 'sqlite3', 'asyncio', 'typing')"
    code = f"import sdexec, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    # a Python measured by coverage (tests/run) has sqlite3 and typing before any import:
    # this one is not, so what it finds is sdexec's doing
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_a_plain_in_process_job_imports_only_what_it_uses() -> None:
    """An in-process ``sdexec run`` pays for every module it imports (bench/cli_latency.py):
    a job outside Slurm, without PMI, testexec or a conf.d directory, and without an error to
    suggest a spelling for, must not load their modules (shutil comes with argparse's
    formatter anyway)."""
    code = """
import argparse, os, sys
from sdexec.cli import cmd_run  # noqa: F401 - the in-process path's modules
from sdexec.jobexec import shells  # noqa: F401
from sdexec.protocol.args import build_parser
from sdexec.protocol.request import build_request
args = build_parser("run").parse_args(["run", "--job", "7", "--", "/bin/true"])
req = build_request(args, {"PATH": "/usr/bin:/bin"}, "/", None)
assert req.pmi is None and req.slurm_job is None
unwanted = ("sdexec.jobexec.slurm", "sdexec.exec.pmi", "sdexec.exec.barrier",
            "sdexec.exec.simulated", "difflib", "glob")
print(sorted(m for m in unwanted if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "SLURM_", "PMI_"))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]", out.stdout
