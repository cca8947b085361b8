"""The Store contract on RedisStore (as tests/ds/test_store.py checks it on SQLite and
memory), plus what only a shared store has: several instances (= DS processes) on one
Redis sharing the DS key, ready acks and a change feed, atomic and idempotent saves when
connections break, and a clear error when Redis is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from redis_testlib import MakeRedis, MakeStore

from delivery_service.errors import VersionConflict
from delivery_service.model import (
    LogEntry,
    RoomState,
)
from delivery_service.store import open_store
from delivery_service.store.redis import RedisStore, RedisUnavailable, pack_entry, unpack_entry
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.testing.redis_server import RedisServer, RedisServerError

pytestmark = pytest.mark.redis

ROOM = "store-room"


def entry(seq: int, recipients: tuple[str, ...] | None = None) -> LogEntry:
    event = pb.RoomEvent(seq=seq, generation=0, execute=pb.TransitionExecute(epoch=seq))
    return LogEntry(seq, event.SerializeToString(), recipients)


class Watch:
    """Consumes a store's change feed in a task, so a test can wait for the next report
    or check that none comes without disturbing the iterator."""

    def __init__(self, store: RedisStore) -> None:
        self.queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self._changes = store.changes()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for change in self._changes:
            self.queue.put_nowait(change)

    async def next(self, timeout: float = 5.0) -> tuple[str, int]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def nothing(self, wait: float = 0.3) -> None:
        await asyncio.sleep(wait)
        assert self.queue.empty(), f"unexpected change notification {self.queue.get_nowait()}"

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def watch() -> AsyncIterator[Callable[[RedisStore], Watch]]:
    watches: list[Watch] = []

    def make(store: RedisStore) -> Watch:
        watches.append(Watch(store))
        return watches[-1]

    yield make
    for w in watches:
        await w.close()


# ---- the contract, Redis specifics (the generic contract: tests/ds/test_store.py) ----------


async def test_compare_and_set_conflict_writes_nothing(
    redis_server: RedisServer, make_store: MakeStore, watch: Callable[[RedisStore], Watch]
) -> None:
    """Redis specifics of the compare-and-set (the contract itself runs on Redis in
    tests/ds/test_store.py): every won save is announced on the change feed, a lost one
    is not, and the conflict names the stored version."""
    store = await make_store(redis_server.url)
    watcher = await make_store(redis_server.url)
    changes = watch(watcher)
    await changes.nothing()  # subscribed
    first = RoomState(room=ROOM, epoch=1, head=1)
    await store.save(first, 0, [entry(1)], {b"kp1": b"one"}, [])
    assert await changes.next() == (ROOM, 1)
    second = RoomState(room=ROOM, epoch=2, head=2)
    await store.save(second, 1, [entry(2)], {}, [])
    assert second.version == 2
    assert await changes.next() == (ROOM, 2)

    loser = RoomState(room=ROOM, version=1, epoch=99, head=3)
    with pytest.raises(VersionConflict, match="version 2"):
        await store.save(loser, 1, [entry(3)], {b"kp2": b"two"}, [b"kp1"])
    await changes.nothing()


async def test_a_duplicate_seq_fails_the_whole_save(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    """A save with a log seq that exists (or twice in one save) fails before writing
    anything; the same version can then be saved correctly."""
    store = await make_store(redis_server.url)
    state = RoomState(room=ROOM, epoch=1, head=2)
    await store.save(state, 0, [entry(1), entry(2)], {b"old": b"O"}, [])
    before = (await store.load(ROOM), await store.read_log(ROOM, 0))
    broken = RoomState(room=ROOM, epoch=2, head=3)
    with pytest.raises(Exception, match="log seq 2 already exists"):
        await store.save(broken, 1, [entry(3), entry(2)], {b"new": b"N"}, [b"old"])
    with pytest.raises(Exception, match="log seq 3 already exists"):
        await store.save(broken, 1, [entry(3), entry(3)], {}, [])
    assert broken.version == 1
    assert (await store.load(ROOM), await store.read_log(ROOM, 0)) == before
    assert await store.key_package(ROOM, b"old") == b"O"
    assert await store.key_package(ROOM, b"new") is None
    await store.save(broken, 1, [entry(3)], {}, [])
    assert await store.load(ROOM) == broken and broken.version == 2


async def test_ds_key_is_shared_by_every_process(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    """Processes starting at once all end up with the one key that was stored first."""
    stores = [await make_store(redis_server.url) for _ in range(5)]
    keys = await asyncio.gather(*(s.ds_key(bytes([i]) * 32) for i, s in enumerate(stores)))
    assert len(set(keys)) == 1 and keys[0] in {bytes([i]) * 32 for i in range(5)}
    assert await stores[0].ds_key(b"later" * 8) == keys[0]


async def test_ready_acks_are_shared_and_keep_the_newest_epoch(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    """Acks given to different processes add up; acks for an older epoch than the newest
    seen count nothing (as in the single-process stores); acks expire."""
    a = await make_store(redis_server.url, ready_ttl=60)
    b = await make_store(redis_server.url, ready_ttl=60)
    assert await a.mark_ready(ROOM, 0, 3, "alice") == {"alice"}
    assert await b.mark_ready(ROOM, 0, 3, "bob") == {"alice", "bob"}
    assert await a.mark_ready(ROOM, 0, 3, "bob") == {"alice", "bob"}
    assert await b.mark_ready(ROOM, 0, 4, "alice") == {"alice"}
    assert await a.mark_ready(ROOM, 0, 3, "carol") == set()
    assert await a.mark_ready(ROOM, 1, 0, "carol") == {"carol"}
    assert await b.mark_ready("other-room", 0, 3, "zed") == {"zed"}
    ttls = [await a.redis.ttl(k) for k in await a.redis.keys(f"{a.prefix}rdy*")]
    assert ttls and all(0 < ttl <= 60 for ttl in ttls)


async def test_prefixes_separate_deployments(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    """Stores with other prefixes (argument or ``?prefix=`` in the URL) share nothing."""
    default = await make_store(redis_server.url)
    by_url = await make_store(redis_server.url + "?prefix=tenant-b:")
    by_arg = await make_store(redis_server.url, prefix="tenant-c:")
    assert (default.prefix, by_url.prefix, by_arg.prefix) == ("lkmls:", "tenant-b:", "tenant-c:")
    await default.save(RoomState(room=ROOM), 0, [entry(1)], {b"k": b"v"}, [])
    assert await by_url.rooms() == [] and await by_arg.load(ROOM) is None
    assert await by_url.key_package(ROOM, b"k") is None
    assert await by_url.ds_key(b"b" * 32) == b"b" * 32
    assert await default.ds_key(b"a" * 32) == b"a" * 32
    keys = await default.redis.keys("*")
    assert all(k.startswith((b"lkmls:", b"tenant-b:", b"tenant-c:")) for k in keys), keys
    assert not any(k.startswith(b"tenant-c:") and k != b"tenant-c:marker" for k in keys)


async def test_open_store_url_selects_the_database(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    """``open_store`` routes redis:// URLs here, and the URL's db number is used."""
    store = open_store(redis_server.url.removesuffix("/0") + "/3", log_retention=7)
    assert isinstance(store, RedisStore) and store.log_retention == 7
    await store.open()
    try:
        await store.save(RoomState(room=ROOM), 0, [], {}, [])
    finally:
        await store.close()
    db0 = await make_store(redis_server.url)
    db3 = await make_store(redis_server.url.removesuffix("/0") + "/3")
    assert await db0.rooms() == [] and await db3.rooms() == [ROOM]


