"""A job running across `systemctl daemon-reexec` / `daemon-reload` still reports its own status."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from .conftest import SDEXEC

Config = Callable[..., str]


@pytest.mark.parametrize("action", ["daemon-reexec", "daemon-reload"])
def test_status_survives_systemd_reexec(config: Config, action: str) -> None:
    cfg = config()
    proc = subprocess.Popen(
        [
            *SDEXEC,
            "-v",
            "run",
            "--config",
            cfg,
            "--job",
            f"reexec-{action}",
            "--",
            "sh",
            "-c",
            "sleep 2; echo still-here; exit 42",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.7)
    subprocess.run(["systemctl", action], check=True, timeout=30)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 42, err
    assert out == "still-here\n"
