"""``sdexec config check``: validate a config and print the effective settings.

The TOML printed here is meant to be pasted back into a config file, so it is emitted by a
small writer for exactly the shapes :meth:`ExecConfig.to_dict` produces, and reads back equal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from sdexec.config.show import toml_key, toml_string
from sdexec.config.table import ExecConfig, load_config
from sdexec.systemd.enforce import unenforceable

__all__ = ["check", "dump_toml"]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{toml_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    lines.append("[" + ".".join(toml_key(p) for p in path) + "]")
    subtables = []
    for k, v in table.items():
        if isinstance(v, Mapping) and v:
            subtables.append((k, v))
        else:
            lines.append(f"{toml_key(k)} = {_value(v)}")
    for k, v in subtables:
        lines.append("")
        _table(lines, [*path, k], v)


def dump_toml(data: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """TOML text for a mapping of tables (nested tables allowed, scalars and arrays in them)."""
    lines = [f"# {h}" for h in header.splitlines()]
    for name, table in data.items():
        if lines:
            lines.append("")
        _table(lines, [name], table)
    return "\n".join(lines) + "\n"


def check(args: argparse.Namespace) -> int:
    """Print the effective config; errors propagate as ConfigError (exit 2 from the CLI)."""
    config = load_config(args.path)
    data = config.to_dict()
    names = [p.name for p in config.unit_properties]
    if args.cores is not None or args.gpus is not None or args.bind_from is not None:
        import os

        from sdexec.exec.binding import resolve
        from sdexec.exec.launcher import bound_unit_properties, job_properties

        binding = resolve(args.cores, args.gpus, args.bind_from, os.environ)
        names = [p.name for p in bound_unit_properties(config, binding)]
        data["exec"]["sdexec-properties"] = job_properties(config, binding)
    host = host_enforcement(config, names)
    if args.json:
        sys.stdout.write(json.dumps({**data, "host": host}, indent=2) + "\n")
        return 0
    sources = ", ".join(config.sources) if config.sources else "built-in defaults"
    header = f"effective sdexec configuration, from: {sources}"
    if "binding" in locals():
        header += "\nsdexec-properties as bound to this job's cores/GPUs"
    sys.stdout.write(dump_toml(data, header=header))
    for name, entry in host["unenforced"].items():
        verdict = (
            "accepted unenforced ([sdexec] allow-unenforced: a downgrade)"
            if entry["allowed"]
            else "jobs are refused"
        )
        sys.stdout.write(f"# {name} is not enforced on this host ({entry['why']}): {verdict}\n")
    return 0


def host_enforcement(config: ExecConfig, names: list[str]) -> dict[str, Any]:
    """What this host's cgroups cannot enforce of the configured limits (checked here, where
    the config is used: the same file is fine on a pure cgroup-v2 node)."""
    allowed = set(config.sdexec.allow_unenforced)
    bad = unenforceable(names)
    return {"unenforced": {k: {"why": v, "allowed": k in allowed} for k, v in bad.items()}}
