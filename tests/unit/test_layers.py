"""The package's layers, checked: a module imports only from its own layer or the ones below.

The order is the data path a newcomer reads top-down in the README's Layout section: the
``[exec]`` table (config), systemd's operations (systemd), one job (exec), the job-exec policy
(jobexec), the request language both ends speak (protocol), the resident server (server), the
command line (cli). Every import counts, also those inside functions (lazy) and under
TYPE_CHECKING: an upward arrow there is still a dependency a reader must follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sdexec"
LAYERS = ("errors", "config", "systemd", "exec", "jobexec", "protocol", "server", "cli")
# the facade (``from sdexec import ...``) and ``python -m sdexec`` sit above every layer
FACADE = {"sdexec", "sdexec.__main__"}
# arrows inside a layer that would still point up: the pure stop timer below the sequence
FORBIDDEN = {("sdexec.exec.stoptimer", "sdexec.exec.termination")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sdexec"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "sdexec":
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from sdexec.config import table`
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


MODULES = _modules()


def test_every_module_is_in_a_layer() -> None:
    strays = [m for m in MODULES if m not in FACADE and _layer(m) is None]
    assert strays == [], f"modules outside the layers {LAYERS}: {strays}"


@pytest.mark.parametrize("name", sorted(set(MODULES) - FACADE))
def test_no_upward_import(name: str) -> None:
    own = _layer(name)
    assert own is not None
    up = sorted(
        m
        for m in _imports(name, MODULES[name])
        if m in MODULES and m not in FACADE and (_layer(m) or 0) > own
    )
    assert up == [], f"{name} (layer {LAYERS[own]}) imports from above: {up}"
    inside = sorted((name, m) for m in _imports(name, MODULES[name]) if (name, m) in FORBIDDEN)
    assert inside == [], f"forbidden arrows: {inside}"


def test_the_checker_sees_upward_arrows(tmp_path: Path) -> None:
    """The test above would pass on a tree it cannot read; this one proves it reads imports."""
    src = tmp_path / "m.py"
    src.write_text(
        "from sdexec.cli.main import main\n"
        "def f() -> None:\n    from sdexec.server import server\n"
        "from ..jobexec import policy\n"
    )
    found = _imports("sdexec.exec.m", src)
    assert {"sdexec.cli.main", "sdexec.server.server", "sdexec.jobexec.policy"} <= found
    assert _imports("sdexec.server.server", MODULES["sdexec.server.server"])  # reads real ones
    launcher = "sdexec.exec.launcher"
    assert "sdexec.config.table" in _imports(launcher, MODULES[launcher])


def test_server_does_not_import_the_cli() -> None:
    for name in MODULES:
        if name.startswith("sdexec.server"):
            assert not any(m.startswith("sdexec.cli") for m in _imports(name, MODULES[name]))
