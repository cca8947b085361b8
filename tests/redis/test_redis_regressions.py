"""Regressions of RoomManager with a store shared by several DS processes: a write
without log entries seen by another process, a slow load overwriting a newer record, and
a participant whose key package is gone. Each test failed before its fix.

Two in-process delivery services share one Redis; their RoomManagers are driven
directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis_testlib import API_KEY, API_SECRET

from delivery_service.model import RoomState, group_id_for
from delivery_service.rooms import RoomManager
from delivery_service.server import DeliveryServer
from delivery_service.settings import Settings
from delivery_service.store.redis import RedisStore
from mls_provider import mls
from mls_provider.testing.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

ROOM = "issues"


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[RoomManager, RoomManager]]:
    servers = []
    for _ in range(2):
        settings = Settings(
            livekit_api_key=API_KEY,
            livekit_api_secret=API_SECRET,
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            store=redis_server.url,
        )
        server = DeliveryServer(settings)
        await server.start()
        servers.append(server)
    managers = [s.manager for s in servers]
    assert managers[0] is not None and managers[1] is not None
    yield managers[0], managers[1]
    for server in servers:
        await server.stop()


def key_package(identity: str) -> tuple[mls.MlsClient, bytes]:
    client = mls.MlsClient(identity, mls.SignatureKeyPair.generate())
    return client, client.generate_key_package()


async def until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_leave_through_a_process_that_missed_a_write_without_log_entries(
    pair: tuple[RoomManager, RoomManager],
) -> None:
    """alice joins through A (CreateGroup request: a log entry, B follows it); bob joins
    through A while the group is being created (no log entry: B is not told); bob then
    leaves through B. B's cached record has no bob: the Leave is dropped, and bob stays a
    participant — A will add him to the group when it is created."""
    a, b = pair
    await a.join(ROOM, "alice", key_package("alice")[1])
    await until(lambda: ROOM in b._rooms)  # B followed the create_group entry
    await a.join(ROOM, "bob", key_package("bob")[1])
    joined = await a.store.load(ROOM)
    assert joined is not None and "bob" in joined.participants
    await asyncio.sleep(0.3)  # whatever B could hear about it
    assert await b.leave(ROOM, "bob") is True
    stored = await b.store.load(ROOM)
    assert stored is not None and "bob" not in stored.participants


async def test_a_slow_load_does_not_overwrite_a_newer_record(
    pair: tuple[RoomManager, RoomManager],
) -> None:
    """B starts loading the room (reads the record without bob), A adds bob and B's change
    feed caches the new record; then B's first load finishes and caches the old one over
    it. B now tells bob he is not a participant: his Subscribe through B fails with
    NOT_FOUND and his session joins again (seen as needless re-joins in the 50-member
    race across three processes)."""
    a, b = pair
    alice, alice_kp = key_package("alice")
    await a.join(ROOM, "alice", alice_kp)
    state = await a.room_state(ROOM)
    group = alice.create_group(
        group_id_for(ROOM, state.generation), [a.ordering.ds_signing_identity]
    )
    await a.create_group(ROOM, "alice", state.generation, group.group_info())
    await until(lambda: ROOM in b._rooms)

    real_load = b.store.load
    started, release = asyncio.Event(), asyncio.Event()
    reader: asyncio.Task[bool] | None = None

    async def slow_reader_load(room: str) -> RoomState | None:
        record = await real_load(room)
        # only the reader's load is slow: B's change feed must stay free to cache the
        # newer record meanwhile (blocking it instead would only stall the feed)
        if asyncio.current_task() is reader and not started.is_set():
            started.set()
            await release.wait()
        return record

    b.store.load = slow_reader_load
    b._forget(ROOM)
    reader = asyncio.ensure_future(b.is_participant(ROOM, "bob"))  # reads the old record
    await asyncio.wait_for(started.wait(), 5.0)
    await asyncio.wait_for(a.join(ROOM, "bob", key_package("bob")[1]), 10.0)  # an Add
    await until(lambda: ROOM in b._rooms and "bob" in b._rooms[ROOM].state.participants)
    release.set()
    await asyncio.wait_for(reader, 5.0)  # whatever it answered from the record it read
    assert await b.is_participant(ROOM, "bob") is True


async def test_a_participant_whose_key_package_is_gone_is_dropped_cleanly(
    pair: tuple[RoomManager, RoomManager],
) -> None:
    """bob joins while alice's group is being created; his key package is gone when the
    group is created (here deleted by hand; across processes: another process dropped it
    after bob joined again, while this one still had the old record cached). Reconcile
    must forget bob (he joins again); instead CreateGroup fails with INTERNAL."""
    a, _ = pair
    alice, alice_kp = key_package("alice")
    await a.join(ROOM, "alice", alice_kp)
    await a.join(ROOM, "bob", key_package("bob")[1])
    state = await a.room_state(ROOM)
    assert isinstance(a.store, RedisStore)
    await a.store.redis.delete(f"{a.store.prefix}kp:{ROOM}")
    group = alice.create_group(
        group_id_for(ROOM, state.generation), [a.ordering.ds_signing_identity]
    )
    await a.create_group(ROOM, "alice", state.generation, group.group_info())
    stored = await a.store.load(ROOM)
    assert stored is not None and set(stored.participants) == {"alice"}
