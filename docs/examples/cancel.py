"""Cancel a running job: the termination sequence (term-signal first, then escalation)."""

import asyncio

from sdexec import PIPE, JobSpec, Launcher, load_config


async def main() -> None:
    async with Launcher(load_config()) as launcher:
        job = await launcher.start(
            JobSpec(
                jobid="example-cancel",
                argv=[
                    "sh",
                    "-c",
                    "trap 'echo terminated; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
                ],
                stdout=PIPE,
            )
        )
        assert job.stdout is not None
        print(await job.stdout.readline())  # b'ready\n': the job runs
        job.cancel()  # like Flux's job-exec on a cancel: SIGTERM, then SIGKILL after kill-timeout
        print(await job.stdout.read())
        print("returncode", await job.wait())  # 42: the job's own answer to SIGTERM


if __name__ == "__main__":
    asyncio.run(main())
