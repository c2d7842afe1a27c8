"""Start one job as a unit and read its output as it comes (``python stream.py``)."""

import asyncio

from sdexec import PIPE, JobSpec, Launcher, load_config


async def main() -> int:
    async with Launcher(load_config()) as launcher:
        job = await launcher.start(
            JobSpec(
                jobid="example-stream",
                argv=["sh", "-c", "for i in 1 2 3; do echo line $i; done"],
                stdout=PIPE,
            )
        )
        assert job.stdout is not None
        async for line in job.stdout:  # a StreamReader, as asyncio's Process has
            print("got:", line.decode().rstrip())
        rc = await job.wait()  # exit code, or -N for signal N; None if no status (abandoned)
        print("unit", job.unit, "pid", job.pid, "returncode", rc)
        return rc or 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
