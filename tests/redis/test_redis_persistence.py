"""The durability the Redis store documents: with ``appendonly yes`` and ``appendfsync
always`` no accepted commit is lost when redis-server is killed (-9) and restarted in the
middle of a run, and members converge afterwards without any help."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
from redis_testlib import (
    MakeRedis,
    MakeStore,
    Member,
    StartCluster,
    assert_accepted_are_logged,
    assert_one_commit_per_epoch,
    join_all,
    logged_commits,
    make_member,
    running,
    wait_converged,
)
from test_redis_cluster import commit_now

from mls_provider import transport as tp

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("outage", [0.5, 4.0], ids=["within-retries", "beyond-retries"])
async def test_no_accepted_commit_is_lost_across_a_redis_kill_and_restart(
    outage: float,
    make_redis: MakeRedis,
    make_store: MakeStore,
    start_cluster: StartCluster,
    members: list[Member],
) -> None:
    """Members of a room on two DS processes commit round after round; redis-server is
    killed (-9) and restarted on its AOF. Within the DS's retry budget (~2.5 s) clients
    see nothing but latency; beyond it they get errors and retry. Either way every
    acknowledged commit is in the log afterwards, epochs stay consecutive, and everyone
    converges on the epoch of the stored record."""
    redis = await make_redis(appendonly=True, appendfsync="always")
    procs = await start_cluster(2, redis.url)
    targets = [p.target for p in procs]
    group = [make_member(f"m{i}", "persist", targets, home=i) for i in range(8)]
    members.extend(group)
    await join_all(group)
    await wait_converged(group, procs=procs)
    store = await make_store(redis.url)
    rng = random.Random(7)
    accepted_at: dict[int, float] = {}  # seq -> when the workload's commit was acknowledged
    failures: list[BaseException] = []

    restarted_at = float("inf")

    def done() -> bool:
        """Once redis-server is back, the workload goes on until a commit is acknowledged
        after the restart (or a deadline the asserts below then report)."""
        return time.monotonic() > deadline or any(t > restarted_at for t in accepted_at.values())

    async def workload() -> None:
        """Rounds of a few members committing at once for the current epoch."""
        while not done():
            racers = rng.sample(group, 3)
            counts = [len(m.accepted) for m in racers]
            results = await asyncio.gather(*(commit_now(m) for m in racers), return_exceptions=True)
            failures.extend(r for r in results if isinstance(r, BaseException))
            now = time.monotonic()
            won = [r for m, n in zip(racers, counts, strict=True) for _, r in m.accepted[n:]]
            for response in won:
                accepted_at.setdefault(response.seq, now)
            with contextlib.suppress(AssertionError):  # e.g. while Redis is down
                at_least = max((r.epoch for r in won), default=0)
                await wait_converged(group, at_least=at_least, timeout=10.0)

    deadline = time.monotonic() + 60.0
    async with running(workload()) as work:
        await asyncio.sleep(2.5)
        killed_at = time.monotonic()
        await redis.akill()
        await asyncio.sleep(outage)
        await redis.astart()
        restarted_at = time.monotonic()
        await work

    assert all(p.running for p in procs)
    epoch = await wait_converged(group, procs=procs)
    assert any(t < killed_at for t in accepted_at.values()), "nothing accepted before the kill"
    assert any(t > restarted_at for t in accepted_at.values()), "nothing accepted after restart"
    assert all(isinstance(f, tp.DeliveryServiceError) for f in failures), failures
    if outage < 2.5:  # within the retry budget: only the race's ordinary losers
        assert all(isinstance(f, tp.EpochConflict) for f in failures), failures
    print(f"{len(accepted_at)} commits acknowledged, failures: {failures}")

    commits = await logged_commits(store, "persist")
    assert_one_commit_per_epoch(commits)
    assert assert_accepted_are_logged(group, commits) >= len(accepted_at)
    record = await store.load("persist")
    assert record is not None and record.epoch == epoch == commits[-1].epoch + 1
