"""The Store contract on every backend (MemoryStore, SqliteStore, RedisStore on a real
redis-server): round trip, compare-and-set, log paging and retention, key packages, the DS
key, ready acks and concurrent writers. Backend-specific behaviour is tested beside it
(SQLite below; Redis in tests/redis)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from delivery_service.errors import VersionConflict
from delivery_service.model import (
    CommitRequestState,
    LogEntry,
    Participant,
    PendingProposal,
    Phase,
    RoomState,
)
from delivery_service.store import MemoryStore, SqliteStore, Store, open_store
from mls_provider.proto import delivery_pb2 as pb

ROOM = "store-room"
StoreFactory = Callable[..., Store]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for this module; every test gets its own key prefix."""
    from mls_provider.testing.redis_server import RedisServer

    with RedisServer(workdir=tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server.url


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Builds a store of the parametrized backend; stores of one test share their data
    (SQLite: tmp_path/ds.db; Redis: a key prefix of its own)."""
    prefix = f"t{uuid.uuid4().hex[:12]}:"

    def make(log_retention: int = 10_000) -> Store:
        if request.param == "memory":
            return MemoryStore(log_retention=log_retention)
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            return open_store(f"{url}?prefix={prefix}", log_retention=log_retention)
        return SqliteStore(tmp_path / "ds.db", log_retention=log_retention)

    return make


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    s = make_store()
    await s.open()
    yield s
    await s.close()


def entry(seq: int, recipients: tuple[str, ...] | None = None) -> LogEntry:
    event = pb.RoomEvent(seq=seq, generation=0, execute=pb.TransitionExecute(epoch=seq))
    return LogEntry(seq, event.SerializeToString(), recipients)


def rich_state() -> RoomState:
    """A record using every field kind (bytes, nested dataclasses, None, floats)."""
    return RoomState(
        room=ROOM,
        generation=3,
        phase=Phase.ACTIVE,
        group_id=b"\x00\xffgroup",
        creator="",
        phase_since=1234.5,
        observer_snapshot=bytes(range(256)),
        group_info=b"gi",
        epoch=7,
        executed_epoch=6,
        participants={
            "alice": Participant("alice", b"kp-a", 1.25),
            "bob": Participant("bob", b"kp-b", 2.5),
        },
        members={"alice": b"kp-a"},
        pending=[PendingProposal(b"ref", "add", "bob", b"kp-b", 3.0)],
        commit_request=CommitRequestState(7, "alice", [b"ref"], 3.0),
        head=0,
        accepted={"ab" * 32: [1, 7]},
    )


async def test_save_load_round_trip(store: Store) -> None:
    """A saved record loads back equal, with version 1; a room never saved loads None."""
    assert await store.load(ROOM) is None
    assert await store.rooms() == []
    state = rich_state()
    await store.save(state, 0, [entry(1)], {}, [])
    assert state.version == 1
    loaded = await store.load(ROOM)
    assert loaded == state
    assert loaded is not state
    assert await store.rooms() == [ROOM]


async def test_compare_and_set_rejects_a_stale_version(store: Store) -> None:
    """A save expecting an old version raises VersionConflict and writes nothing: the
    record, the log and the key packages stay as the winning writer left them."""
    first = RoomState(room=ROOM, epoch=1, head=1)
    await store.save(first, 0, [entry(1)], {b"kp1": b"one"}, [])
    second = RoomState(room=ROOM, epoch=2, head=2)
    await store.save(second, 1, [entry(2)], {}, [])
    assert second.version == 2

    loser = RoomState(room=ROOM, version=1, epoch=99, head=3)  # read before `second` won
    with pytest.raises(VersionConflict):
        await store.save(loser, 1, [entry(3)], {b"kp2": b"two"}, [b"kp1"])
    assert loser.version == 1, "a failed save must not bump the caller's version"
    loaded = await store.load(ROOM)
    assert loaded is not None and (loaded.version, loaded.epoch, loaded.head) == (2, 2, 2)
    assert [e.seq for e in await store.read_log(ROOM, 0)] == [1, 2]
    assert await store.key_package(ROOM, b"kp1") == b"one"
    assert await store.key_package(ROOM, b"kp2") is None

    with pytest.raises(VersionConflict):  # creating a room that exists
        await store.save(RoomState(room=ROOM), 0, [], {}, [])
    with pytest.raises(VersionConflict):  # a version from the future
        await store.save(RoomState(room=ROOM), 5, [], {}, [])
    assert (await store.load(ROOM)) == loaded


async def test_read_log_after_and_limit(store: Store) -> None:
    """read_log returns the entries strictly after the cursor, oldest first, at most
    ``limit``, with their recipients; other rooms' logs are separate."""
    state = RoomState(room=ROOM)
    entries = [entry(i, ("bob",) if i % 3 == 0 else None) for i in range(1, 21)]
    await store.save(state, 0, entries[:10], {}, [])
    await store.save(state, 1, entries[10:], {}, [])
    other = RoomState(room="other-room")
    await store.save(other, 0, [entry(1), entry(2)], {}, [])

    assert [e.seq for e in await store.read_log(ROOM, 0)] == list(range(1, 21))
    assert [e.seq for e in await store.read_log(ROOM, 7, 5)] == [8, 9, 10, 11, 12]
    assert await store.read_log(ROOM, 20) == []
    assert await store.read_log(ROOM, 1000) == []
    assert await store.read_log("nowhere", 0) == []
    assert await store.read_log(ROOM, 0) == entries
    assert (await store.read_log(ROOM, 2, 1))[0].recipients == ("bob",)
    assert [e.seq for e in await store.read_log("other-room", 0)] == [1, 2]
    assert await store.log_start("nowhere") == 1


async def test_retention_trims_the_log_and_moves_log_start(make_store: StoreFactory) -> None:
    """Only the newest ``log_retention`` entries are kept; log_start names the oldest."""
    store = make_store(log_retention=5)
    await store.open()
    try:
        state = RoomState(room=ROOM)
        assert await store.log_start(ROOM) == 1
        await store.save(state, 0, [entry(i) for i in range(1, 4)], {}, [])
        assert await store.log_start(ROOM) == 1
        await store.save(state, 1, [entry(i) for i in range(4, 13)], {}, [])
        assert await store.log_start(ROOM) == 8
        assert [e.seq for e in await store.read_log(ROOM, 0)] == [8, 9, 10, 11, 12]
        await store.save(state, 2, [entry(13)], {}, [])
        assert await store.log_start(ROOM) == 9
        assert [e.seq for e in await store.read_log(ROOM, 0)] == [9, 10, 11, 12, 13]
    finally:
        await store.close()


async def test_key_packages_put_and_drop(store: Store) -> None:
    """Key packages are stored per room by ref, replaced by a later put, and dropped."""
    state = RoomState(room=ROOM)
    await store.save(state, 0, [], {b"a": b"A", b"b": b"B"}, [])
    other = RoomState(room="other-room")
    await store.save(other, 0, [], {b"a": b"other A"}, [])
    assert await store.key_package(ROOM, b"a") == b"A"
    assert await store.key_package("other-room", b"a") == b"other A"
    await store.save(state, 1, [], {b"c": b"C", b"b": b"B2"}, [b"a"])
    assert await store.key_package(ROOM, b"a") is None
    assert await store.key_package(ROOM, b"b") == b"B2"
    assert await store.key_package(ROOM, b"c") == b"C"
    assert await store.key_package("other-room", b"a") == b"other A"
    await store.save(state, 2, [], {}, [b"missing"])  # dropping an unknown ref is fine
    assert await store.key_package(ROOM, b"c") == b"C"


async def test_ds_key_is_created_once(store: Store) -> None:
    """The first ds_key call stores the offered secret; later calls return it."""
    assert await store.ds_key(b"first") == b"first"
    assert await store.ds_key(b"second") == b"first"


async def test_sqlite_persists_everything_across_reopen(tmp_path: Path) -> None:
    """A SQLite store reopened on the same file has the DS key, the record, the log and the
    key packages; ``open_store`` URLs open the same file."""
    path = tmp_path / "sub" / "ds.db"
    store = SqliteStore(path)
    await store.open()
    assert await store.ds_key(b"k" * 32) == b"k" * 32
    state = rich_state()
    await store.save(state, 0, [entry(1, ("alice",))], {b"kp": b"data"}, [])
    await store.close()

    again = open_store(f"sqlite://{path}")
    assert isinstance(again, SqliteStore)
    await again.open()
    try:
        assert await again.ds_key(b"other") == b"k" * 32
        assert await again.load(ROOM) == state
        assert await again.read_log(ROOM, 0) == [entry(1, ("alice",))]
        assert await again.key_package(ROOM, b"kp") == b"data"
    finally:
        await again.close()


async def test_a_failed_sqlite_write_is_rolled_back(tmp_path: Path) -> None:
    """A save that fails half-way (a log seq that already exists) leaves the record, the
    log and the key packages exactly as they were, and the store stays usable."""
    store = SqliteStore(tmp_path / "ds.db")
    await store.open()
    try:
        state = RoomState(room=ROOM, epoch=1, head=2)
        await store.save(state, 0, [entry(1), entry(2)], {b"old": b"O"}, [])
        before = (await store.load(ROOM), await store.read_log(ROOM, 0))

        broken = RoomState(room=ROOM, epoch=2, head=3)
        with pytest.raises(Exception, match="UNIQUE"):
            await store.save(broken, 1, [entry(3), entry(2)], {b"new": b"N"}, [b"old"])
        assert broken.version == 1
        assert (await store.load(ROOM), await store.read_log(ROOM, 0)) == before
        assert await store.key_package(ROOM, b"old") == b"O"
        assert await store.key_package(ROOM, b"new") is None

        await store.save(broken, 1, [entry(3)], {}, [])  # the same version still works
        assert (await store.load(ROOM)) == broken and broken.version == 2
    finally:
        await store.close()


async def test_sqlite_log_rows_are_what_was_saved(tmp_path: Path) -> None:
    """Recipients survive the SQLite round trip as a tuple (JSON in the table), None as
    "everyone"."""
    store = SqliteStore(tmp_path / "ds.db")
    await store.open()
    try:
        state = RoomState(room=ROOM, head=2)
        await store.save(state, 0, [entry(1), entry(2, ("a", "b"))], {}, [])
        log = await store.read_log(ROOM, 0)
        assert [e.recipients for e in log] == [None, ("a", "b")]
        assert [e.visible_to("a") for e in log] == [True, True]
        assert [e.visible_to("c") for e in log] == [True, False]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "ds.db")) as db:
        rows = db.execute("SELECT seq, recipients FROM log ORDER BY seq").fetchall()
    assert [(seq, None if r is None else json.loads(r)) for seq, r in rows] == [
        (1, None),
        (2, ["a", "b"]),
    ]


