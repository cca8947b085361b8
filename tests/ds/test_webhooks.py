"""LiveKit webhooks on the DS's HTTP side (POST /livekit/webhook).

Webhooks are built the way livekit-server sends them (livekit/protocol
webhook/url_notifier.go): the body is the protojson encoding of a ``WebhookEvent``, the
``Authorization`` header is a bare JWT (no "Bearer") signed with the API key/secret, valid
for 5 minutes, whose ``sha256`` claim is the base64 SHA-256 of the body; content type
``application/webhook+json``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import time
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from google.protobuf.json_format import MessageToJson, Parse
from livekit import api
from livekit.protocol import models, webhook

from delivery_service.server import DeliveryServer

from .conftest import (
    API_KEY,
    API_SECRET,
    OTHER_SECRET,
    WAIT,
    MakeMember,
    joined_room,
    manager_of,
    room_snapshot,
    wait_until,
)
from .members import GrpcMember, check_all, converged

ROOM = "webhook-room"


def event_body(kind: str, identity: str, *, room: str = ROOM, created_at: int | None = None) -> str:
    event = webhook.WebhookEvent(
        event=kind,
        room=models.Room(name=room, sid="RM_test"),
        participant=models.ParticipantInfo(identity=identity, sid=f"PA_{identity}"),
        id=f"EV_{kind}_{identity}_{time.monotonic_ns()}",
        created_at=int(time.time()) if created_at is None else created_at,
    )
    return MessageToJson(event)


def signature(body: str, *, secret: str = API_SECRET, ttl: timedelta = timedelta(minutes=5)) -> str:
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return api.AccessToken(API_KEY, secret).with_ttl(ttl).with_sha256(digest).to_jwt()


async def post(
    server: DeliveryServer, body: str, authorization: str | None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/webhook+json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    url = f"http://127.0.0.1:{server.http_port}/livekit/webhook"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
        session.post(url, data=body.encode(), headers=headers) as response,
    ):
        return response.status, await response.json()


async def three_members(ds: DeliveryServer, make_member: MakeMember) -> list[GrpcMember]:
    return await joined_room(ds, make_member, ROOM, "alice", "bob", "carol")


async def after_join_second(ds: DeliveryServer, identity: str) -> None:
    """Waits until the wall clock's whole second is past the identity's join, so that a
    webhook created now (LiveKit's created_at has whole seconds) postdates the join."""
    joined = (await manager_of(ds).room_state(ROOM)).participants[identity].joined_at
    await asyncio.sleep(max(0.0, math.floor(joined) + 1.01 - time.time()))


@pytest.mark.parametrize("kind", ["participant_left", "participant_connection_aborted"])
async def test_signed_leave_webhook_removes_the_member(
    ds: DeliveryServer, make_member: MakeMember, kind: str
) -> None:
    """A signed leave event for carol makes the DS propose her Remove; alice and bob commit
    it and converge on a new epoch without her; a replay of the same webhook is a no-op."""
    members = await three_members(ds, make_member)
    alice, bob, carol = members
    epoch = alice.require_group().epoch
    await after_join_second(ds, "carol")
    body = event_body(kind, "carol")
    status, answer = await post(ds, body, signature(body))
    assert (status, answer) == (200, {"status": "removed"})

    remaining = [alice, bob]
    await wait_until(
        lambda: converged(remaining) and alice.require_group().epoch > epoch,
        what="alice and bob without carol",
        check=check_all(members),
    )
    assert alice.roster() == ["alice", "bob"]
    assert alice.require_group().epoch == epoch + 1
    removes = [
        e.proposal
        for e in alice.seen
        if e.HasField("proposal") and e.proposal.kind == "remove" and e.proposal.epoch == epoch
    ]
    assert [p.target_identity for p in removes] == ["carol"]
    commit = next(e.commit for e in alice.seen if e.HasField("commit") and e.commit.epoch == epoch)
    assert (list(commit.removed), list(commit.added)) == (["carol"], [])
    await wait_until(lambda: carol.group is None, what="carol sees her removal")
    state = await manager_of(ds).room_state(ROOM)
    assert "carol" not in state.participants and "carol" not in state.members

    before = await room_snapshot(ds.store, ROOM)
    status, answer = await post(ds, body, signature(body))  # a replay: its id was seen
    assert (status, answer) == (200, {"status": "duplicate"})
    other = event_body("participant_left", "carol")  # a new event about a departed one
    status, answer = await post(ds, other, signature(other))
    assert (status, answer) == (200, {"status": "noop"})
    assert await room_snapshot(ds.store, ROOM) == before


async def test_unsigned_forged_and_tampered_webhooks_are_refused(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """Unsigned, wrongly signed, expired, hash-less and tampered-body webhooks get 401 and
    change nothing: same record and log, same roster and epoch for every member."""
    members = await three_members(ds, make_member)
    await after_join_second(ds, "carol")
    body = event_body("participant_left", "carol")
    other = event_body("participant_left", "bob")
    no_hash = api.AccessToken(API_KEY, API_SECRET).to_jwt()
    before = await room_snapshot(ds.store, ROOM)
    cases: dict[str, tuple[str, str | None]] = {
        "unsigned": (body, None),
        "empty authorization": (body, ""),
        "garbage authorization": (body, "not-a-jwt"),
        "other secret": (body, signature(body, secret=OTHER_SECRET)),
        "expired": (body, signature(body, ttl=timedelta(minutes=-10))),
        "no sha256 claim": (body, no_hash),
        "tampered body": (other, signature(body)),
        "body with extra byte": (body + " ", signature(body)),
        "bearer prefix": (body, "Bearer " + signature(body)),
    }
    for name, (sent, authorization) in cases.items():
        status, answer = await post(ds, sent, authorization)
        assert status == 401, f"{name}: {status} {answer}"
        assert answer.get("error", "").startswith("invalid webhook"), f"{name}: {answer}"
    await asyncio.sleep(0.3)  # room for (wrong) reactions to show up
    assert await room_snapshot(ds.store, ROOM) == before
    assert converged(members)
    assert all(m.roster() == ["alice", "bob", "carol"] for m in members)


async def test_other_events_rooms_and_stale_notices_change_nothing(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """Signed events that must not remove anyone are answered 2xx/400 without a change:
    other event kinds, a leave for an unknown identity or an unknown room (no room is
    created), a leave created before the identity's latest join (a late notice for an
    older session), and events that name no room or participant."""
    members = await three_members(ds, make_member)
    before = await room_snapshot(ds.store, ROOM)
    joined = (await manager_of(ds).room_state(ROOM)).participants["carol"].joined_at
    cases = {
        "participant_joined": (event_body("participant_joined", "carol"), 200, "ignored"),
        "room_finished": (event_body("room_finished", "carol"), 200, "ignored"),
        "unknown identity": (event_body("participant_left", "zoe"), 200, "noop"),
        "unknown room": (event_body("participant_left", "carol", room="elsewhere"), 200, "noop"),
        "late notice": (
            event_body("participant_left", "carol", created_at=math.floor(joined) - 5),
            200,
            "noop",
        ),
        "no participant": (event_body("participant_left", ""), 400, None),
    }
    for name, (body, code, outcome) in cases.items():
        status, answer = await post(ds, body, signature(body))
        assert status == code, f"{name}: {status} {answer}"
        if outcome is not None:
            assert answer == {"status": outcome}, name
    await asyncio.sleep(0.3)
    assert await room_snapshot(ds.store, ROOM) == before
    assert await ds.store.load("elsewhere") is None
    assert converged(members)


async def test_leave_in_the_same_second_as_the_join_removes_the_member(
    ds: DeliveryServer, make_member: MakeMember
) -> None:
    """A participant that joins and leaves within one wall-clock second must still be
    removed: LiveKit's created_at (whole seconds) of that leave is <= the join time."""
    alice = make_member(ds, "alice", ROOM)
    await alice.join()
    alice.start()
    await wait_until(lambda: converged([alice]), what="alice's group")
    fraction = time.time() % 1
    if not 0.05 < fraction < 0.5:  # be early in a second, so join and leave fit in it
        await asyncio.sleep((1.05 - fraction) % 1)
    bob = make_member(ds, "bob", ROOM)
    await bob.join()
    body = event_body("participant_left", "bob")  # created_at = this whole second
    joined = (await manager_of(ds).room_state(ROOM)).participants["bob"].joined_at
    assert math.floor(joined) == webhook_created_at(body), "the test missed its second"
    status, answer = await post(ds, body, signature(body))
    assert (status, answer) == (200, {"status": "removed"})
    assert "bob" not in (await manager_of(ds).room_state(ROOM)).participants


def webhook_created_at(body: str) -> int:
    return int(Parse(body, webhook.WebhookEvent()).created_at)


async def test_a_replayed_webhook_changes_nothing_and_bad_bytes_are_400(
    ds: DeliveryServer, make_member: MakeMember, caplog: pytest.LogCaptureFixture
) -> None:
    """carol leaves and joins again within LiveKit's second: the signed participant_left
    replayed afterwards (same event id) must not remove the new carol. A body that is not
    UTF-8 is 400 (not 500), and no log record quotes the raw body."""
    members = await three_members(ds, make_member)
    await after_join_second(ds, "carol")
    body = event_body("participant_left", "carol")
    status, answer = await post(ds, body, signature(body))
    assert (status, answer) == (200, {"status": "removed"})
    alice, bob, carol = members
    await wait_until(lambda: converged([alice, bob]), what="carol out")
    await carol.join()
    await wait_until(lambda: converged(members), what="carol back")
    before = await room_snapshot(ds.store, ROOM)
    status, answer = await post(ds, body, signature(body))  # the replay
    assert (status, answer) == (200, {"status": "duplicate"})
    await asyncio.sleep(0.3)
    assert await room_snapshot(ds.store, ROOM) == before
    assert converged(members)

    url = f"http://127.0.0.1:{ds.http_port}/livekit/webhook"
    raw = b"\xff\xfe" + b"GARBAGE-" * 2000
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=raw, headers={"Authorization": signature(body)}) as response,
    ):
        assert response.status == 400
    assert not any("GARBAGE" in r.getMessage() for r in caplog.records)
