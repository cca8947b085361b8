"""50 members of one room race a commit for the same epoch, round after round, against a
real DS process (SQLite store) over gRPC.

Each round every member makes a commit for the current epoch and all 50 are submitted at
once: exactly one is accepted, the 49 others get EpochConflict carrying the new epoch.
Then every member applies the accepted commit from its stream, acks Ready, and waits for
the TransitionExecute; all end on the same epoch with the same epoch authenticator.

Rounds: ``LIVEKIT_MLS_RACE_ROUNDS`` (default 200). The runtime is printed (``-s``).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import pytest

from mls_provider import transport as tp
from mls_provider.proto import delivery_pb2 as pb

from .conftest import DsProcess, MakeMember, wait_until
from .members import GrpcMember, check_all, converged

ROUNDS = int(os.environ.get("LIVEKIT_MLS_RACE_ROUNDS", "200"))
MEMBERS = 50
ROOM = "race-room"
ROUND_TIMEOUT = 60.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


async def race_round(members: list[GrpcMember], rng: random.Random) -> tuple[int, float]:
    """One round; returns the winner's index and the round's duration."""
    started = time.monotonic()
    epoch = members[0].require_group().epoch
    # the engine releases the GIL while committing: make the 50 commits in parallel
    outputs = await asyncio.gather(*(asyncio.to_thread(m.make_commit) for m in members))
    order = list(range(len(members)))
    rng.shuffle(order)  # who is sent first varies (the winner is whoever the DS sees first)
    submitted = await asyncio.wait_for(
        asyncio.gather(
            *(members[i].submit(outputs[i]) for i in order),
            return_exceptions=True,
        ),
        ROUND_TIMEOUT,
    )
    by_member = dict(zip(order, submitted, strict=True))
    results = [by_member[i] for i in range(len(members))]
    winners = [i for i, r in enumerate(results) if isinstance(r, pb.SubmitCommitResponse)]
    assert len(winners) == 1, f"epoch {epoch}: {len(winners)} commits accepted"
    winner = winners[0]
    accepted = results[winner]
    assert isinstance(accepted, pb.SubmitCommitResponse)
    assert accepted.epoch == epoch + 1
    for i, outcome in enumerate(results):
        if i == winner:
            continue
        assert isinstance(outcome, tp.EpochConflict), f"{members[i].identity}: {outcome!r}"
        assert outcome.epoch == epoch + 1, f"{members[i].identity}: {outcome.epoch}"

    async def apply(member: GrpcMember) -> pb.RoomEvent:
        commit = await member.until("commit", timeout=ROUND_TIMEOUT)
        assert commit.commit.epoch == epoch
        assert commit.commit.committer == members[winner].identity
        assert commit.seq == accepted.seq
        assert member.acked[-1] == epoch + 1
        return await member.until(
            "execute", lambda e: e.execute.epoch == epoch + 1, timeout=ROUND_TIMEOUT
        )

    await asyncio.wait_for(asyncio.gather(*(apply(m) for m in members)), ROUND_TIMEOUT)
    groups = [m.require_group() for m in members]
    assert {g.epoch for g in groups} == {epoch + 1}
    assert len({g.epoch_authenticator() for g in groups}) == 1
    assert all(not g.has_pending_commit for g in groups)
    return winner, time.monotonic() - started


async def test_fifty_members_race_for_every_epoch(
    ds_process: Callable[..., Awaitable[DsProcess]], make_member: MakeMember
) -> None:
    """Exactly one of 50 simultaneous commits wins each epoch; the losers learn the new
    epoch from EpochConflict; everyone converges on the winner's epoch every round."""
    ds = await ds_process(
        "--rate", "1000000", "--burst", "1000000",
        # transitions must execute because every member acked, not at a deadline
        "--execute-timeout", "120", "--commit-timeout", "120",
        # every round is 50 update commits (no pending proposals) for one epoch
        "--update-interval", "0",
    )  # fmt: skip
    names = [f"m{i:02d}" for i in range(MEMBERS)]
    members = [make_member(ds.target, name, ROOM) for name in names]
    setup = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(m.join() for m in members)), ROUND_TIMEOUT)
    for member in members:
        member.start()
    await wait_until(
        lambda: converged(members), timeout=120, what="50 members", check=check_all(members)
    )
    for member in members:
        await member.stop()
        member.auto_commit = False
    setup = time.monotonic() - setup
    first_epoch = members[0].require_group().epoch

    started = time.monotonic()
    durations: list[float] = []
    winners: set[int] = set()
    rng = random.Random(9420)
    for _ in range(ROUNDS):
        winner, duration = await race_round(members, rng)
        winners.add(winner)
        durations.append(duration)
    total = time.monotonic() - started

    assert {m.require_group().epoch for m in members} == {first_epoch + ROUNDS}
    assert converged(members)
    quantiles = statistics.quantiles(durations, n=20, method="inclusive")
    print(
        f"\nrace: {MEMBERS} members, {ROUNDS} rounds in {total:.1f}s "
        f"(setup {setup:.1f}s); per round p50 {statistics.median(durations) * 1000:.0f} ms, "
        f"p95 {quantiles[18] * 1000:.0f} ms, max {max(durations) * 1000:.0f} ms; "
        f"{len(winners)} distinct winners"
    )
