"""The cluster's install path: podman's name resolution (netavark + aardvark-dns) is installed
through apt when absent (a fresh machine may have podman with CNI only)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import CLUSTER


def test_missing_network_helpers_are_installed_through_apt(tmp_path: Path) -> None:
    helpers = tmp_path / "podman-helpers"  # where the script looks: empty, so both are absent
    helpers.mkdir()
    shims = tmp_path / "bin"
    shims.mkdir()
    log = tmp_path / "apt.log"
    # apt-get is the real one, behind a shim that records how it was asked
    (shims / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec /usr/bin/apt-get "$@"\n')
    (shims / "apt-get").chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SDEXEC_PODMAN_HELPERS=str(helpers))
    p = subprocess.run(
        [CLUSTER, "tools"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert p.returncode == 0, p.stderr
    assert "installing netavark aardvark-dns" in p.stderr, p.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("install") and "netavark aardvark-dns" in c for c in calls), calls
    for pkg in ("netavark", "aardvark-dns"):
        status = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}", pkg],
            capture_output=True,
            text=True,
            check=False,
        )
        assert status.stdout == "install ok installed", (pkg, status.stdout)


def test_tools_present_installs_nothing(tmp_path: Path) -> None:
    log = tmp_path / "apt.log"
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit 1\n')
    (shims / "apt-get").chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}")
    p = subprocess.run([CLUSTER, "tools"], env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert not log.exists()
