"""A launcher goes away while its job runs; another one takes the job over (re-attach)."""

import asyncio

from sdexec import JobSpec, Launcher, load_config


async def main() -> None:
    cfg = load_config()
    first = Launcher(cfg)
    await first.connect()
    job = await first.start(JobSpec(jobid="example-adopt", argv=["sh", "-c", "sleep 1; exit 7"]))
    unit = job.unit
    await first.close()  # e.g. the job-exec service restarts: the unit goes on
    print("first launcher:", job.result, await job.wait())  # detached None
    async with Launcher(cfg) as second:
        again = await second.adopt("example-adopt", unit)
        print("adopted:", unit, "returncode", await again.wait())  # 7


if __name__ == "__main__":
    asyncio.run(main())
