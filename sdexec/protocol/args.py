"""The argument language of every command, built on demand. It is also the wire protocol: a
client sends its argv and the server parses it with this same grammar (served=True: a parser
that never prints or exits), so the two can never disagree on what a request means."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from sdexec import __version__
from sdexec.errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are a UsageError (one line naming the argument, exit code 2), so
    the server can answer a client's bad arguments instead of exiting; and no abbreviations:
    ``--he`` must not mean ``--help`` (nor ``--conf`` ``--config``), whatever is added later."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("sdexec").strip()
        raise UsageError(f"{where + ': ' if where else ''}{message} (see '{self.prog} --help')")


class _ServedParser(_Parser):
    """The parser of a request the server received: it prints nothing (that would go to the
    server's journal) and never exits (``--help``/``--version`` are the client's to print)."""

    def _print_message(self, message: str, file: Any = None) -> None:
        pass

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(
            "run: --help and --version are not served by the sdexec server "
            "(run 'sdexec run --help' in a terminal)"
        )


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 0, 3)")
    return int(text)


def _positive(text: str) -> int:
    n = _natural(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return n


MAX_SHELLS = 1024
"""Shells of one job on one node: each is a unit, a client must not make the node start 1e5."""


def _shells(text: str) -> int:
    n = _positive(text)
    if n > MAX_SHELLS:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {MAX_SHELLS} shells on one node")
    return n


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="a TOML file, or a directory of *.toml merged like conf.d "
        "(default: $SDEXEC_CONFIG, else /etc/sdexec/conf.d or /etc/sdexec/exec.toml if present)",
    )


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_summary(p: argparse.ArgumentParser) -> None:
    # also after the subcommand, so a server's client can ask (``sdexec -v run`` runs
    # in-process); SUPPRESS keeps a count given before the subcommand
    p.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log progress, and end with one line per shell: result, status, runtime, "
        "CPU time, memory peak, IO bytes, tasks peak (like systemd-run --wait)",
    )  # fmt: skip


COMMANDS = ("run", "attach", "config", "stats", "jobs", "drain", "serve", "epilog")


def build_parser(only: str | None = None, *, served: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's (argparse is slow to build: a short
    job's start pays for every parser built, so ``sdexec run`` builds one). ``served``: for
    the server's requests (see :class:`_ServedParser`)."""
    cls = _ServedParser if served else _Parser
    parser = cls(prog="sdexec", description="Run HPC jobs as transient systemd units.")
    parser.add_argument("--version", action="version", version=f"sdexec {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=cls)
    sub.required = True
    for name in COMMANDS:
        if only is None or only == name:
            _BUILDERS[name](sub)
    return parser


def first_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def _add_binding(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cores", metavar="LIST", help='bind to these cores of the node (e.g. "0-3"; + siblings)'
    )
    p.add_argument("--gpus", metavar="LIST", help='bind to these GPUs of the node (e.g. "0,1")')
    p.add_argument(
        "--bind-from",
        metavar="RM",
        choices=["slurm"],
        help="take cores/GPUs from the resource manager's environment (slurm)",
    )


def _build_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run one job and relay its stdio and exit status")
    _add_config(run)
    run.add_argument(
        "--job", metavar="ID",
        help="job id (default: Slurm's SLURM_JOB_ID.SLURM_STEP_ID, else a fresh one)",
    )  # fmt: skip
    run.add_argument(
        "--rank",
        type=_natural,
        default=None,
        metavar="N",
        help="(first) shell rank on this node (default: Slurm's SLURM_PROCID, else 0)",
    )
    run.add_argument(
        "--shells",
        type=_shells,
        default=1,
        metavar="N",
        help="shells of this job on the node (ranks RANK..RANK+N-1), meeting at the start barrier",
    )
    run.add_argument(
        "--setattr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="job attribute, e.g. system.exec.test.run_duration=1s (repeatable)",
    )
    run.add_argument("--user", action="store_true", help="use the calling user's systemd manager")
    run.add_argument(
        "--owner", metavar="USER", help="run the job as this user (guest jobs go through imp)"
    )
    run.add_argument("--time-limit", metavar="FSD", help="terminate the job after this duration")
    run.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one)")
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for the job (repeatable)",
    )
    run.add_argument("--keep-unit", action="store_true", help="keep a failed unit for post-mortem")
    _add_binding(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the unit properties the job would get (bound, scaled) and start nothing",
    )
    _add_json(run)
    _add_summary(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def _build_attach(sub: Any) -> None:
    attach = sub.add_parser("attach", help="re-attach to a job started by another sdexec process")
    _add_config(attach)
    attach.add_argument("--job", metavar="ID", required=True)
    attach.add_argument(
        "--user", action="store_true", help="use the calling user's systemd manager"
    )
    _add_json(attach)
    _add_summary(attach)


def _build_config(sub: Any) -> None:
    config = sub.add_parser("config", help="configuration tools")
    csub = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    check = csub.add_parser("check", help="validate a config and print the effective [exec] table")
    check.add_argument("path", nargs="?", metavar="PATH", help="TOML file or conf.d directory")
    _add_binding(check)
    _add_json(check)


def _build_stats(sub: Any) -> None:
    stats = sub.add_parser("stats", help="kill configuration and per-job termination state")
    _add_config(stats)
    _add_json(stats)


def _build_jobs(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="jobs recorded on this node")
    _add_config(jobs)
    _add_json(jobs)


def _build_drain(sub: Any) -> None:
    drain = sub.add_parser("drain", help="this node's drain state")
    dsub = drain.add_subparsers(dest="drain_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    dl = dsub.add_parser("list", help="show the drain record(s)")
    _add_config(dl)
    _add_json(dl)
    dc = dsub.add_parser("clear", help="undrain the node")
    _add_config(dc)
    ds = dsub.add_parser("set", help="drain the node by hand")
    _add_config(ds)
    ds.add_argument("reason", metavar="REASON")


def _build_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="the node's resident launcher (what `sdexec run` uses)")
    _add_config(serve)
    serve.add_argument("--user", action="store_true", help="serve the calling user's manager")
    serve.add_argument(
        "--socket", metavar="PATH", help="listen here (default: /run/sdexec/sdexec.sock, or "
        "$XDG_RUNTIME_DIR/sdexec/sdexec.sock with --user; systemd socket activation if given)",
    )  # fmt: skip


def _build_epilog(sub: Any) -> None:
    ep = sub.add_parser(
        "epilog", help="end a resource manager's job's units on this node (Slurm's Epilog)"
    )
    _add_config(ep)
    ep.add_argument("--job", metavar="ID", help="the job (default: $SLURM_JOB_ID)")
    ep.add_argument(
        "--timeout", metavar="FSD", help="how long the units may take to end (default: 5m)"
    )
    ep.add_argument("--user", action="store_true", help="the calling user's systemd manager")
    _add_json(ep)


_BUILDERS = {
    "epilog": _build_epilog,
    "serve": _build_serve,
    "run": _build_run,
    "attach": _build_attach,
    "config": _build_config,
    "stats": _build_stats,
    "jobs": _build_jobs,
    "drain": _build_drain,
}
