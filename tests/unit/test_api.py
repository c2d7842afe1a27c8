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
