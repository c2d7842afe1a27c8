"""Policy of the job-exec layer, decided before anything starts (no systemd needed)."""

from __future__ import annotations

import os

import pytest

from sdexec.config.table import parse_config
from sdexec.errors import RefusedError, UsageError
from sdexec.jobexec.handle import Handle
from sdexec.jobexec.policy import JobRequest, select_service


def req(**kw: object) -> JobRequest:
    base: dict[str, object] = {"jobid": "1", "argv": ["true"], "env": {}, "cwd": "/"}
    base.update(kw)
    return JobRequest(**base)  # type: ignore[arg-type]


def test_configured_service_is_used() -> None:
    assert select_service(parse_config({}), req()) == "rexec"  # the man page's default
    assert select_service(parse_config({"exec": {"service": "sdexec"}}), req()) == "sdexec"


def test_test_attributes_select_testexec() -> None:
    cfg = parse_config({"exec": {"service": "sdexec"}})
    assert select_service(cfg, req(attrs={"system.exec.test.run_duration": "1s"})) == "testexec"


def test_override_needs_service_override() -> None:
    attrs = {"system.exec.bulkexec.service": "rexec"}
    cfg = parse_config({"exec": {"service": "sdexec"}})
    with pytest.raises(RefusedError, match="service-override"):
        select_service(cfg, req(attrs=attrs))
    allowed = parse_config({"exec": {"service": "sdexec", "service-override": True}})
    assert select_service(allowed, req(attrs=attrs)) == "rexec"
    with pytest.raises(UsageError, match="teleport"):
        select_service(allowed, req(attrs={"system.exec.bulkexec.service": "teleport"}))


def test_unknown_exec_attribute_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown attribute"):
        select_service(parse_config({}), req(attrs={"system.exec.bulkexec.servic": "rexec"}))


@pytest.mark.skipif(os.getuid() != 0, reason="needs another user than ourselves")
def test_guests_need_imp_and_sdexec() -> None:
    guest = req(owner="65534")
    with pytest.raises(RefusedError, match=r"exec\.imp"):
        select_service(parse_config({"exec": {"service": "sdexec"}}), guest)
    with_imp = parse_config({"exec": {"service": "rexec", "imp": "/usr/libexec/flux/flux-imp"}})
    with pytest.raises(RefusedError, match="sdexec service"):
        select_service(with_imp, guest)
    ok = parse_config({"exec": {"service": "sdexec", "imp": "/usr/libexec/flux/flux-imp"}})
    assert select_service(ok, guest) == "sdexec"


def test_only_root_may_name_another_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    cfg = parse_config({"exec": {"service": "sdexec", "imp": "/usr/libexec/flux/flux-imp"}})
    with pytest.raises(RefusedError, match="only the instance owner"):
        select_service(cfg, req(owner="0"))
    assert select_service(cfg, req(owner="4242")) == "sdexec"  # oneself is no guest


def test_unknown_owner_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no such user"):
        select_service(parse_config({}), req(owner="no-such-user-here"))


def test_exit_code_of_a_job_is_the_highest_of_its_shells() -> None:
    class Fake:
        def __init__(self, code: int | None) -> None:
            self.exit_code = code

    h = Handle(jobid="j", service="sdexec", jobs=[Fake(0), Fake(137), Fake(3)])  # type: ignore[list-item]
    assert h.exit_code() == 137
    h.jobs.append(Fake(None))  # type: ignore[arg-type]
    assert h.exit_code() is None
