"""Several delivery service processes on one Redis, members of one room spread across
them: convergence, the one-commit-per-epoch race across processes, and a ``kill -9`` of a
process while members join and leave.

Every DS here is a real subprocess (``python -m delivery_service --store redis://...``);
every member a real headless ``MlsSession`` whose client fails over to another process.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from redis_testlib import (
    CONTENTION_RETRIES,
    MakeRedis,
    MakeStore,
    Member,
    StartCluster,
    assert_accepted_are_logged,
    assert_one_commit_per_epoch,
    ds_errors,
    env_int,
    join_all,
    leave,
    logged_commits,
    make_member,
    running,
    wait_converged,
)

from mls_provider import transport as tp
from mls_provider.proto import delivery_pb2 as pb

pytestmark = pytest.mark.redis

RACE_MEMBERS = env_int("LKMLS_REDIS_RACE_MEMBERS", 50)
RACE_ROUNDS = env_int("LKMLS_REDIS_RACE_ROUNDS", 50)


async def commit_now(member: Member) -> None:
    """The member commits at once for its current epoch, exactly as its session does when
    the DS lets anyone commit: under its gate, so its stream waits meanwhile."""
    async with member.gate:
        group = member.session.group
        assert group is not None
        await member.session._on_commit_request(
            group, pb.CommitRequest(epoch=group.epoch, committer="")
        )


async def test_members_on_two_then_three_processes_converge(
    make_redis: MakeRedis,
    make_store: MakeStore,
    start_cluster: StartCluster,
    members: list[Member],
) -> None:
    """Two rooms, members of each spread over two processes, converge on one epoch, one
    epoch authenticator and identical keys. A third process joins the deployment (scale
    out): members join through it and others leave through any process, and each room
    converges again. Every process uses the one shared DS key."""
    redis = await make_redis(appendonly=True)
    procs = await start_cluster(2, redis.url)
    targets = [p.target for p in procs]
    rooms: dict[str, list[Member]] = {}
    for room in ("room-a", "room-b"):
        rooms[room] = [make_member(f"{room}-m{i}", room, targets, home=i % 2) for i in range(6)]
        members.extend(rooms[room])
    await join_all(members)
    epochs = {room: await wait_converged(group, procs=procs) for room, group in rooms.items()}

    procs += await start_cluster(1, redis.url)
    assert len({p.public_key for p in procs}) == 1, "the DS key must be shared"
    targets = [p.target for p in procs]
    for room, group in rooms.items():
        for gone in group[1:3]:  # one left through each of the first two processes
            await leave(gone)
            group.remove(gone)
        late = [make_member(f"{room}-late{i}", room, targets, home=2) for i in range(2)]
        late.append(make_member(f"{room}-late2", room, targets, home=0))
        members.extend(late)
        await join_all(late)
        group += late
    for room, group in rooms.items():
        epoch = await wait_converged(group, at_least=epochs[room] + 1, procs=procs)
        assert {m.client.target for m in group} == set(targets)
        assert epoch > epochs[room]

    store = await make_store(redis.url)
    for room in rooms:
        assert_one_commit_per_epoch(await logged_commits(store, room))
    assert ds_errors(procs) == []


async def test_concurrent_commits_for_one_epoch_across_processes(
    make_redis: MakeRedis,
    make_store: MakeStore,
    start_cluster: StartCluster,
    members: list[Member],
) -> None:
    """All members of a room (spread over three processes) submit a commit for the same
    epoch at once, round after round: each round exactly one is accepted, every other
    member gets EpochConflict naming the new epoch, and all converge on it."""
    redis = await make_redis(appendonly=True)
    procs = await start_cluster(3, redis.url)
    targets = [p.target for p in procs]
    group = [make_member(f"m{i:02d}", "race", targets, home=i) for i in range(RACE_MEMBERS)]
    members.extend(group)
    await join_all(group)
    epoch = await wait_converged(group, procs=procs)
    round_winners: list[pb.SubmitCommitResponse] = []

    started = time.monotonic()
    for round_ in range(RACE_ROUNDS):
        before = [len(m.client.submits) for m in group]
        await asyncio.gather(*(commit_now(m) for m in group))
        # every submission of the round, per member (a session may resubmit its commit
        # when a commit request for the epoch reaches it: idempotent at the DS)
        outcomes = [m.client.submits[n:] for m, n in zip(group, before, strict=True)]
        assert all(outcomes), f"round {round_}: a member did not submit"
        assert {e for o in outcomes for e, _ in o} == {epoch}
        won = {r.seq: r for o in outcomes for _, r in o if isinstance(r, pb.SubmitCommitResponse)}
        assert len(won) == 1, f"round {round_}: {len(won)} commits accepted for epoch {epoch}"
        (accepted,) = won.values()
        winners = [o for o in outcomes if any(isinstance(r, pb.SubmitCommitResponse) for _, r in o)]
        assert len(winners) == 1, f"round {round_}: several members were told they won"
        lost = [r for o in outcomes if o is not winners[0] for _, r in o]
        assert len(lost) >= len(group) - 1 and all(isinstance(r, tp.EpochConflict) for r in lost)
        assert accepted.epoch == epoch + 1
        assert {c.epoch for c in lost if isinstance(c, tp.EpochConflict)} == {epoch + 1}, (
            "EpochConflict must name the new epoch"
        )
        round_winners.append(accepted)
        # (the DS may ask for another commit meanwhile, e.g. after a member re-joined)
        epoch = await wait_converged(group, at_least=epoch + 1, procs=procs)

    print(
        f"{RACE_ROUNDS} rounds in {time.monotonic() - started:.1f}s; joins refused for "
        f"contention and retried: {len(CONTENTION_RETRIES)}"
    )
    store = await make_store(redis.url)
    commits = await logged_commits(store, "race")
    assert_one_commit_per_epoch(commits)
    # every commit in the log was acknowledged to its committer, and the other way round
    assert assert_accepted_are_logged(group, commits) == len(commits)
    assert {c.seq for c in commits} >= {w.seq for w in round_winners}
    assert len(round_winners) == RACE_ROUNDS
    assert commits[-1].epoch + 1 == epoch
    # the winners were spread over the processes, not all on one
    assert len({m.client.target for m in group if m.accepted}) > 1
    assert ds_errors(procs) == []


async def test_kill_9_of_a_process_mid_churn(
    make_redis: MakeRedis,
    make_store: MakeStore,
    start_cluster: StartCluster,
    members: list[Member],
) -> None:
    """Members keep joining and leaving while one of three DS processes is killed with
    SIGKILL. Its members fail over to the other processes and resume from their cursors;
    no accepted commit is lost or duplicated (the log's commit epochs are consecutive and
    every acknowledged commit is in it) and everyone ends on one epoch and key."""
    redis = await make_redis(appendonly=True)
    procs = await start_cluster(3, redis.url)
    targets = [p.target for p in procs]
    rng = random.Random(20240607)
    group = [make_member(f"m{i}", "churn", targets, home=i) for i in range(9)]
    members.extend(group)
    await join_all(group)
    await wait_converged(group, procs=procs)
    everyone = list(group)  # for the accepted-commit audit, leavers included
    victim = procs[0]
    # members of the victim stay to the end: each must fail over and resume
    on_victim = [m for m in group if m.client.target == victim.target]
    counter = iter(range(1000))

    async def churn(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            gone = rng.choice([m for m in group if m not in on_victim])
            group.remove(gone)
            await leave(gone)
            newcomer = make_member(f"n{next(counter)}", "churn", targets, home=rng.randrange(3))
            members.append(newcomer)
            everyone.append(newcomer)
            await newcomer.session.start()
            group.append(newcomer)
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    async with running(churn(time.monotonic() + 6.0)) as churning:
        await asyncio.sleep(2.0)
        victim.kill()
        await churning
    assert not victim.running

    await wait_converged(group, procs=procs)
    assert all(m.client.target != victim.target for m in group)
    assert on_victim and all(m.client.failovers >= 1 for m in on_victim)
    store = await make_store(redis.url)
    commits = await logged_commits(store, "churn")
    assert_one_commit_per_epoch(commits)
    acknowledged = assert_accepted_are_logged(everyone, commits)
    print(
        f"churn: {len(everyone) - 9} joins/leaves, {len(commits)} commits "
        f"({acknowledged} acknowledged), epoch {group[0].session.epoch}, "
        f"failovers {sum(m.client.failovers for m in everyone)}, "
        f"session errors {sum(len(m.errors) for m in everyone)}"
    )
    assert acknowledged >= 1
    assert len({c.generation for c in commits}) == 1, "the group must not have been reset"
    assert ds_errors(procs[1:]) == []
