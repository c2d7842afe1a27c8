"""Fuzzing what a user hands ``sdexec run``: --setattr, --env, --job, --owner and argv.

Everything here reaches systemd or the job: a bad value must be refused with a one-line
UsageError/RefusedError before anything starts, and an accepted one must arrive verbatim and be
unable to name another unit. The bugs it found are pinned by regression tests at the end.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdexec.config.table import ExecConfig
from sdexec.errors import (
    CommandNotExecutable,
    CommandNotFound,
    RefusedError,
    SdexecError,
    UsageError,
)
from sdexec.exec.command import check_environment, resolve_program
from sdexec.jobexec.policy import SERVICE_ATTR, JobRequest, select_service
from sdexec.systemd.start import UnitPlan, properties
from sdexec.systemd.unitname import JOBID_MAX, UNIT_NAME_MAX, object_path, unit_name

FUZZ = settings(max_examples=100, deadline=None)

# any code point a str from argv or os.environ can hold, surrogates (surrogateescape) aside:
# those are the regression tests at the end
ANY = st.characters(codec="utf-8")
PRINTABLE = st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" ")
HOSTILE = [
    "", " ", ".", "..", "../../etc/passwd", "/", "a/b", "\n", "a\nb", "\0", "a\0b", "\r", "\t",
    "\x1b[2J", "\x7f", "\u0085", "\u2028", "\u200b", "\ufeff", "ü", "💥", "a-b", "-", "--",
    "a@b", "a.service", "shell-0-x", "\\", "\\x2d", "$HOME", "${HOME}", "$$", "%i", "=",
    "a=b", "x" * 10_240, "é" * 64, "💥" * 32,
]  # fmt: skip
HOSTILE_TEXT = st.sampled_from(HOSTILE) | st.text(ANY, max_size=40)


def one_printable_line(message: str) -> None:
    assert message
    assert "\n" not in message
    assert message.isprintable(), repr(message)


# --- 3. --setattr / --env parsing and service selection --------------------------------------


@FUZZ
@given(st.lists(HOSTILE_TEXT, max_size=6), st.sampled_from(["--setattr", "--env"]))
@example(["FOO"], "--env")
@example(["=x"], "--setattr")
@example(["a=b=c", "a=d"], "--env")
def test_parse_assignments(items: list[str], option: str) -> None:
    from sdexec.protocol.request import parse_assignments

    bad = [item for item in items if "=" not in item or item.startswith("=")]
    try:
        out = parse_assignments(items, option)
    except UsageError as e:
        assert e.exit_code == 2
        assert bad, "refused a list with only KEY=VALUE items"
        one_printable_line(str(e))
        assert str(e).startswith(f"{option}: {bad[0]!r} is not KEY=VALUE")
        return
    assert not bad
    expected: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        expected[key] = value
    assert out == expected


ATTR_KEYS = [
    "system.exec.test", "system.exec.test.run_duration", "system.exec.test.", "system.exec.testx",
    SERVICE_ATTR, SERVICE_ATTR + ".x", "system.exec.", "system.exec", "system.exec.imp",
    "user.anything", "system.other",
]  # fmt: skip
SERVICE_VALUES = ["sdexec", "rexec", "testexec", "", "SDEXEC", " sdexec"]


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(ATTR_KEYS) | st.text(PRINTABLE, max_size=20),
        st.sampled_from(SERVICE_VALUES) | st.text(PRINTABLE, max_size=20),
        max_size=4,
    ),
    st.sampled_from(["rexec", "sdexec"]),
    st.booleans(),
    st.sampled_from([None, "/usr/libexec/flux/flux-imp"]),
)
def test_select_service_own_jobs(
    attrs: dict[str, str], service: str, override: bool, imp: str | None
) -> None:
    cfg = ExecConfig(service=service, service_override=override, imp=imp)
    req = JobRequest(jobid="f1", argv=["true"], env={}, cwd="/", attrs=attrs)
    # the reference's order: testexec, then unknown system.exec.*, then the override
    test = any(k == "system.exec.test" or k.startswith("system.exec.test.") for k in attrs)
    unknown = any(k.startswith("system.exec.") and k != SERVICE_ATTR for k in attrs)
    wanted = attrs.get(SERVICE_ATTR)
    expected: str | type[SdexecError]
    if test:
        expected = "testexec"
    elif unknown:
        expected = UsageError
    elif wanted is None:
        expected = service
    elif not override:
        expected = RefusedError
    elif wanted not in ("rexec", "sdexec"):
        expected = UsageError
    else:
        expected = wanted
    try:
        got = select_service(cfg, req)
    except SdexecError as e:
        assert type(e) is expected, (type(e), expected)
        assert e.exit_code == (2 if isinstance(e, UsageError) else 125)
        one_printable_line(str(e))
        assert str(e).startswith("--setattr")
        return
    assert got == expected


OWNERS = [None, "root", "0", str(os.getuid()), "12345", "4294967295", "nosuchuser-sdexec-fuzz"]


@FUZZ
@given(
    st.sampled_from(OWNERS) | st.from_regex(r"[0-9]{1,12}", fullmatch=True),
    st.dictionaries(st.sampled_from(ATTR_KEYS), st.sampled_from(SERVICE_VALUES), max_size=2),
    st.builds(
        ExecConfig,
        service=st.sampled_from(["rexec", "sdexec"]),
        service_override=st.booleans(),
        imp=st.sampled_from([None, "/usr/libexec/flux/flux-imp"]),
    ),
)
def test_select_service_other_owners(
    owner: str | None, attrs: dict[str, str], cfg: ExecConfig
) -> None:
    req = JobRequest(jobid="f1", argv=["true"], env={}, cwd="/", attrs=attrs, owner=owner)
    try:
        got = select_service(cfg, req)
    except (UsageError, RefusedError) as e:
        one_printable_line(str(e))
        return
    assert got in ("testexec", "rexec", "sdexec")
    if req.guest() and got != "testexec":
        # a guest never runs without the IMP, and never through rexec
        assert os.getuid() == 0 and cfg.imp and got == "sdexec"


# --- 4. job ids -> unit names and object paths -----------------------------------------------

UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\-]+\.service")
PATH_RE = re.compile(r"/[A-Za-z0-9_/]*")


def decode_unit(name: str) -> tuple[bool, int, str]:
    """The inverse of unit_name: proves injectivity outright, not only on sampled pairs."""
    guest = name.startswith("imp-shell-")
    rest = name.removeprefix("imp-shell-" if guest else "shell-").removesuffix(".service")
    rank, _, escaped = rest.partition("-")
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "\\":
            assert escaped[i + 1] == "x", name
            raw.append(int(escaped[i + 2 : i + 4], 16))
            i += 4
        else:
            raw += escaped[i].encode()
            i += 1
    return guest, int(rank), raw.decode("utf-8")


def decode_path(path: str) -> str:
    prefix = "/org/freedesktop/systemd1/unit/"
    assert path.startswith(prefix)
    label = path[len(prefix) :]
    return re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), label)


def check_object_path(path: str) -> None:
    assert PATH_RE.fullmatch(path), path
    assert all(path.split("/")[1:]), path  # no empty element, no trailing "/"


JOBIDS = st.sampled_from(HOSTILE) | st.text(ANY, max_size=40) | st.text(max_size=140)


@FUZZ
@given(JOBIDS, st.integers(min_value=-2, max_value=10**9), st.booleans())
@example("..", 0, False)
@example("a/../../b", 0, True)
@example("x" * JOBID_MAX, 0, False)
@example("💥" * 15, 0, False)
def test_unit_name_is_safe_or_refused(jobid: str, rank: int, guest: bool) -> None:
    try:
        name = unit_name(jobid, rank, guest=guest)
    except UsageError as e:
        one_printable_line(str(e))
        assert str(e).startswith(("--job: ", "--rank: "))
        fine = (
            jobid
            and len(jobid) <= JOBID_MAX
            and jobid.isascii()
            and all(c.isalnum() or c in "-_.:" for c in jobid)
            and len(jobid) + 40 <= UNIT_NAME_MAX
        )
        assert rank < 0 or not fine, f"refused a plain job id {jobid!r}"
        return
    assert UNIT_RE.fullmatch(name), name
    assert len(name.encode()) <= UNIT_NAME_MAX
    assert "/" not in name and "\0" not in name and "@" not in name
    assert decode_unit(name) == (guest, rank, jobid)
    path = object_path(name)
    check_object_path(path)
    assert decode_path(path) == name


@FUZZ
@given(JOBIDS, JOBIDS, st.integers(min_value=0, max_value=99), st.booleans())
@example("a-b", "a\\x2db", 0, False)
@example("a/b", "a\\x2fb", 0, False)
@example("a\\b", "a\\x5cb", 0, False)
@example("2-x", "x", 1, False)
def test_unit_names_are_injective(a: str, b: str, rank: int, guest: bool) -> None:
    try:
        na = unit_name(a, rank, guest=guest)
        nb = unit_name(b, rank, guest=guest)
    except UsageError:
        return
    assert (na == nb) == (a == b), (a, b, na)
    assert (object_path(na) == object_path(nb)) == (a == b)
    # nor across ranks or the guest prefix (each may be refused as one byte too long)
    for other_rank, other_guest in ((rank + 1, guest), (rank, not guest)):
        try:
            assert unit_name(a, other_rank, guest=other_guest) != na
        except UsageError:
            pass


@pytest.mark.parametrize(
    "jobid",
    ["", "\n", "a\nb", "a\0b", "\x1b[2J", "\x7f", "x" * (JOBID_MAX + 1), "x" * 10_240,
     "💥" * 32],
)  # fmt: skip
def test_hostile_job_ids_refused(jobid: str) -> None:
    with pytest.raises(UsageError) as info:
        unit_name(jobid)
    one_printable_line(str(info.value))
    assert str(info.value).startswith("--job: ")


# --- 5. environment -------------------------------------------------------------------------

ENV_KEYS = st.sampled_from(["", "=", "A=B", "A\0", "A\nB", "PATH", "1X", "ünï", " ", "\t", "a b"])
ENV_VALUES = st.sampled_from(["", "a\0b", "$HOME", "a=b=c", "\n", "x" * 10_240, "=", "💥"])


@FUZZ
@given(st.dictionaries(ENV_KEYS | st.text(ANY, max_size=10), ENV_VALUES | HOSTILE_TEXT, max_size=4))
@example({"A=B": "x"})
@example({"OK": "a\0b"})
@example({"": "x"})
@example({"A\nB": "x"})
def test_check_environment(env: dict[str, str]) -> None:
    """Exactly systemd's rule (a shell identifier; no NUL, UTF-8 values) decides."""
    must_refuse = any(
        re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) is None or "\0" in v for k, v in env.items()
    )
    try:
        check_environment(env, "--env")
    except UsageError as e:
        assert e.exit_code == 2
        one_printable_line(str(e))
        assert str(e).startswith("--env: ")
        assert must_refuse
        return
    assert not must_refuse
    plan = UnitPlan(name="x.service", argv=("/bin/true",), env=env, cwd="/")
    entries = dict(properties(plan))["Environment"]
    assert entries[0] == "as"
    assert len(entries[1]) == len(env)
    for entry, (key, value) in zip(entries[1], env.items(), strict=True):
        assert entry.partition("=") == (key, "=", value)
        assert key.isprintable()


