"""The room event stream (Subscribe): cursors, slow readers, shutdown, retention.

Streams are compared entry by entry (serialized bytes) with the room log in the store,
filtered to what the subscriber may see (a Welcome only reaches its recipients).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from delivery_service.model import LogEntry
from delivery_service.server import DeliveryServer
from delivery_service.store import SqliteStore
from mls_provider import transport as tp
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.proto import delivery_pb2_grpc as pb_grpc

from .conftest import (
    WAIT,
    MakeMember,
    StartDs,
    bearer,
    joined_room,
    mint_token,
    raw_channel,
    room_snapshot,
    target,
    wait_until,
)
from .members import GrpcMember, check_all, converged

ROOM = "stream-room"


async def visible_log(server: DeliveryServer, identity: str, after: int = 0) -> list[bytes]:
    """The serialized events after ``after`` that ``identity`` may see, from the store."""
    _, entries = await room_snapshot(server.store, ROOM)
    return [e.event for e in entries if e.seq > after and e.visible_to(identity)]


async def read_until(call: AsyncIterator[pb.RoomEvent], head: int) -> list[bytes]:
    """Reads a stream until the event with seq ``head`` (bounded by WAIT)."""
    out: list[bytes] = []

    async def read() -> None:
        async for event in call:
            out.append(event.SerializeToString())
            if event.seq >= head:
                return
        raise AssertionError("stream ended early")

    await asyncio.wait_for(read(), WAIT)
    return out


async def head_of(server: DeliveryServer) -> int:
    state = await server.store.load(ROOM)
    assert state is not None
    return state.head


async def busy_room(
    server: DeliveryServer, make_member: MakeMember, commits: int
) -> list[GrpcMember]:
    """alice, bob, carol (then dave) converged after ``commits`` extra commits by alice."""
    members = await joined_room(server, make_member, ROOM, "alice", "bob", "carol")
    for _ in range(commits):
        epoch = members[0].require_group().epoch
        await members[0].commit()
        await wait_until(
            functools.partial(converged, members, epoch=epoch + 1),
            what="commit applied",
            check=check_all(members),
        )
    dave = make_member(server, "dave", ROOM)
    await dave.join()
    dave.start()
    members.append(dave)
    await wait_until(lambda: converged(members), what="dave", check=check_all(members))
    return members


async def test_resume_from_any_cursor_gets_exactly_the_entries_after_it(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """Subscribing after seq k yields exactly bob's visible log entries with seq > k, in
    order, byte for byte — for every k from 0 to the head, including seqs of entries bob
    may not see (dave's Welcome) — and a stream cut after some events and resumed from
    its last seq continues without gap or duplicate, also across live events."""
    members = await busy_room(ds, make_member, commits=5)
    head = await head_of(ds)
    welcome_seqs = [e.seq for e in members[3].seen if e.HasField("welcome")]
    assert welcome_seqs, "dave got no welcome"
    full = await visible_log(ds, "bob")
    assert len(full) < head, "bob should not see dave's welcome"

    async with tp.DeliveryClient(target(ds), mint_token("bob", ROOM)) as bob:
        for after in range(head + 1):
            expected = await visible_log(ds, "bob", after)
            if not expected:
                continue
            got = await read_until(bob.subscribe(after), head)
            assert got == expected, f"after={after}"

        # cut after 7 events, resume from the last seq while new events are being made
        first = cast(AsyncGenerator[pb.RoomEvent, None], bob.subscribe(0))
        part: list[pb.RoomEvent] = []
        while len(part) < 7:
            part.append(await asyncio.wait_for(anext(first), WAIT))
        await first.aclose()
        alice = members[0]
        epoch = alice.require_group().epoch
        resumed = cast(AsyncGenerator[pb.RoomEvent, None], bob.subscribe(part[-1].seq))
        await alice.commit()
        await wait_until(
            lambda: converged(members, epoch=epoch + 1),
            what="one more commit",
            check=check_all(members),
        )
        new_head = await head_of(ds)
        rest = await read_until(resumed, new_head)
        await resumed.aclose()
    assert [e.SerializeToString() for e in part] + rest == await visible_log(ds, "bob")


async def test_stalled_reader_is_cut_off_without_delaying_the_room(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """A subscriber that stops reading (small stream queue) is cut off with
    RESOURCE_EXHAUSTED — after the events it had buffered, which are a gap-free prefix —
    while the other members keep getting every commit promptly; it then resumes from its
    last seq and gets exactly the rest."""
    ds = await start_ds(stream_queue_size=8)
    names = ("alice", "bob", "slow")
    members = [make_member(ds, name, ROOM) for name in names]
    for member in members:
        await member.join()
        member.start()
    await wait_until(lambda: converged(members), what="3 members", check=check_all(members))
    alice, bob, slow = members
    await slow.stop()
    cursor = slow.last_seq
    await slow.unsubscribe()
    await wait_until(lambda: ds.hub.subscriber_count == 2, what="slow's stream closed")
    active = [alice, bob]

    latencies: list[float] = []
    options = [("grpc.http2.bdp_probe", 0)]  # keep the client's receive window small
    async with grpc.aio.insecure_channel(target(ds), options=options) as channel:
        stub = pb_grpc.DeliveryServiceStub(channel)
        stalled = stub.Subscribe(
            pb.SubscribeRequest(after=cursor), metadata=bearer(mint_token("slow", ROOM))
        )
        await wait_until(lambda: ds.hub.subscriber_count == 3, what="the stalled stream")
        deadline = time.monotonic() + 60
        while ds.metrics.registry.get_sample_value("lkmls_subscribers_cut_total") == 0:
            assert time.monotonic() < deadline, "the stalled reader was never cut off"
            epoch = alice.require_group().epoch
            sent = time.monotonic()
            response = await alice.commit()
            await slow.client_ds.ready(response.epoch)  # its acks still come (another path)
            await wait_until(
                functools.partial(converged, active, names, epoch + 1),
                what="bob applies alice's commit",
                check=check_all(active),
            )
            index = next(i for i, e in enumerate(bob.seen) if e.seq == response.seq)
            latencies.append(bob.received_at[index] - sent)
        assert len(latencies) > 10, "cut off before any backlog could build up"
        assert max(latencies) < 1.0, f"bob waited up to {max(latencies):.3f}s for a commit"

        received: list[pb.RoomEvent] = []

        async def drain() -> None:
            async for event in stalled:
                received.append(event)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(drain(), WAIT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell behind" in (info.value.details() or "")
        assert "resume" in (info.value.details() or "")

    expected = await visible_log(ds, "slow", cursor)
    buffered = [e.SerializeToString() for e in received]
    assert buffered == expected[: len(buffered)], "the cut stream has a gap or reorder"
    last = received[-1].seq if received else cursor
    async with tp.DeliveryClient(target(ds), mint_token("slow", ROOM)) as client:
        rest = await read_until(client.subscribe(last), await head_of(ds))
    assert buffered + rest == expected
    assert converged(active, names)


async def test_graceful_shutdown_ends_streams_with_unavailable(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """Stopping the DS ends every open stream with UNAVAILABLE ("shutting down; resume
    ..."), promptly, and the typed client reports Unavailable."""
    ds = await start_ds(shutdown_grace=5.0)
    members = [make_member(ds, name, ROOM) for name in ("alice", "bob")]
    for member in members:
        await member.join()
        member.start()
    await wait_until(lambda: converged(members), what="2 members", check=check_all(members))
    async with grpc.aio.insecure_channel(target(ds)) as channel:
        stub = pb_grpc.DeliveryServiceStub(channel)
        calls = [
            stub.Subscribe(pb.SubscribeRequest(after=0), metadata=bearer(mint_token(n, ROOM)))
            for n in ("alice", "bob")
        ]

        async def drain(call: AsyncIterator[pb.RoomEvent]) -> grpc.aio.AioRpcError:
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as e:
                return e
            raise AssertionError("stream ended without a status")

        readers = [asyncio.ensure_future(drain(c)) for c in calls]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.wait_for(ds.stop(), WAIT)
        errors = await asyncio.wait_for(asyncio.gather(*readers), WAIT)
        assert time.monotonic() - started < 3.0, "shutdown waited for the streams' grace"
    for error in errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "shutting down" in (error.details() or "")
    for member in members:  # the members' own streams ended the same way (typed)
        with pytest.raises(tp.Unavailable, match="shutting down"):
            await member.stop()


async def test_cursor_older_than_the_retained_log_is_out_of_range(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """With log_retention=10, a cursor before the oldest retained entry gets OUT_OF_RANGE
    (CursorTooOld: join again); the oldest valid cursor (log start - 1) gets exactly the
    retained entries."""
    ds = await start_ds(log_retention=10)
    members = await busy_room(ds, make_member, commits=8)
    head = await head_of(ds)
    start = await ds.store.log_start(ROOM)
    assert start == head - 9 > 2
    async with tp.DeliveryClient(target(ds), mint_token("bob", ROOM)) as bob:
        for after in (0, 1, start - 2):
            with pytest.raises(tp.CursorTooOld, match="older than the retained log"):
                async for _ in bob.subscribe(after):
                    raise AssertionError(f"after={after}: got an event")
        got = await read_until(bob.subscribe(start - 1), head)
    retained: list[LogEntry] = (await room_snapshot(ds.store, ROOM))[1]
    assert got == [e.event for e in retained if e.visible_to("bob")]
    assert converged(members)


async def test_a_commit_stored_after_its_caller_gave_up_still_reaches_the_members(
    start_ds: StartDs, make_member: MakeMember, tmp_path: Path
) -> None:
    """A SubmitCommit whose client deadline passes while the store is slow (its writer
    thread busy) is still written when the store catches up. Then it must also be
    published: the other members get the accepted commit promptly (otherwise the room is
    wedged — every later commit gets EpochConflict for an epoch nobody can reach)."""
    ds = await start_ds(store=f"sqlite:///{tmp_path / 'ds.db'}")
    assert isinstance(ds.store, SqliteStore)
    members = [make_member(ds, name, ROOM) for name in ("alice", "bob")]
    for member in members:
        await member.join()
        member.start()
    await wait_until(lambda: converged(members), what="alice and bob", check=check_all(members))
    alice, bob = members
    await alice.stop()
    epoch = alice.require_group().epoch
    out = alice.make_commit()

    # a slow disk: the store's single writer thread is busy with another job
    release = threading.Event()
    busy = asyncio.ensure_future(ds.store._run(lambda db: release.wait(WAIT)))
    async with raw_channel(target(ds)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitCommit(
                pb.SubmitCommitRequest(
                    epoch=epoch, commit=out.commit, group_info=out.group_info or b""
                ),
                metadata=bearer(mint_token("alice", ROOM)),
                timeout=0.5,
            )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    release.set()
    await asyncio.wait_for(busy, WAIT)

    stored = await wait_for_commit_in_store(ds, epoch)
    assert stored, "the commit was not written (then nothing else would matter)"
    await wait_until(
        lambda: any(e.HasField("commit") and e.commit.epoch == epoch for e in bob.seen),
        timeout=1.5,
        what="bob receives the stored commit",
        check=check_all([bob]),
    )


async def wait_for_commit_in_store(server: DeliveryServer, epoch: int) -> bool:
    for _ in range(100):
        _, entries = await room_snapshot(server.store, ROOM)
        if any(e.decode().HasField("commit") and e.decode().commit.epoch == epoch for e in entries):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_removed_members_stream_ends_after_its_removal(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """carol is removed (a disconnect report): her stream delivers the commit that removes
    her, then ends with NOT_FOUND, and nothing after it reaches her (the next join's Add
    proposal carries the joiner's key package)."""
    members = await joined_room(ds, make_member, ROOM, "alice", "bob", "carol")
    alice, _bob, carol = members
    await alice.client_ds.report_disconnect("carol")
    await wait_until(lambda: carol.stream_ended is not None, what="carol's stream ends")
    assert isinstance(carol.stream_ended, tp.NotJoined)
    assert "no longer in the room's group" in carol.stream_ended.message
    removing = [e for e in carol.seen if e.HasField("commit") and "carol" in e.commit.removed]
    assert len(removing) == 1 and carol.seen[-1].seq >= removing[0].seq
    last_seen = carol.seen[-1].seq
    dave = make_member(ds, "dave", ROOM)
    await dave.join()
    dave.start()
    await wait_until(lambda: converged([alice, members[1], dave]), what="dave joined")
    assert carol.seen[-1].seq == last_seen


async def test_a_stream_ends_when_its_token_expires(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """A stream opened with a token that expires in 2 s is ended with UNAUTHENTICATED
    ("expired") then, although events may still flow to it."""
    await joined_room(ds, make_member, ROOM, "alice")
    token = mint_token("alice", ROOM, ttl=datetime.timedelta(seconds=2))
    async with raw_channel(target(ds)) as stub:
        call = stub.Subscribe(pb.SubscribeRequest(after=0), metadata=bearer(token))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (info.value.details() or "")


async def test_subscribe_is_rate_limited(start_ds: StartDs, make_member: MakeMember) -> None:
    """Opening streams counts against the caller's rate like every other call."""
    from delivery_service.limits import Limits

    ds = await start_ds(limits=Limits(rate_per_second=0.5, burst=5))
    await joined_room(ds, make_member, ROOM, "alice")
    codes = []
    async with raw_channel(target(ds)) as stub:
        for _ in range(8):
            call = stub.Subscribe(
                pb.SubscribeRequest(after=10**9), metadata=bearer(mint_token("alice", ROOM))
            )
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
