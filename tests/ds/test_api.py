"""API rules over gRPC that the other files do not cover: ReportFailure and
ReportDisconnect remove members, the per-identity rate limit, size limits of string
fields, and requests that are not even valid protobuf."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from aiohttp import web
from livekit import api
from livekit.protocol import models
from livekit.protocol import room as room_pb

from delivery_service.limits import Limits
from delivery_service.server import DeliveryServer
from mls_provider import transport as tp
from mls_provider.proto import delivery_pb2 as pb

from .conftest import (
    API_KEY,
    API_SECRET,
    WAIT,
    MakeMember,
    StartDs,
    bearer,
    joined_room,
    manager_of,
    mint_token,
    raw_channel,
    room_snapshot,
    target,
    wait_until,
)
from .members import GrpcMember, check_all, converged

ROOM = "api-room"


async def room_of(ds: DeliveryServer, make_member: MakeMember, *names: str) -> list[GrpcMember]:
    return await joined_room(ds, make_member, ROOM, *names)


async def test_report_failure_removes_the_leaf_and_the_member_joins_again(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """A member reporting a failure is removed (a commit removes its leaf); joining again
    with a new key package brings it back on a new leaf, and all three converge."""
    alice, bob, carol = await room_of(ds, make_member, "alice", "bob", "carol")
    epoch = alice.require_group().epoch
    await carol.client_ds.report_failure(epoch, "could not decrypt")
    await wait_until(lambda: carol.group is None, what="carol removed", check=check_all([carol]))
    assert carol.applied[-1].self_removed
    await wait_until(lambda: converged([alice, bob]), what="alice and bob")
    assert alice.roster() == ["alice", "bob"]
    await carol.join()
    await wait_until(lambda: converged([alice, bob, carol]), what="carol back")
    commits = [e.commit for e in alice.seen if e.HasField("commit") and e.commit.epoch >= epoch]
    assert [(list(c.removed), list(c.added)) for c in commits] == [(["carol"], []), ([], ["carol"])]


async def test_report_disconnect_removes_another_participant(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """Without a LiveKit URL, a participant's report that bob disconnected removes bob;
    a report about an unknown identity changes nothing."""
    alice, bob, carol = await room_of(ds, make_member, "alice", "bob", "carol")
    before = await room_snapshot(ds.store, ROOM)
    await alice.client_ds.report_disconnect("nobody")
    assert await room_snapshot(ds.store, ROOM) == before
    await alice.client_ds.report_disconnect("bob")
    await wait_until(lambda: converged([alice, carol]), what="alice and carol without bob")
    assert alice.roster() == ["alice", "carol"]
    assert "bob" not in (await manager_of(ds).room_state(ROOM)).participants
    await wait_until(lambda: bob.group is None, what="bob sees his removal")


class FakeRoomService:
    """LiveKit's RoomService.GetParticipant (Twirp) for the DS's presence checks."""

    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.asked: list[tuple[str, str, dict[str, Any]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def get_participant(self, request: web.Request) -> web.Response:
        asked = room_pb.RoomParticipantIdentity.FromString(await request.read())
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        grants = api.TokenVerifier(API_KEY, API_SECRET).verify(token).video
        self.asked.append(
            (
                asked.room,
                asked.identity,
                {"admin": grants and grants.room_admin, "room": grants and grants.room},
            )
        )
        if asked.identity in self.present:
            info = models.ParticipantInfo(identity=asked.identity, sid="PA_x")
            return web.Response(body=info.SerializeToString(), content_type="application/protobuf")
        return web.json_response({"code": "not_found", "msg": "participant not found"}, status=404)

    async def __aenter__(self) -> FakeRoomService:
        app = web.Application()
        app.router.add_post("/twirp/livekit.RoomService/GetParticipant", self.get_participant)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_report_disconnect_is_checked_with_livekit(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """With a LiveKit URL, a report about a participant LiveKit still has in the room is
    ignored (nothing stored), one LiveKit no longer has is acted on; the DS asks with a
    room-admin token for that room."""
    async with FakeRoomService(present={"alice", "bob", "carol"}) as livekit:
        ds = await start_ds(livekit_url=livekit.url)
        alice, bob, carol = await room_of(ds, make_member, "alice", "bob", "carol")
        livekit.asked.clear()  # (each join was checked too)
        livekit.present.discard("carol")  # carol left the LiveKit room
        before = await room_snapshot(ds.store, ROOM)
        await alice.client_ds.report_disconnect("bob")
        await asyncio.sleep(0.2)
        assert await room_snapshot(ds.store, ROOM) == before
        await alice.client_ds.report_disconnect("carol")
        await wait_until(lambda: converged([alice, bob]), what="alice and bob without carol")
        assert alice.roster() == ["alice", "bob"]
        assert [(r, i) for r, i, _ in livekit.asked] == [(ROOM, "bob"), (ROOM, "carol")]
        assert all(g == {"admin": True, "room": ROOM} for _, _, g in livekit.asked)
        await wait_until(lambda: carol.group is None, what="carol sees her removal")
        await ds.stop()


async def test_livekit_checks_fail_closed(start_ds: StartDs, make_member: MakeMember) -> None:
    """With a LiveKit URL: a token holder LiveKit does not have in the room cannot join the
    group (PERMISSION_DENIED); when LiveKit cannot be asked, a join and a disconnect report
    are answered UNAVAILABLE and change nothing (one member cannot get another removed
    while LiveKit is down)."""
    async with FakeRoomService(present={"alice", "bob"}) as livekit:
        ds = await start_ds(livekit_url=livekit.url)
        alice, _bob = await room_of(ds, make_member, "alice", "bob")
        mallory = make_member(ds, "mallory", ROOM)
        with pytest.raises(tp.PermissionDenied, match="connect to the LiveKit room"):
            await mallory.join()
        url = livekit.url
    # the fake RoomService is gone: LiveKit cannot be asked
    assert url
    before = await room_snapshot(ds.store, ROOM)
    with pytest.raises(tp.Unavailable, match="LiveKit cannot be asked"):
        await alice.client_ds.report_disconnect("bob")
    with pytest.raises(tp.Unavailable, match="LiveKit cannot be asked"):
        await make_member(ds, "carol", ROOM).join()
    assert await room_snapshot(ds.store, ROOM) == before


async def test_ready_from_an_identity_that_has_not_joined_is_not_found(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """docs/protocol.md: NOT_FOUND for "Subscribe or Ready by an identity that has not
    joined the room" — here in a quiet room, at its current epoch."""
    alice, _ = await room_of(ds, make_member, "alice", "bob")
    epoch = alice.require_group().epoch
    async with tp.DeliveryClient(target(ds), mint_token("eve", ROOM)) as eve:
        with pytest.raises(tp.NotJoined):
            await eve.ready(epoch)