# --- 7. argv reaches the program verbatim ----------------------------------------------------

ARGS = st.lists(
    st.sampled_from(["$", "$$", "$HOME", "${HOME}", "$1", "a$", "%i", "\\$", ";", "\n", ""])
    | st.text(ANY, max_size=20),
    max_size=6,
)


@FUZZ
@given(st.text(ANY, max_size=20).map(lambda s: "/" + s), ARGS, st.booleans())
@example("/bin/echo", ["$HOME", "$$", "a\nb"], False)
@example("/bin/echo", ["$HOME", "$$", "a\nb"], True)
def test_exec_start_carries_argv(path: str, args: list[str], expand_env: bool) -> None:
    argv = (path, *args)
    plan = UnitPlan(
        name="x.service",
        argv=argv,
        env={"K": "$V"},
        cwd="/",
        expand_env=expand_env,
        extra=(("MemoryMax", "t", 1),),
    )
    props = properties(plan)
    names = [n for n, _ in props]
    assert len(names) == len(set(names)), names
    by_name = dict(props)
    assert by_name["Environment"] == ("as", ["K=$V"])
    assert props[-1] == ("MemoryMax", ("t", 1))
    if not expand_env:
        assert "ExecStart" not in by_name
        assert by_name["ExecStartEx"] == ("a(sasas)", [[path, list(argv), ["no-env-expand"]]])
        return
    assert "ExecStartEx" not in by_name
    sig, [[exe, escaped, ignore_failure]] = by_name["ExecStart"]
    assert (sig, exe, ignore_failure) == ("a(sasb)", path, False)
    assert len(escaped) == len(argv)
    for original, sent in zip(argv, escaped, strict=True):
        assert sent.count("$") == 2 * original.count("$")
        assert sent.replace("$$", "$") == original
        assert re.fullmatch(r"(?:[^$]|\$\$)*", sent, re.S)


