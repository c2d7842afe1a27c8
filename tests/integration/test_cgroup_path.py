"""A unit's cgroup as the launcher has it (its slice's, read once, plus its name) against the
one systemd gives it, for the default, a site's and a nested slice; and the job's process is
in it, so leftovers would be found there."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdexec.config.table import load_config
from sdexec.exec.launcher import JobSpec, Launcher
from sdexec.systemd.cgroup import cgroup_pids, unit_cgroup_dir


@pytest.mark.parametrize("slice_name", [None, "sdexec.slice", "sdexec-cgtest-nested.slice"])
def test_each_units_cgroup_is_systemds_without_asking(config: Any, slice_name: str | None) -> None:
    site = f'slice = "{slice_name}"\n' if slice_name else ""

    async def main() -> list[tuple[str | None, str, set[int], int | None]]:
        seen = []
        async with Launcher(load_config(config(sdexec=site))) as launcher:
            asked: list[list[str]] = []
            get_some = launcher.manager.get_some

            async def spy(path: str, names: Any) -> dict[str, Any]:
                asked.append(list(names))
                return await get_some(path, names)

            launcher.manager.get_some = spy  # type: ignore[method-assign]
            jobs = [
                await launcher.start(JobSpec(jobid=f"cg-{i}", argv=["sleep", "30"]))
                for i in range(2)
            ]
            for job in jobs:
                show = await asyncio.create_subprocess_exec(
                    "systemctl", "show", "-P", "ControlGroup", f"shell-0-{job.jobid}.service",
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                told = (await show.communicate())[0].decode().strip()
                directory = unit_cgroup_dir(job.cgroup or "")
                seen.append(
                    (job.cgroup, told, cgroup_pids(directory) if directory else set(), job.pid)
                )
            for job in jobs:
                job.kill()
                await job.wait()
            assert asked == [], asked  # no unit was asked for its cgroup
        return seen

    for ours, told, pids, pid in asyncio.run(main()):
        assert ours == told
        assert pid in pids