async def test_rate_limit_per_identity(start_ds: StartDs) -> None:
    """Past its burst an identity gets RESOURCE_EXHAUSTED ("rate limit"); another identity
    of the same room is not affected, and nothing is stored."""
    ds = await start_ds(limits=Limits(rate_per_second=0.5, burst=5))
    async with raw_channel(target(ds)) as stub:
        alice, bob = bearer(mint_token("alice", ROOM)), bearer(mint_token("bob", ROOM))
        for _ in range(5):  # Leave of a non-participant: a valid no-op
            await stub.Leave(pb.LeaveRequest(), metadata=alice, timeout=WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Leave(pb.LeaveRequest(), metadata=alice, timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in (info.value.details() or "")
        await stub.Leave(pb.LeaveRequest(), metadata=bob, timeout=WAIT)
    assert await ds.store.load(ROOM) is None


async def test_string_limits_count_bytes(start_ds: StartDs) -> None:
    """A reason of 10 three-byte characters (30 bytes) exceeds a 16-byte limit."""
    ds = await start_ds(limits=Limits(reason=16))
    async with tp.DeliveryClient(target(ds), mint_token("alice", ROOM)) as client:
        with pytest.raises(tp.ResourceExhausted, match="limit is 16"):
            await client.report_failure(0, "漢" * 10)


async def test_undecodable_request_is_invalid_argument(ds: DeliveryServer) -> None:
    """Raw bytes that are not a JoinRequest get INVALID_ARGUMENT, and nothing is stored."""
    async with grpc.aio.insecure_channel(target(ds)) as channel:
        join = channel.unary_unary("/livekit.mls.v1.DeliveryService/Join")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await join(b"\xff\xff\xff", metadata=bearer(mint_token("alice", ROOM)), timeout=WAIT)
    assert await room_snapshot(ds.store, ROOM) == (None, [])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_an_overlong_reported_identity_is_named_as_such(ds: DeliveryServer) -> None:
    """ReportDisconnect's over-long identity is reported under its own field name."""
    async with tp.DeliveryClient(target(ds), mint_token("alice", ROOM)) as client:
        with pytest.raises(tp.ResourceExhausted, match="identity is 2000 bytes"):
            await client.report_disconnect("x" * 2000)


async def test_a_commit_of_another_group_is_invalid_argument(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """A valid commit of another room's group is INVALID_ARGUMENT (not a stale epoch)."""
    alice, _ = await room_of(ds, make_member, "alice", "bob")
    other, _ = await joined_room(ds, make_member, "other-room", "zoe", "yan")
    foreign = other.require_group().commit()
    before = await room_snapshot(ds.store, ROOM)
    with pytest.raises(tp.InvalidRequest, match="another group"):
        await alice.client_ds.submit_commit(
            alice.require_group().epoch, foreign.commit, b"", foreign.group_info or b""
        )
    assert await room_snapshot(ds.store, ROOM) == before