async def test_ready_acks_keep_only_the_newest_epoch(store: Store) -> None:
    """mark_ready accumulates identities per (generation, epoch); acks for an older epoch
    than the newest seen count nothing."""
    assert await store.mark_ready(ROOM, 0, 3, "a") == {"a"}
    assert await store.mark_ready(ROOM, 0, 3, "b") == {"a", "b"}
    assert await store.mark_ready(ROOM, 0, 4, "a") == {"a"}
    assert await store.mark_ready(ROOM, 0, 3, "c") == set()
    assert await store.mark_ready(ROOM, 1, 0, "c") == {"c"}
    assert await store.mark_ready("other-room", 0, 3, "z") == {"z"}


def test_open_store_rejects_unknown_urls() -> None:
    """Only sqlite://, memory:// and redis:// URLs are accepted, with a clear message."""
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("postgres://x")
    with pytest.raises(ValueError, match="needs a path"):
        open_store("sqlite://")
    assert isinstance(open_store("memory://"), MemoryStore)


async def test_concurrent_saves_have_one_winner_per_room(store: Store) -> None:
    """60 concurrent saves, three competing for each of 20 rooms from the same version:
    exactly one per room wins; the losers raise VersionConflict and leave no trace (their
    log entries and key packages are absent), whatever saves shared a group commit."""
    rooms = [f"room-{i}" for i in range(20)]

    async def attempt(room: str, n: int) -> int:
        state = RoomState(room=room, epoch=n, head=1)
        event = pb.RoomEvent(seq=1, execute=pb.TransitionExecute(epoch=n)).SerializeToString()
        await store.save(state, 0, [LogEntry(1, event)], {f"kp-{n}".encode(): b"x"}, [])
        return n

    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(attempt(room, n) for room in rooms for n in range(3)), return_exceptions=True
        ),
        30,
    )
    for i, room in enumerate(rooms):
        mine = outcomes[3 * i : 3 * i + 3]
        winners = [o for o in mine if isinstance(o, int)]
        assert len(winners) == 1, (room, mine)
        assert all(isinstance(o, VersionConflict) for o in mine if not isinstance(o, int))
        loaded = await store.load(room)
        assert loaded is not None and (loaded.version, loaded.epoch) == (1, winners[0])
        log = await store.read_log(room, 0)
        assert [e.decode().execute.epoch for e in log] == [winners[0]]
        for n in range(3):
            expected = b"x" if n == winners[0] else None
            assert await store.key_package(room, f"kp-{n}".encode()) == expected
    if isinstance(store, SqliteStore):
        assert store.group_commits < 60, "no save shared a group commit: isolation untested"
