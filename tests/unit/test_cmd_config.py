from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdexec.cli.cmd_config import dump_toml
from sdexec.cli.main import main
from sdexec.config.table import ExecConfig, load_config, parse_config

DATA = Path(__file__).parent / "data"


def test_check_prints_toml_that_reads_back_equal(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "full.toml"
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective sdexec configuration, from: {path}\n")
    assert "[exec.sdexec-properties]" in out
    assert 'kill-timeout = "10s"' in out
    assert 'term-signal = "SIGINT"' in out
    assert parse_config(tomllib.loads(out)) == load_config(path)


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "full.toml"
    assert main(["config", "check", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exec"]["service"] == "sdexec"
    assert data["exec"]["sdexec-properties"]["MemoryMax"] == "90%"
    assert data["sdexec"]["slice"] == "sdexec.slice"
    assert parse_config(data) == load_config(path)


def test_check_defaults(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "flux.toml").write_text("[resource]\nnoverify = true\n")
    assert main(["config", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert parse_config(tomllib.loads(out)) == ExecConfig()
    assert 'service = "rexec"' in out
    assert 'barrier-timeout = "30m"' in out


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[exec]\nkill-timeout = "soon"\n', 'exec.kill-timeout: "soon" is not a duration'),
        ('[exec]\nkill-timout = "5s"\n', "did you mean 'kill-timeout'?"),
        ('[exec]\nkill-timeout = "5s\n', "line 2, column"),
    ],
)
def test_check_invalid_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, fragment: str
) -> None:
    f = tmp_path / "exec.toml"
    f.write_text(text)
    assert main(["config", "check", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"sdexec: {f}: ")
    assert fragment in captured.err
    assert "Traceback" not in captured.err


def test_check_missing_path_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "check", str(tmp_path / "nope.toml")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_dump_toml_escapes() -> None:
    data: dict[str, Any] = {
        "t": {
            "s": 'quote " back \\ tab \t nl \n del \x7f nul \x00 é ☃',
            "odd key": 1,
            "f": 2.5,
            "inf": math.inf,
            "l": ["a", 1, True],
            "empty": {},
            "sub": {"x": False, "deeper": {"y": "z"}},
        }
    }
    assert tomllib.loads(dump_toml(data)) == data


toml_scalars = st.one_of(
    st.text(st.characters(codec="utf-8")),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
)
keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10)
tables = st.dictionaries(keys, st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3)))


@given(st.dictionaries(keys, st.dictionaries(keys, st.one_of(toml_scalars, tables)), max_size=3))
def test_dump_toml_round_trip(data: dict[str, Any]) -> None:
    assert tomllib.loads(dump_toml(data, header="a header\nover two lines")) == data
