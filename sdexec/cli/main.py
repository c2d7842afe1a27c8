"""Command-line entry point: argument parsing and dispatch only.

Each subcommand lives in its own ``sdexec.cmd_*`` module and is imported only when chosen, so
``sdexec run`` does not pay for SQLite or the config printer, and ``sdexec config check`` does not
pay for D-Bus.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from sdexec.errors import SdexecError
from sdexec.protocol.args import build_parser, first_command

# subcommand -> "module:function"; each function takes the parsed Namespace and returns an exit code
HANDLERS = {
    "run": "sdexec.cli.cmd_run:main",
    "attach": "sdexec.cli.cmd_run:attach",
    "config-check": "sdexec.cli.cmd_config:check",
    "stats": "sdexec.cli.cmd_stats:main",
    "drain-list": "sdexec.cli.cmd_drain:list_",
    "drain-clear": "sdexec.cli.cmd_drain:clear",
    "drain-set": "sdexec.cli.cmd_drain:set_",
    "jobs": "sdexec.cli.cmd_stats:jobs",
    "serve": "sdexec.server.server:main",
    "epilog": "sdexec.cli.cmd_epilog:main",
}


def _handler_key(args: argparse.Namespace) -> str:
    if args.command == "config":
        return f"config-{args.config_command}"
    if args.command == "drain":
        return f"drain-{args.drain_command}"
    return str(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(first_command(argv)).parse_args(argv)
        level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
        logging.basicConfig(level=level, format="sdexec: %(levelname)s: %(message)s")
        module_name, func_name = HANDLERS[_handler_key(args)].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args))
    except SdexecError as e:
        sys.stderr.write(f"sdexec: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except ImportError as e:  # an install without its dependencies: say which, no traceback
        sys.stderr.write(f"sdexec: missing dependency: {e} (pip install sdexec installs them)\n")
        return 125
    except BrokenPipeError:
        return 141


def entry() -> None:
    """The ``sdexec`` program (not ``main``, which tests and embedders call in-process)."""
    if "ssl" not in sys.modules:
        # asyncio imports ssl when it can (~7 ms, a quarter of systemd-run's whole run); the
        # program never uses TLS: a None entry makes that import fail and asyncio goes without.
        sys.modules["ssl"] = None  # type: ignore[assignment]
    sys.exit(main())


if __name__ == "__main__":
    entry()
