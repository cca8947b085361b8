"""A burst of joins: 50 members join a room within one second.

A room of ``--base`` headless members runs on a real DS process; then ``--joiners`` new
members start, spread evenly over ``--spread`` seconds. Reported: the epochs the burst
used (the DS batches Adds into few commits) and the time from the first join until every
member, old and new, sends with the same final epoch. Targets: <= 3 epochs, <= 2 s.

    .venv/bin/python benchmarks/bench_burst.py [--joiners 50] [--spread 1.0] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time

from bench_session import API_KEY, Room
from common import markdown_table, percentile, write_result

from mls_provider.testing.ds_process import DeliveryServiceProcess


async def one_burst(base: int, joiners: int, spread: float) -> dict[str, float]:
    secret = secrets.token_urlsafe(40)
    with tempfile.TemporaryDirectory() as tmp:
        ds = DeliveryServiceProcess(API_KEY, secret, workdir=tmp)
        ds.start()
        room = Room(ds, secret, "burst")
        try:
            for i in range(base):
                await room.add(f"base{i}")
                await room.converged()
            first_epoch = await room.converged()
            start = time.monotonic()

            async def join_later(i: int) -> None:
                await asyncio.sleep(spread * i / joiners)
                await room.add(f"joiner{i}")

            await asyncio.gather(*(join_later(i) for i in range(joiners)))
            final_epoch = await room.converged(timeout=60)
            seconds = time.monotonic() - start
            return {"epochs": final_epoch - first_epoch, "seconds": seconds}
        finally:
            await room.stop()
            ds.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=2, help="members before the burst")
    parser.add_argument("--joiners", type=int, default=50)
    parser.add_argument("--spread", type=float, default=1.0, help="seconds the joins span")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        result = await one_burst(args.base, args.joiners, args.spread)
        print(
            f"run {run + 1}: {result['epochs']:.0f} epochs, {result['seconds']:.2f} s", flush=True
        )
        runs.append(result)
    epochs = [r["epochs"] for r in runs]
    seconds = [r["seconds"] for r in runs]
    table = markdown_table(
        ["joiners", "over (s)", "runs", "epochs (median / max)", "converged (s, median / max)"],
        [
            [
                args.joiners,
                args.spread,
                args.runs,
                f"{percentile(epochs, 50):.0f} / {max(epochs):.0f}",
                f"{percentile(seconds, 50):.2f} / {max(seconds):.2f}",
            ]
        ],
    )
    print(table)
    path = write_result("burst", {"joiners": args.joiners, "spread_s": args.spread, "runs": runs})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
