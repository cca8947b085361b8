"""Cost of authority mode: join latency with and without an identity authority.

Two rooms of the same size on two real DS processes (SQLite store), with headless members
(the real client session, keys recorded instead of installed in LiveKit): one in open mode
(a LiveKit token is enough), one in authority mode (each member fetches a credential from
the app's authority before joining, and every member checks every credential in key
packages, Adds, commits and Welcomes against the pinned authority key; the DS checks at
Join too). Per sample a guest joins and leaves each room, alternating between the rooms so
that both see the same machine load; the figure is the join latency of
``bench_session.py`` (key package upload -> every member sends with the new epoch).

    .venv/bin/python benchmarks/bench_authority.py [--sizes 50] [--samples 30]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from typing import Any

from bench_session import WallClockBench, plan
from common import markdown_table, percentile, write_result

MODES = ("open", "authority")


async def measure(members: int, samples: int, wave: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rooms = {
            mode: WallClockBench(members, wave, f"{tmp}/{mode}", authority=mode == "authority")
            for mode in MODES
        }
        try:
            for room in rooms.values():
                await room.build()
            for i in range(samples):
                for room in rooms.values():
                    await room.sample(i)
            return {mode: room.result for mode, room in rooms.items()}
        finally:
            await asyncio.gather(*(room.stop() for room in rooms.values()))


def row(members: int, samples: int, modes: dict[str, Any]) -> list[object]:
    joins = {mode: modes[mode]["join_ms"] for mode in MODES}
    return [
        members,
        samples,
        *(f"{percentile(joins[m], q):.0f}" for m in MODES for q in (50, 99)),
        f"{percentile(joins['authority'], 50) / percentile(joins['open'], 50):.2f}",
    ]


HEADERS = [
    "members",
    "samples",
    "open p50 (ms)",
    "open p99 (ms)",
    "authority p50 (ms)",
    "authority p99 (ms)",
    "authority / open (p50)",
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50", help="room sizes")
    parser.add_argument("--samples", type=int, default=30, help="joins per room (N <= 50)")
    args = parser.parse_args()
    results, rows = [], []
    for members in [int(s) for s in args.sizes.split(",") if s]:
        samples, wave = plan(members, args.samples)
        print(f"N = {members}: open vs authority mode, {samples} joins each", flush=True)
        modes = await measure(members, samples, wave)
        rows.append(row(members, samples, modes))
        results.append({"members": members, "samples": samples, **modes})
    print(markdown_table(HEADERS, rows))
    print(f"\nwrote {write_result('authority', {'results': results})}")


if __name__ == "__main__":
    asyncio.run(main())
