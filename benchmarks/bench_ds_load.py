"""Delivery service load: many rooms committing at once on one DS process.

``--rooms`` rooms (default 1000) with ``--members`` members each (default 2) run on one real
DS process (SQLite store, the default). Members are driven directly (MLS engine +
DeliveryClient, no session logic): in every room, one member commits repeatedly (an
empty commit: a key update), every member receives the commit on its stream, applies it
and acks, and the next commit follows the execute. Measured over ``--seconds``:

* accepted commits/s across all rooms;
* fan-out deliveries/s (log entries written to member streams, from the DS's metrics);
* submit -> delivered latency: SubmitCommit sent -> the commit event received by the other
  member(s), p50 and p99;
* DS memory: resident set size idle with all rooms created, per idle room, and under load.

With ``--think S`` each room pauses about S seconds (0.5–1.5 S, random) after each delivered
commit: an open load of ``rooms / S`` commits/s, as in real rooms where keys rotate on joins
and leaves. With ``--think 0`` every room commits back to back: the DS's saturation point.

    .venv/bin/python benchmarks/bench_ds_load.py [--rooms 1000] [--members 2] [--seconds 20]
                                                 [--think 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import secrets
import tempfile
import time
import urllib.request
from pathlib import Path

from common import markdown_table, percentile, write_result
from ds_rooms import BenchRoom, Member

from mls_provider.testing.ds_process import DeliveryServiceProcess

API_KEY = "bench-key"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(ds: DeliveryServiceProcess, name: str) -> float:
    with urllib.request.urlopen(f"{ds.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--think",
        type=float,
        default=10.0,
        help="seconds a room pauses between commits (0: back to back, the saturation point)",
    )
    parser.add_argument("--name", default="ds_load", help="result file: results/NAME.json")
    args = parser.parse_args()
    secret = secrets.token_urlsafe(40)
    with tempfile.TemporaryDirectory() as tmp:
        ds = DeliveryServiceProcess(
            API_KEY,
            secret,
            workdir=tmp,
            extra_args=("--log-level", "warning", "--rate", "1000", "--burst", "1000"),
        )
        ds.start()
        try:
            assert ds.pid is not None
            base_rss = rss_mib(ds.pid)
            rooms = [
                BenchRoom(
                    f"room{r}",
                    [
                        Member(f"m{i}", ds.target, ds.token(f"m{i}", f"room{r}"))
                        for i in range(args.members)
                    ],
                )
                for r in range(args.rooms)
            ]
            print(f"creating {args.rooms} rooms x {args.members} members ...", flush=True)
            t0 = time.monotonic()
            tasks: list[asyncio.Task[None]] = []
            for chunk in range(0, len(rooms), 50):
                batch = rooms[chunk : chunk + 50]
                for started in await asyncio.gather(*(r.start() for r in batch)):
                    tasks += started
                await asyncio.gather(*(r.formed() for r in batch))
            setup = time.monotonic() - t0
            idle_rss = rss_mib(ds.pid)
            print(
                f"rooms ready in {setup:.1f} s; DS RSS {idle_rss:.0f} MiB; loading ...", flush=True
            )

            delivered_before = metric(ds, "lkmls_events_delivered_total")
            stop = asyncio.Event()
            rng = random.Random(1)
            runners = [asyncio.create_task(r.run(stop, args.think, rng)) for r in rooms]
            start = time.monotonic()
            await asyncio.sleep(args.seconds)
            loaded_rss = rss_mib(ds.pid)
            stop.set()
            await asyncio.gather(*runners)
            elapsed = time.monotonic() - start
            delivered = metric(ds, "lkmls_events_delivered_total") - delivered_before
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for room in rooms:
                for member in room.members:
                    await member.client.close()
        finally:
            ds.stop()  # also when a run fails: never leave a DS behind

    latencies = [lat for r in rooms for lat in r.latencies]
    accepted = sum(r.accepted for r in rooms)
    result = {
        "rooms": args.rooms,
        "think_s": args.think,
        "offered_commits_per_s": args.rooms / args.think if args.think else None,
        "members_per_room": args.members,
        "seconds": round(elapsed, 1),
        "accepted_commits_per_s": accepted / elapsed,
        "deliveries_per_s": delivered / elapsed,
        "submit_to_delivered_p50_ms": percentile(latencies, 50),
        "submit_to_delivered_p99_ms": percentile(latencies, 99),
        "ds_rss_start_mib": base_rss,
        "ds_rss_idle_rooms_mib": idle_rss,
        "ds_rss_per_idle_room_kib": (idle_rss - base_rss) * 1024 / args.rooms,
        "ds_rss_loaded_mib": loaded_rss,
        "setup_seconds": setup,
    }
    print(
        markdown_table(
            ["rooms", "members/room", "commits/s", "deliveries/s", "submit->delivered p50 (ms)",
             "p99 (ms)", "DS RSS idle (MiB)", "per idle room (KiB)", "DS RSS loaded (MiB)"],
            [[args.rooms, args.members, f"{result['accepted_commits_per_s']:.0f}",
              f"{result['deliveries_per_s']:.0f}", f"{result['submit_to_delivered_p50_ms']:.0f}",
              f"{result['submit_to_delivered_p99_ms']:.0f}", f"{idle_rss:.0f}",
              f"{result['ds_rss_per_idle_room_kib']:.0f}", f"{loaded_rss:.0f}"]],
        )
    )  # fmt: skip
    print(f"\nwrote {write_result(args.name, result)}")


if __name__ == "__main__":
    asyncio.run(main())
