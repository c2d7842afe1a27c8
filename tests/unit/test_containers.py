"""The test nodes' tool checks install what a fresh machine lacks (CI runs on fresh machines).

The check runs with a PATH that holds only the few tools the script needs to get that far and
a stub ``apt-get`` recording its arguments: each missing tool must be asked for by its Debian
package, and nothing when all are there. A shell function of the same name must not count as
the tool (``type -P``, not ``command -v``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VM = ROOT / "containers" / "vm"
BASE_TOOLS = ("dirname", "sha256sum", "cut", "cat")
VM_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
}


def _bin(tmp_path: Path, present: tuple[str, ...]) -> tuple[Path, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in BASE_TOOLS:
        real = shutil.which(tool)
        assert real is not None, tool
        (bindir / tool).symlink_to(real)
    log = tmp_path / "apt.log"
    stub = bindir / "apt-get"
    stub.write_text(f'#!{shutil.which("bash")}\nprintf "%s\\n" "$*" >> {log}\n')
    stub.chmod(0o755)
    for tool in present:
        fake = bindir / tool
        fake.write_text("#!/bin/false\n")
        fake.chmod(0o755)
    return bindir, log


def _run_tools(bindir: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    script = f'{prelude}\nsource "{VM}" tools'
    return subprocess.run(
        [bash, "-c", script],
        env={"PATH": str(bindir), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_vm_installs_every_missing_tool(tmp_path: Path) -> None:
    bindir, log = _bin(tmp_path, ())
    p = _run_tools(bindir)
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq", calls
    installed = calls[1].split()
    assert installed[:4] == ["install", "-y", "-qq", "--no-install-recommends"], calls
    assert sorted(installed[4:]) == sorted(set(VM_TOOLS.values())), calls
    assert "installing" in p.stderr


def test_vm_asks_for_nothing_when_all_tools_are_there(tmp_path: Path) -> None:
    bindir, log = _bin(tmp_path, tuple(VM_TOOLS))
    p = _run_tools(bindir)
    assert p.returncode == 0, p.stderr
    assert not log.exists(), log.read_text()


@pytest.mark.parametrize("tool", sorted(VM_TOOLS))
def test_vm_a_shell_function_is_not_the_tool(tmp_path: Path, tool: str) -> None:
    others = tuple(t for t in VM_TOOLS if t != tool)
    bindir, log = _bin(tmp_path, others)
    p = _run_tools(bindir, prelude=f"{tool}() {{ :; }}")
    assert p.returncode == 0, p.stderr
    assert log.read_text().splitlines()[1].split()[4:] == [VM_TOOLS[tool]]
