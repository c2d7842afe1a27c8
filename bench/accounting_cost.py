"""What asking for end-of-job accounting costs: ``sdexec run -- true`` against
``sdexec run --json -- true`` (the job shell in the unit, its report, one GetAll), interleaved
run by run so both see the same machine, in-process and through the node's server.

    python bench/accounting_cost.py --k 20

One JSON object on stdout: medians per mode and the added milliseconds. Run it in the node
(``containers/node exec /opt/sdexec/bin/python bench/accounting_cost.py``) on a quiet host:
the figures are for the README, never for a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``sdexec`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, host_facts, log, median, rnd

SERVER_SOCKET = "/run/sdexec/sdexec.sock"


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=env, check=False,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{argv}: exit {p.returncode}: {p.stderr.decode(errors='replace')}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--k", type=int, default=20, help="runs of each variant (default 20)")
    args = ap.parse_args()
    sdexec = [sys.executable, "-m", "sdexec"]
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "exec.toml"
        cfg.write_text(f'[exec]\nservice = "sdexec"\n[sdexec]\nstate-dir = "{d}/state"\n')
        base = {k: v for k, v in os.environ.items() if k not in ("SDEXEC_NO_SERVER",)}
        modes = {"in_process": (["--config", str(cfg)], base)}
        if os.path.exists(SERVER_SOCKET):
            modes["server"] = ([], base)
        out: dict[str, object] = {"host": host_facts(), "k": args.k}
        for mode, (extra, env) in modes.items():
            plain: list[float] = []
            asked: list[float] = []
            for i in range(args.k):
                log(f"{mode} {i + 1}/{args.k}")
                plain.append(timed([*sdexec, "run", *extra, "--", "true"], env))
                asked.append(timed([*sdexec, "run", *extra, "--json", "--", "true"], env))
            out[mode] = {
                "plain_median_ms": rnd(median(plain) * 1000, 1),
                "json_median_ms": rnd(median(asked) * 1000, 1),
                "added_ms": rnd((median(asked) - median(plain)) * 1000, 1),
            }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
