"""Delivery service scale-out: 1, 2 and 3 DS processes on one Redis vs 1 DS on SQLite.

Same workload on every configuration: ``--rooms`` rooms (default 100) of ``--members``
headless members (default 4). Placement ``spread``: the members of a room are spread over
the DS processes (member i of room r talks to process (r + i) mod N), so most deliveries
cross processes through Redis; placement ``room`` (configs ``redisN-room``): all members of
room r talk to process r mod N (a load balancer with room affinity). In every room one
member commits repeatedly (an empty commit: a key update); every member receives the
commit on its stream, applies it and acks Ready; the next commit follows the execute.
Members are driven directly (MLS engine + DeliveryClient), in ``--workers`` client
processes so the client side is not the limit.
Measured over ``--seconds`` per configuration:

* accepted commits/s across all rooms;
* fan-out deliveries/s (log entries written to member streams, summed over the DS
  processes' metrics);
* submit -> delivered latency: SubmitCommit sent -> the commit received by every other
  member of the room, p50 and p99;
* (JSON only) the DS metric ``lkmls_transitions_total`` by trigger, summed over the
  processes: on ready acks vs on the deadline (execute timeout, 1 s). With several
  processes it counts attempts: a deadline tick that lost the race to another process
  counts too.

Redis runs with ``appendonly yes`` and ``--appendfsync`` (default ``always``: durable
before the reply, like the SQLite store's ``synchronous=FULL``).

    .venv/bin/python benchmarks/bench_redis.py [--rooms 100] [--members 4] [--seconds 10]
        [--configs sqlite,redis1,redis2,redis3,redis2-room,redis3-room] [--workers 2]
        [--appendfsync always] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import re
import secrets
import socket
import tempfile
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from common import markdown_table, percentile, write_result
from ds_rooms import BenchRoom, Member

from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.redis_server import RedisServer
from mls_provider.testing.tokens import join_token

API_KEY = "bench-redis-key"
DS_ARGS = ("--log-level", "warning", "--rate", "100000", "--burst", "100000")
# name -> (store, DS processes, placement: "spread" a room's members over the processes,
# or keep each "room" on one process)
CONFIGS = {
    "sqlite": ("sqlite", 1, "spread"),
    "redis1": ("redis", 1, "spread"),
    "redis2": ("redis", 2, "spread"),
    "redis3": ("redis", 3, "spread"),
    "redis2-room": ("redis", 2, "room"),
    "redis3-room": ("redis", 3, "room"),
}


# ---- one client process ------------------------------------------------------------------


async def client_main(
    targets: list[str],
    rooms: list[int],
    spread: int,
    members: int,
    seconds: float,
    secret: str,
    go: Barrier,
) -> dict[str, Any]:
    bench_rooms = [
        BenchRoom(
            f"room{r}",
            [
                Member(
                    f"m{i}",
                    targets[(r + i * spread) % len(targets)],
                    join_token(API_KEY, secret, f"m{i}", f"room{r}"),
                )
                for i in range(members)
            ],
        )
        for r in rooms
    ]
    tasks: list[asyncio.Task[None]] = []
    for chunk in range(0, len(bench_rooms), 25):
        batch = bench_rooms[chunk : chunk + 25]
        for started in await asyncio.gather(*(r.start() for r in batch)):
            tasks += started
        await asyncio.gather(*(r.formed() for r in batch))
    await asyncio.to_thread(go.wait)  # every client process is ready: measure together
    stop = asyncio.Event()
    runners = [asyncio.create_task(r.run(stop)) for r in bench_rooms]
    start = time.monotonic()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*runners)
    elapsed = time.monotonic() - start
    await asyncio.to_thread(go.wait)  # the main process reads the metrics now
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for room in bench_rooms:
        for member in room.members:
            await member.client.close()
    return {
        "accepted": sum(r.accepted for r in bench_rooms),
        "latencies_ms": [lat for r in bench_rooms for lat in r.latencies],
        "elapsed": elapsed,
        "errors": [e for r in bench_rooms for e in r.errors],
    }


def client_process(
    targets: list[str],
    rooms: list[int],
    spread: int,
    members: int,
    seconds: float,
    secret: str,
    go: Barrier,
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    try:
        outcome = client_main(targets, rooms, spread, members, seconds, secret, go)
        results.put(asyncio.run(outcome))
    except BaseException:
        results.put({"error": traceback.format_exc()})
        go.abort()  # the main process must not wait for us
        raise


# ---- the main process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metrics(ds: DeliveryServiceProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"{ds.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for name in ("lkmls_events_delivered_total", "lkmls_commits_accepted_total"):
        match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    for trigger in ("all_ready", "deadline"):
        match = re.search(
            rf'^lkmls_transitions_total{{trigger="{trigger}"}} ([0-9.e+]+)$', text, re.M
        )
        values[trigger] = float(match.group(1)) if match else 0.0
    return values


def total(procs: list[DeliveryServiceProcess]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for ds in procs:
        for key, value in metrics(ds).items():
            sums[key] = sums.get(key, 0.0) + value
    return sums


@dataclass
class Outcome:
    config: str
    store: str
    processes: int
    placement: str
    commits_per_s: float
    deliveries_per_s: float
    p50_ms: float
    p99_ms: float
    deadline_transitions: int
    ready_transitions: int
    setup_s: float
    stream_errors: int  # unexpected stream errors the clients resumed from


def run_config(name: str, args: argparse.Namespace, workdir: Path) -> Outcome:
    kind, count, placement = CONFIGS[name]
    secret = secrets.token_urlsafe(40)
    redis: RedisServer | None = None
    procs: list[DeliveryServiceProcess] = []
    try:
        if kind == "redis":
            redis = RedisServer(
                workdir=workdir / "redis", appendonly=True, appendfsync=args.appendfsync
            ).start()
        for i in range(count):
            store = redis.url if redis is not None else None
            ds = DeliveryServiceProcess(
                API_KEY, secret, workdir=workdir / f"ds{i}", store=store, extra_args=DS_ARGS
            )
            while ds.http_port == ds.grpc_port:  # two port probes in a row may agree
                ds.http_port = free_port()
            procs.append(ds.start())
        targets = [ds.target for ds in procs]
        ctx = multiprocessing.get_context("spawn")
        workers = max(1, min(args.workers, args.rooms))
        go = ctx.Barrier(workers + 1)
        results: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
        clients = [
            ctx.Process(
                target=client_process,
                args=(targets, list(range(w, args.rooms, workers)), int(placement == "spread"),
                      args.members, args.seconds, secret, go, results),
            )
            for w in range(workers)
        ]  # fmt: skip
        t0 = time.monotonic()
        for process in clients:
            process.start()
        try:
            go.wait(timeout=300)  # rooms formed everywhere
            setup = time.monotonic() - t0
            before = total(procs)
            go.wait(timeout=args.seconds + 120)  # measurement over
            after = total(procs)
            parts = [results.get(timeout=120) for _ in clients]
        except threading.BrokenBarrierError:
            errors = [results.get(timeout=5).get("error") for _ in clients if not results.empty()]
            raise SystemExit(f"{name}: a client process failed:\n{errors}") from None
        finally:
            for process in clients:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
    finally:
        for ds in procs:
            ds.stop()
        if redis is not None:
            redis.close()
    elapsed = max(p["elapsed"] for p in parts)
    latencies = [lat for p in parts for lat in p["latencies_ms"]]
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return Outcome(
        config=name,
        store=kind,
        processes=count,
        placement=placement,
        commits_per_s=sum(p["accepted"] for p in parts) / elapsed,
        deliveries_per_s=delta["lkmls_events_delivered_total"] / elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        deadline_transitions=int(delta["deadline"]),
        ready_transitions=int(delta["all_ready"]),
        setup_s=setup,
        stream_errors=sum(len(p["errors"]) for p in parts),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    parser.add_argument("--workdir", help="keep the DS and Redis logs and data here")
    args = parser.parse_args()
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")

    outcomes = []
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-redis-")
        )
        for name in names:
            print(f"== {name}: {args.rooms} rooms x {args.members} members ...", flush=True)
            outcome = run_config(name, args, Path(tmp) / name)
            print(
                f"   {outcome.commits_per_s:.0f} commits/s, {outcome.deliveries_per_s:.0f} "
                f"deliveries/s, p99 {outcome.p99_ms:.0f} ms (setup {outcome.setup_s:.0f} s)",
                flush=True,
            )
            outcomes.append(outcome)

    table = markdown_table(
        ["store", "DS processes", "room placement", "commits/s", "deliveries/s",
         "submit->delivered p50 (ms)", "p99 (ms)"],
        [[o.store, o.processes, o.placement, f"{o.commits_per_s:.0f}",
          f"{o.deliveries_per_s:.0f}", f"{o.p50_ms:.0f}", f"{o.p99_ms:.0f}"] for o in outcomes],
    )  # fmt: skip
    description = (
        f"{args.rooms} rooms x {args.members} headless members, one member per room "
        f"committing in a loop for "
        f"{args.seconds:g} s; {args.workers} client processes; Redis appendonly yes, "
        f"appendfsync {args.appendfsync}; SQLite synchronous=FULL."
    )
    print("\n" + table)
    path = write_result(
        "redis",
        {
            "rooms": args.rooms,
            "members_per_room": args.members,
            "seconds": args.seconds,
            "workers": args.workers,
            "appendfsync": args.appendfsync,
            "results": [o.__dict__ for o in outcomes],
            "markdown": description + "\n\n" + table,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
