"""What a job used, once it ended: ``job.stats()["accounting"]`` (``python accounting.py``)."""

import asyncio
import json

from sdexec import JobSpec, Launcher, load_config


async def main() -> int:
    async with Launcher(load_config()) as launcher:
        job = await launcher.start(
            JobSpec(
                jobid="example-accounting",
                argv=["python3", "-c", "x = bytearray(200 << 20)"],  # 200 MiB, touched
                accounting=True,  # the figures cost a job shell in the unit: ask for them
            )
        )
        rc = await job.wait()  # the figures were read before the unit was stopped
        acct = job.stats()["accounting"]
        # seconds (floats), bytes and counts (ints); None where the host cannot tell
        print("memory peak MiB", acct["memory_peak"] >> 20, "from", acct["sources"]["memory_peak"])
        print("cpu seconds", acct["cpu_time"], "wall seconds", acct["wall_time"])
        print(json.dumps(acct))
        return rc or 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