# --- resolve_program: a path or a 126/127/2, never another exception -------------------------


@pytest.fixture(scope="module")
def bin_dir() -> Any:
    with tempfile.TemporaryDirectory() as d:
        for name, mode in (("prog", 0o755), ("data", 0o644)):
            with open(os.path.join(d, name), "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(os.path.join(d, name), mode)
        os.mkdir(os.path.join(d, "dir"))
        yield d


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["prog", "data", "dir", "./prog", "dir/../prog", "/", "", "\0", "a\0b", ".."])
    | st.text(ANY, max_size=20)
)
def test_resolve_program(bin_dir: str, program: str) -> None:
    try:
        path = resolve_program(program, {"PATH": bin_dir}, bin_dir)
    except (CommandNotFound, CommandNotExecutable, UsageError) as e:
        assert e.exit_code in (127, 126, 2)
        return
    assert os.path.isabs(path)
    st_mode = os.stat(path).st_mode
    assert stat.S_ISREG(st_mode) and os.access(path, os.X_OK)


# --- regressions: each a bug this fuzzing found, now fixed ----------------------------------


@pytest.mark.parametrize("owner", ["²", "³⁴", "a\0b"])
def test_hostile_owner_is_a_usage_error(owner: str) -> None:
    req = JobRequest(jobid="f1", argv=["true"], env={}, cwd="/", owner=owner)
    kind = ""
    try:
        select_service(ExecConfig(imp="/usr/libexec/flux/flux-imp", service="sdexec"), req)
    except SdexecError:
        pass
    except ValueError as e:
        kind = type(e).__name__
    assert not kind, f"{kind} escaped select_service for --owner {owner!r}"


def test_refused_override_message_is_one_line() -> None:
    req = JobRequest(jobid="f1", argv=["true"], env={}, cwd="/", attrs={SERVICE_ATTR: "a\nb"})
    with pytest.raises(RefusedError) as info:
        select_service(ExecConfig(service_override=False), req)
    one_printable_line(str(info.value))


def test_undecodable_job_id_is_a_usage_error() -> None:
    jobid = b"job\xff".decode("utf-8", "surrogateescape")  # what argv gives for a non-UTF-8 id
    with pytest.raises(UsageError):
        unit_name(jobid)


def test_undecodable_environment_value_is_refused() -> None:
    value = b"\xff".decode("utf-8", "surrogateescape")  # os.environ's view of a non-UTF-8 value
    try:
        check_environment({"FOO": value}, "--env")
    except UsageError as e:
        assert str(e).startswith("--env: ")
        return
    # accepted: then every entry must at least be sendable as a D-Bus string
    plan = UnitPlan(name="x.service", argv=("/bin/true",), env={"FOO": value}, cwd="/")
    for entry in dict(properties(plan))["Environment"][1]:
        entry.encode("utf-8")
