"""Presence: the DS removes a member whose event stream has been gone longer than the
presence timeout, and only then; transitions and commit requests do not wait for members
without a stream. In-process DS, real gRPC members (each holds its stream like a client).
"""

from __future__ import annotations

import asyncio
import time

from delivery_service.ordering import OrderingConfig

from .conftest import TEST_ORDERING, MakeMember, StartDs, joined_room, manager_of, wait_until
from .members import GrpcMember, check_all, converged

ROOM = "presence-room"


def removals(member: GrpcMember) -> list[str]:
    """Identities the DS proposed to remove, as ``member`` saw it."""
    return [
        e.proposal.target_identity
        for e in member.seen
        if e.WhichOneof("event") == "proposal" and e.proposal.kind == "remove"
    ]


async def test_a_member_whose_stream_is_gone_is_removed_after_the_timeout(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """carol's stream ends without a goodbye (her process died): after the presence timeout,
    not before, the DS removes her and the others converge without her."""
    timeout = 1.5
    ds = await start_ds(presence_timeout=timeout)
    alice, bob, carol = await joined_room(ds, make_member, ROOM, "alice", "bob", "carol")
    await carol.close()  # stream and channel gone, no Leave
    gone_at = time.monotonic()
    await wait_until(
        lambda: converged([alice, bob]),
        what="alice and bob without carol",
        check=check_all([alice, bob]),
    )
    assert removals(alice) == ["carol"]
    proposed_at = next(
        at
        for at, e in zip(alice.received_at, alice.seen, strict=True)
        if e.HasField("proposal") and e.proposal.kind == "remove"
    )
    assert proposed_at - gone_at >= timeout * 0.95, "removed before the presence timeout"
    state = await manager_of(ds).room_state(ROOM)
    assert set(state.participants) == set(state.members) == {"alice", "bob"}


async def test_a_stream_blip_shorter_than_the_timeout_removes_nobody(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """bob's stream drops and comes back 0.3 s later (a network blip): nobody is removed,
    and the room keeps working (a join after the blip converges with bob in it)."""
    ds = await start_ds(presence_timeout=2.0)
    alice, bob = await joined_room(ds, make_member, ROOM, "alice", "bob")
    await bob.stop()
    cursor = bob.last_seq
    await bob.unsubscribe()
    await asyncio.sleep(0.3)
    bob.subscribe(cursor)
    bob.start()
    await asyncio.sleep(2.5)  # past the timeout, counted from the drop
    dave = make_member(ds, "dave", ROOM)
    await dave.join()
    dave.start()
    members = [alice, bob, dave]
    await wait_until(lambda: converged(members), what="converged", check=check_all(members))
    assert removals(alice) == []


async def test_a_transition_does_not_wait_for_a_member_without_stream(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """carol's stream is gone (not long enough to remove her): a commit's transition executes
    once everyone *reachable* is ready, not at the (here long) execute deadline; carol,
    back on her stream, catches up on the same epoch."""
    ordering = OrderingConfig(**{**TEST_ORDERING.__dict__, "execute_timeout": 60.0})
    ds = await start_ds(ordering=ordering, presence_timeout=60.0)
    alice, bob, carol = await joined_room(ds, make_member, ROOM, "alice", "bob", "carol")
    await carol.stop()
    cursor = carol.last_seq
    await carol.unsubscribe()
    await asyncio.sleep(0.2)  # the DS has seen the stream close
    dave = make_member(ds, "dave", ROOM)
    await dave.join()
    dave.start()
    started = time.monotonic()
    await wait_until(
        lambda: converged([alice, bob, dave], ["alice", "bob", "carol", "dave"]),
        what="the transition to execute without carol",
        timeout=30.0,
        check=check_all([alice, bob, dave]),
    )
    assert time.monotonic() - started < 30.0
    carol.subscribe(cursor)
    carol.start()
    members = [alice, bob, carol, dave]
    await wait_until(lambda: converged(members), what="carol caught up", check=check_all(members))


async def test_the_designated_committer_is_a_member_with_a_stream(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """alice holds the lowest leaf but has no stream: the commit request for dave's join names
    the next lowest leaf at once instead of waiting out alice's commit deadline."""
    ds = await start_ds(presence_timeout=60.0)
    alice, bob, _carol = await joined_room(ds, make_member, ROOM, "alice", "bob", "carol")
    await alice.stop()
    await alice.unsubscribe()
    await asyncio.sleep(0.2)
    await bob.stop()
    dave = make_member(ds, "dave", ROOM)
    await dave.join()
    request = await bob.until("commit_request")
    leaves = {m.identity: m.leaf_index for m in bob.require_group().members()}
    assert leaves["alice"] == 0
    assert request.commit_request.committer == min(("bob", "carol"), key=leaves.__getitem__)
