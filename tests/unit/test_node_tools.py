"""``containers/node``'s tool check asks apt for every tool missing from PATH (issue 10).

On a fresh machine the README's first command printed "podman: command not found": the
script's own ``podman()`` wrapper made ``command -v podman`` true, so podman was never
installed. This runs the real check (``containers/node tools``) with a PATH that lacks the
tools and a stub ``apt-get`` that records what it is asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = Path(__file__).resolve().parents[2] / "containers" / "node"
TOOLS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap", "newuidmap": "uidmap"}
# what the script needs from PATH before it reaches the check
BASICS = ("dirname", "sha256sum", "cut", "cat")


def _bin(tmp_path: Path, present: set[str]) -> Path:
    """A PATH directory with the basics, a recording apt-get, and stubs of ``present``."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in BASICS:
        found = shutil.which(name)
        assert found is not None, name
        (d / name).symlink_to(found)
    log = tmp_path / "apt.log"
    (d / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    for name in present:
        (d / name).write_text("#!/bin/sh\nexit 0\n")
    for f in d.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    return d


def _check(tmp_path: Path, present: set[str]) -> list[str]:
    d = _bin(tmp_path, present)
    env = {"PATH": str(d), "HOME": str(tmp_path), "SDEXEC_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(
        ["/bin/bash", str(NODE), "tools"], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_every_missing_tool_is_installed(tmp_path: Path) -> None:
    calls = _check(tmp_path, set())
    assert calls[0] == "update -qq"
    assert calls[1].split() == ["install", "-y", "-qq", "podman", "runc", "mmdebstrap", "uidmap"]
    assert len(calls) == 2


@pytest.mark.parametrize("missing", sorted(TOOLS))
def test_only_the_missing_tool_is_installed(tmp_path: Path, missing: str) -> None:
    """podman alone missing is asked for too (the podman() wrapper must not count)."""
    calls = _check(tmp_path, set(TOOLS) - {missing})
    assert calls == ["update -qq", f"install -y -qq {TOOLS[missing]}"]


def test_nothing_installed_when_all_present(tmp_path: Path) -> None:
    assert _check(tmp_path, set(TOOLS)) == []


def test_the_host_path_has_no_tool_leaking_in(tmp_path: Path) -> None:
    """The test's PATH really lacks the tools (else it could not fail)."""
    d = _bin(tmp_path, set())
    for tool in TOOLS:
        assert shutil.which(tool, path=str(d)) is None
    assert os.access(d / "apt-get", os.X_OK)
