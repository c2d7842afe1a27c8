"""sdexec: run HPC jobs as transient systemd units.

The library's public surface is what ``from sdexec import ...`` gives (``__all__``); see the
README's "The library" and ``docs/library.md``. Names are re-exported lazily: ``sdexec run``
pays for every import on its start-up path, so the heavy modules (dbus-fast, sqlite3) are only
imported when a name that needs them is first used.
"""

from __future__ import annotations

TYPE_CHECKING = False  # the typing module would cost every `sdexec run` its import
__version__ = "0.1.0"

_EXPORTS = {
    # configuration
    "ExecConfig": "sdexec.config.table",
    "load_config": "sdexec.config.table",
    "parse_config": "sdexec.config.table",
    # one job as one unit: asyncio's Process, for systemd
    "Launcher": "sdexec.exec.launcher",
    "Job": "sdexec.exec.launcher",
    "JobSpec": "sdexec.exec.launcher",
    "PIPE": "sdexec.exec.channel",
    "DEVNULL": "sdexec.exec.channel",
    # the job-exec service: policy, services, records, barrier, drain
    "JobRequest": "sdexec.jobexec.policy",
    "Handle": "sdexec.jobexec.handle",
    "select_service": "sdexec.jobexec.policy",
    "start_job": "sdexec.jobexec.shells",
    "attach_job": "sdexec.jobexec.attach",
    # errors: each carries the exit code the CLI uses
    "SdexecError": "sdexec.errors",
    "UsageError": "sdexec.errors",
    "ConfigError": "sdexec.errors",
    "LaunchError": "sdexec.errors",
    "RefusedError": "sdexec.errors",
    "CommandNotFound": "sdexec.errors",
    "CommandNotExecutable": "sdexec.errors",
}

__all__ = [
    "DEVNULL",
    "PIPE",
    "CommandNotExecutable",
    "CommandNotFound",
    "ConfigError",
    "ExecConfig",
    "Handle",
    "Job",
    "JobRequest",
    "JobSpec",
    "LaunchError",
    "Launcher",
    "RefusedError",
    "SdexecError",
    "UsageError",
    "__version__",
    "attach_job",
    "load_config",
    "parse_config",
    "select_service",
    "start_job",
]

if TYPE_CHECKING:
    from typing import Any

    from sdexec.config.table import ExecConfig, load_config, parse_config
    from sdexec.errors import (
        CommandNotExecutable,
        CommandNotFound,
        ConfigError,
        LaunchError,
        RefusedError,
        SdexecError,
        UsageError,
    )
    from sdexec.exec.channel import DEVNULL, PIPE
    from sdexec.exec.launcher import Job, JobSpec, Launcher
    from sdexec.jobexec.attach import attach_job
    from sdexec.jobexec.handle import Handle
    from sdexec.jobexec.policy import JobRequest, select_service
    from sdexec.jobexec.shells import start_job


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdexec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
