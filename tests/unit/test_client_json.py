"""The client's own JSON (sdexec/cli/client.py): what json.dumps/json.loads give, without
importing json (its decoder imports re), socket or signal (their enums): every job's start
pays for each module the client imports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.cli import client

ROOT = Path(__file__).resolve().parents[2]

# what a request holds (and a bit more): strings with anything in them, lone surrogates too
# (os.environ carries undecodable bytes as surrogateescape), integers, booleans, None
text = st.text(st.characters(codec=None, categories=None, min_codepoint=0))
scalars = st.one_of(text, st.integers(), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(text, inner, max_size=5)),
    max_leaves=30,
)


@given(values)
def test_dumps_is_json_dumps(value: Any) -> None:
    assert client.dumps(value) == json.dumps(value)


@given(values)
def test_loads_reads_what_json_dumps_wrote(value: Any) -> None:
    assert client.loads(json.dumps(value).encode()) == value


def test_a_request_as_the_client_sends_it() -> None:
    request = {
        "op": "run",
        "argv": ["--job", "j1", "--", "/bin/echo", 'a "quoted" \\ arg', "é\n\t"],
        "env": dict(os.environ, ODD="\udcff bytes"),
        "cwd": "/",
        "pmi_fd": True,
    }
    assert client.dumps(request) == json.dumps(request)
    assert json.loads(client.dumps(request)) == request


@pytest.mark.parametrize("bad", [1.5, {1: "x"}, b"bytes", {"k": object()}, {"k": {2}}])
def test_dumps_refuses_what_a_request_never_holds(bad: object) -> None:
    """A TypeError (a bug of ours, loud), never JSON the server would read otherwise."""
    with pytest.raises(TypeError):
        client.dumps(bad)


@pytest.mark.parametrize(
    "line",
    [b"", b"not json", b'{"exit": 0', b'{"exit": 0} trailing', b'{"a": "\\x"}', b"\xff\xfe"],
)
def test_loads_refuses_what_json_refuses(line: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(line)
    with pytest.raises(ValueError):
        client.loads(line)


def test_loads_of_the_server_answers() -> None:
    assert client.loads(b'{"accepted": "j1"}\n') == {"accepted": "j1"}
    assert client.loads(b' {"exit": 3, "stderr": ["sdexec: x", "\\u00e9"]} \r\n') == {
        "exit": 3,
        "stderr": ["sdexec: x", "é"],
    }
    value = client.loads(b"[NaN, Infinity, -Infinity, 1e3, 2]")
    assert (
        isinstance(value, list)
        and math.isnan(value[0])
        and value[1:]
        == [
            math.inf,
            -math.inf,
            1000.0,
            2,
        ]
    )


def test_the_client_imports_only_what_the_interpreter_has() -> None:
    """No json, re, socket, signal, enum, typing or asyncio on the server path's start."""
    heavy = ["json", "re", "socket", "signal", "enum", "typing", "asyncio", "selectors"]
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sdexec.cli.client; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("handler", [False, True])
def test_the_exit_skips_teardown_but_keeps_output_and_exit_handlers(handler: bool) -> None:
    """What the client says reaches stderr and its exit status is the job's; an exit handler
    (coverage's, under the tests) still runs."""
    code = (
        f"import sys, atexit; sys.path.insert(0, {str(ROOT)!r}); "
        "from sdexec.cli.client import _exit; "
        + ("atexit.register(lambda: sys.stderr.write('handler\\n')); " if handler else "")
        + "sys.stderr.write('sdexec: said\\n'); _exit(3)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 3
    assert p.stderr == "sdexec: said\n" + ("handler\n" if handler else "")
