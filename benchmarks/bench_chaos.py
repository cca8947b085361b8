"""Chaos runs over many seeds: does the room always go quiet, and how soon?

    .venv/bin/python benchmarks/bench_chaos.py --seeds 10 --seconds 60

Each run is :func:`mls_provider.testing.chaos.run_chaos` (what ``tests/test_chaos.py``
runs with one seed): a room of 8-15 headless members churning for ``--seconds`` while the
DS (SQLite: one process, SIGKILLed and restarted; Redis: three processes and
redis-server, killed one, all, or the store) fails every 3.5-8 s. Reported per mode: how
many seeds passed every invariant, and the time from the last disturbance (the end of
the last fault or churn step) to the quiet state, p50 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, median, write_result

from mls_provider.testing.chaos import ChaosPlan, run_chaos


async def run(modes: list[str], seeds: int, seconds: float) -> list[dict[str, Any]]:
    results = []
    for mode in modes:
        for seed in range(1, seeds + 1):
            plan = ChaosPlan(mode, seed, seconds, ds_processes=3 if mode == "redis" else 1)
            workdir = Path(tempfile.mkdtemp(prefix=f"lkmls-chaos-{mode}-{seed}-"))
            report = await run_chaos(plan, workdir)
            print(report.summary(), flush=True)
            if report.passed:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"  logs kept in {workdir}", flush=True)
            results.append(report.to_dict())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--modes", default="sqlite,redis")
    args = parser.parse_args()
    runs = asyncio.run(run(args.modes.split(","), args.seeds, args.seconds))
    rows = []
    for mode in args.modes.split(","):
        mine = [r for r in runs if r["mode"] == mode]
        times = [float(r["converged_after_s"]) for r in mine if r["passed"]]
        rows.append(
            {
                "mode": mode,
                "seeds": len(mine),
                "passed": sum(1 for r in mine if r["passed"]),
                "faults": sum(len(r["faults"]) for r in mine),
                "converge_p50_s": round(median(times), 2) if times else None,
                "converge_max_s": round(max(times), 2) if times else None,
            }
        )
    print()
    print(
        markdown_table(
            ["mode", "seeds passed", "faults in all", "quiet after the last disturbance p50 / max"],
            [
                [
                    r["mode"],
                    f"{r['passed']}/{r['seeds']}",
                    r["faults"],
                    f"{r['converge_p50_s']} / {r['converge_max_s']} s",
                ]
                for r in rows
            ],
        )
    )
    path = write_result("chaos", {"seconds": args.seconds, "rows": rows, "runs": runs})
    print(f"wrote {path}")
    return 0 if all(r["passed"] == r["seeds"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
