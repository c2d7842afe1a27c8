"""The job-exec entry point: what a resource manager's exec service calls for one job.

``start_job`` applies the whole policy ([exec] service and service-override, guests and the
IMP, testexec, a drained node) before anything starts, records the job for ``sdexec stats``
and re-attach, serves the start barrier of several shells, and drains the node when
processes cannot be killed.
"""

import asyncio
import os

from sdexec import JobRequest, RefusedError, load_config, start_job


async def main() -> None:
    cfg = load_config()
    req = JobRequest(
        jobid="example-jobexec",
        argv=["sh", "-c", "echo rank $SDEXEC_RANK of $SDEXEC_SIZE"],
        env=dict(os.environ),
        cwd="/",
        shells=2,
    )
    handle = await start_job(cfg, req)  # stdin: /dev/null; stdout, stderr: pipes
    try:
        rc = await handle.wait()  # the highest exit code of the shells, as Flux reports
        for job in handle.jobs:
            assert job.stdout is not None
            print((await job.stdout.read()).decode().strip())
        print("exit", rc, "service", handle.report()["service"])
    finally:
        await handle.close()  # undoes whatever is left (records, barrier, connection)
    try:
        await start_job(
            cfg,
            JobRequest(
                jobid="x",
                argv=["true"],
                env={},
                cwd="/",
                attrs={"system.exec.bulkexec.service": "rexec"},
            ),
        )
    except RefusedError as e:  # service-override is off: refused before anything starts
        print("refused:", e)


if __name__ == "__main__":
    asyncio.run(main())