async def test_more_concurrent_requests_than_connections_wait_their_turn(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    """With a small connection pool, a burst of concurrent saves and reads all succeed
    (they wait for a connection instead of failing with "Too many connections")."""
    store = await make_store(redis_server.url, max_connections=2)

    async def work(i: int) -> int:
        state = RoomState(room=f"room{i}")
        await store.save(state, 0, [entry(1)], {b"k": b"v"}, [])
        await store.mark_ready(f"room{i}", 0, 1, "a")
        return len(await store.read_log(f"room{i}", 0))

    assert await asyncio.gather(*(work(i) for i in range(60))) == [1] * 60
    assert len(await store.rooms()) == 60


def test_log_entries_pack_round_trip() -> None:
    for recipients in (None, (), ("a",), ("a b", "ü", '"q"')):
        for event in (b"", b"\x00\xff" * 100):
            packed = pack_entry(LogEntry(2**40 + 1, event, recipients))
            assert unpack_entry(packed) == LogEntry(2**40 + 1, event, recipients)


# ---- the change feed ---------------------------------------------------------------------


async def test_changes_report_other_processes_writes_only(
    redis_server: RedisServer, make_store: MakeStore, watch: Callable[[RedisStore], Watch]
) -> None:
    """A process's feed first reports every room with its head (what it may have missed
    before subscribing), then each save by another process with the new head — never
    its own saves."""
    a = await make_store(redis_server.url)
    b = await make_store(redis_server.url)
    await a.save(RoomState(room="early"), 0, [entry(1), entry(2)], {}, [])
    changes = watch(b)
    assert await changes.next() == ("early", 2)

    state = RoomState(room=ROOM)
    await a.save(state, 0, [entry(1)], {}, [])
    assert await changes.next() == (ROOM, 1)
    await a.save(state, 1, [], {b"k": b"v"}, [])  # no entries: same head, still reported
    assert await changes.next() == (ROOM, 1)
    await b.save(state, 2, [entry(2)], {}, [])  # b's own write
    await changes.nothing()
    await a.save(state, 3, [entry(3), entry(4)], {}, [])
    assert await changes.next() == (ROOM, 4)


async def test_changes_survive_a_redis_restart(
    make_redis: MakeRedis, make_store: MakeStore, watch: Callable[[RedisStore], Watch]
) -> None:
    """When Redis restarts (kill -9, AOF kept), the feed reconnects by itself and reports
    every room again, so writes it could not hear meanwhile are not missed; then it goes
    on reporting live writes."""
    server = await make_redis(appendonly=True, appendfsync="always")
    a = await make_store(server.url)
    b = await make_store(server.url)
    await a.save(RoomState(room="r1"), 0, [entry(1)], {}, [])
    await a.save(RoomState(room="r2"), 0, [entry(1), entry(2)], {}, [])
    changes = watch(b)
    assert {await changes.next(), await changes.next()} == {("r1", 1), ("r2", 2)}

    await server.akill()
    await asyncio.sleep(0.3)  # the feed notices and keeps trying to reconnect
    await server.astart()
    # while the feed may still be reconnecting: a write it cannot have heard
    state = await a.load("r1")
    assert state is not None
    await a.save(state, 1, [entry(2), entry(3)], {}, [])
    seen: dict[str, int] = {}
    while seen.get("r1") != 3 or "r2" not in seen:
        room, head = await changes.next(timeout=15.0)
        seen[room] = head
    assert seen == {"r1": 3, "r2": 2}
    await a.save(state, 2, [entry(4)], {}, [])
    assert await changes.next() == ("r1", 4)


async def test_a_restart_without_persistence_is_detected(
    redis_server: RedisServer,
    make_store: MakeStore,
    caplog: pytest.LogCaptureFixture,
    watch: Callable[[RedisStore], Watch],
) -> None:
    """Redis without AOF comes back empty: the store says so loudly (rooms are gone)."""
    store = await make_store(redis_server.url)
    await store.save(RoomState(room=ROOM), 0, [entry(1)], {}, [])
    changes = watch(store)
    assert await changes.next() == (ROOM, 1)  # the initial report covers every room
    caplog.set_level(logging.ERROR, logger="delivery_service.store.redis")
    await redis_server.arestart(kill=True)
    for _ in range(300):
        if "lost the delivery service's data" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "lost the delivery service's data" in caplog.text
    assert await store.load(ROOM) is None


# ---- broken connections ------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy to Redis that can cut a connection right after forwarding a command
    (the command runs, its reply never arrives) — the ambiguous failure of a write."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after: bytes | None = None
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        cut = asyncio.Event()

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
                if self.cut_after is not None and self.cut_after in data:
                    self.cut_after = None
                    self.cuts += 1
                    cut.set()
                    return

        async def redis_to_client() -> None:
            while data := await up_reader.read(65536):
                if cut.is_set():
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(client_to_redis()), asyncio.ensure_future(redis_to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if cut.is_set():
                await asyncio.sleep(0.1)  # let Redis run the command before we hang up
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(redis_server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_a_retried_save_that_had_run_is_not_a_conflict(
    redis_server: RedisServer, proxy: CuttingProxy, make_store: MakeStore
) -> None:
    """The connection breaks after the save script ran: the client library retries it,
    and the script recognises its own write (same write id) instead of reporting a
    conflict — and nothing is written twice."""
    store = await make_store(proxy.url)
    state = RoomState(room=ROOM)
    await store.save(state, 0, [entry(1)], {}, [])
    proxy.cut_after = b"EVALSHA"
    state.head = 3
    await store.save(state, 1, [entry(2), entry(3)], {b"k": b"v"}, [])
    assert proxy.cuts == 1
    assert state.version == 2
    direct = await make_store(redis_server.url)
    assert await direct.load(ROOM) == state
    assert [e.seq for e in await direct.read_log(ROOM, 0)] == [1, 2, 3]


async def test_a_save_with_unknown_outcome_is_reported_to_its_own_process(
    redis_server: RedisServer,
    proxy: CuttingProxy,
    make_store: MakeStore,
    watch: Callable[[RedisStore], Watch],
) -> None:
    """Without client retries the broken save raises RedisUnavailable (outcome unknown);
    it did run, so the store reports the room on its *own* change feed — the RoomManager
    then publishes the entries to its local subscribers, which it did not do itself."""
    store = await make_store(proxy.url, retries=0)
    changes = watch(store)
    await changes.nothing()  # subscribed
    state = RoomState(room=ROOM)
    await store.save(state, 0, [entry(1)], {}, [])
    await changes.nothing()  # its own write
    proxy.cut_after = b"EVALSHA"
    with pytest.raises(RedisUnavailable, match="unavailable \\(save\\)"):
        await store.save(state, 1, [entry(2)], {}, [])
    assert state.version == 1
    assert await changes.next() == (ROOM, 2)
    assert (await store.load(ROOM) or RoomState(room="?")).version == 2


async def test_unreachable_redis_is_a_clear_error_without_secrets() -> None:
    """open() on a Redis that is not there fails with RedisUnavailable (a ConnectionError,
    which the CLI prints as an error) naming the address but not the password."""
    probe = RedisServer()
    try:
        probe.start()
        port = probe.port
    finally:
        probe.close()  # the port is free now: nothing listens there
    store = RedisStore(f"redis://:hunter2-secret@127.0.0.1:{port}/2", retries=1)
    with pytest.raises(RedisUnavailable) as caught:
        await store.open()
    await store.close()
    assert isinstance(caught.value, ConnectionError)
    assert f"127.0.0.1:{port}/2" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(store)


def test_missing_redis_server_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_MLS_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisServerError, match="install redis-server"):
        RedisServer().start()
