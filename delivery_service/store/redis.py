"""A store on Redis that several delivery service processes share.

Every DS process of a deployment points at the same Redis (``--store redis://host:6379/0``)
and members of one room may talk to different processes. Redis is the single source of
truth; each process caches records and re-reads them when it learns (``changes()``) that
another process wrote.

URL: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS, ``unix://`` for a
socket), plus ``?prefix=...`` (default ``lkmls:``; several deployments can share a
database) and redis-py's own options, e.g. ``?max_connections=64`` (requests wait for a
free connection beyond that).

Layout (every key starts with the prefix):

* ``rec:<room>`` — hash: ``v`` version, ``s`` record (JSON), ``h`` last log seq, ``w`` id of
  the write that produced this version;
* ``log:<room>`` — sorted set scored by seq; a member is the packed entry (seq, recipients,
  event). ``read_log(after, limit)`` is one ``ZRANGE BYSCORE (after +inf LIMIT 0 limit``
  and ``log_start`` one ``ZRANGE 0 0``, both O(log n + limit);
* ``kp:<room>`` — hash of key packages by ref;
* ``rooms`` — set of every room with a record; ``ds_key`` — the DS signature secret
  (``SET NX``: the first process to start stores its key, all others use it);
* ``rdy:<room>`` (newest generation/epoch acked) and ``rdyset:<gen>:<epoch>:<room>``
  (identities ready for it): soft state with a TTL, shared by all processes;
* channel ``changes`` — ``<process id> <version> <head> <room>`` after every save.

Writes. ``save`` is one Lua script, so it is atomic on the server: it compares the stored
version with the expected one (``VersionConflict`` and nothing written if they differ),
checks that no log seq already exists, then writes the record, appends the entries, trims
the log to ``log_retention``, puts/drops key packages and publishes the change. The
notification is published by the script itself, so a DS process crashing right after a
write cannot swallow it. Each save carries a random write id: if the connection fails
and the client library retries a script that did run, the script recognises its own write
and answers success again instead of a false conflict.

Notifications. Pub/sub messages are not kept: a process that was disconnected (Redis
restart, network) re-subscribes and then reports every room with its current head, so
the RoomManager re-reads whatever changed meanwhile. The same full report follows the
first subscription, which closes the gap between ``RoomManager.start()`` loading the rooms
and the subscription. Writes of this process are not reported back to it (the RoomManager
publishes them itself) unless the outcome of a save is unknown (connection lost
mid-write): then the room is reported once Redis answers again.

Durability — what an operator must configure:

* ``appendonly yes`` is required. With ``appendfsync always`` Redis writes and fsyncs the
  AOF before it replies, so a save (and the commit it accepts) is on disk before the DS
  acknowledges it: nothing acknowledged is lost on a crash of redis-server, of the machine
  or on power loss. This is the guarantee the SQLite store gives, at the cost of one fsync
  per write (batched across concurrent clients).
* With ``appendfsync everysec`` (Redis' default) a crash of redis-server alone normally
  loses nothing (the AOF is written to the kernel before the reply), but an OS crash or
  power loss loses up to ~1 s (worst case ~2 s, or a Redis crash while a slow fsync holds
  the write back) of acknowledged writes. Rooms then roll back: a commit members already
  applied is gone and the DS can accept a different commit for that epoch; members whose
  cursor is past the rolled-back log skip the rewritten entries and recover only by
  joining again (when a later entry fails to process).
* Without persistence (no AOF; RDB snapshots alone are as bad, they roll back to the last
  snapshot) a Redis restart loses every room, log, key package and the DS key: rooms start
  again from scratch at seq 1 and every member must join again (their cursors are ahead
  of the new logs); processes started after the loss would even generate a new DS key
  (use ``--ds-key-file`` with Redis to avoid that). The store detects a restart without
  its data (a marker key vanished) and logs an error.
* Replication (Sentinel) is asynchronous: a failover may lose the last acknowledged
  writes, like ``everysec``. Redis Cluster is not supported (a save touches several keys).
* ``maxmemory-policy noeviction``: an evicted record or log would corrupt rooms.
* Redis 6.2 or newer (``ZRANGE ... BYSCORE``). Connection errors are retried for ~2.5 s
  (a restart that reloads its AOF goes unnoticed by clients); after that a request fails
  with :class:`RedisUnavailable` and the RoomManager reloads the room on the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import struct
import urllib.parse
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from delivery_service.errors import VersionConflict
from delivery_service.model import LogEntry, RoomState
from delivery_service.store.base import DEFAULT_LOG_RETENTION, Store

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "lkmls:"
DEFAULT_READY_TTL = 300  # seconds; acks matter only while a transition is open
_TRANSIENT = (RedisConnectionError, RedisTimeoutError)
_HEADS_BATCH = 1000
_PING_EVERY = 5.0  # seconds without a notification before the subscription is checked

# KEYS: record, log, key packages, rooms
# ARGV: expected version, new version, record, write id, room, retention, channel,
#       process id, entry count n, n x (seq, member), put count m, m x (ref, data), drops
_SAVE = """
local current = redis.call('HMGET', KEYS[1], 'v', 'w', 'h')
local stored = tonumber(current[1]) or 0
if stored ~= tonumber(ARGV[1]) then
  if stored == tonumber(ARGV[2]) and current[2] == ARGV[4] then
    return {1, stored}  -- our own write, run before a connection failure: success again
  end
  return {0, stored}  -- another writer won: nothing written
end
local n = tonumber(ARGV[9])
local first = 10
-- validate before the first write: a script error does not roll back earlier writes
local seen = {}
for i = first, first + 2 * n - 2, 2 do
  local seq = ARGV[i]
  if seen[seq] or redis.call('ZCOUNT', KEYS[2], seq, seq) > 0 then
    return redis.error_reply('log seq ' .. seq .. ' already exists')
  end
  seen[seq] = true
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 's', ARGV[3], 'w', ARGV[4])
if stored == 0 then
  redis.call('SADD', KEYS[4], ARGV[5])
end
local head = current[3] or '0'
for i = first, first + 2 * n - 2, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
  head = ARGV[i]
end
if n > 0 then
  redis.call('HSET', KEYS[1], 'h', head)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(head) - tonumber(ARGV[6]))
end
local at = first + 2 * n
local m = tonumber(ARGV[at])
for i = at + 1, at + 2 * m - 1, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
for i = at + 2 * m + 1, #ARGV do
  redis.call('HDEL', KEYS[3], ARGV[i])
end
redis.call('PUBLISH', ARGV[7], ARGV[8] .. ' ' .. ARGV[2] .. ' ' .. head .. ' ' .. ARGV[5])
return {1, tonumber(ARGV[2])}
"""

# KEYS: newest (generation, epoch) of the room, identities ready for (generation, epoch)
# ARGV: generation, epoch, identity, ttl seconds
_MARK_READY = """
local newest = redis.call('GET', KEYS[1])
local gen, epoch = tonumber(ARGV[1]), tonumber(ARGV[2])
if newest then
  local g, e = string.match(newest, '^(%d+) (%d+)$')
  g, e = tonumber(g), tonumber(e)
  if g > gen or (g == gen and e > epoch) then
    return {}
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'EX', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return redis.call('SMEMBERS', KEYS[2])
"""

_NO_RECIPIENTS = 0xFFFFFFFF
_ENTRY_HEADER = struct.Struct(">QI")  # seq, recipients length (or _NO_RECIPIENTS)


def _bytes(value: bytes | str) -> bytes:
    # redis-py types replies as bytes | str; this client never decodes (binary records)
    return value if isinstance(value, bytes) else value.encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisUnavailable(ConnectionError):
    """Redis could not be reached (after the configured retries). A ``ConnectionError``,
    so the CLI reports it as a plain error at startup."""


def pack_entry(entry: LogEntry) -> bytes:
    """A log entry as a sorted-set member: the seq first keeps members unique."""
    if entry.recipients is None:
        return _ENTRY_HEADER.pack(entry.seq, _NO_RECIPIENTS) + entry.event
    recipients = json.dumps(list(entry.recipients), separators=(",", ":")).encode()
    return _ENTRY_HEADER.pack(entry.seq, len(recipients)) + recipients + entry.event


def unpack_entry(data: bytes) -> LogEntry:
    seq, size = _ENTRY_HEADER.unpack_from(data)
    at = _ENTRY_HEADER.size
    if size == _NO_RECIPIENTS:
        return LogEntry(seq, data[at:], None)
    recipients = tuple(json.loads(data[at : at + size]))
    return LogEntry(seq, data[at + size :], recipients)


def _split_url(url: str) -> tuple[str, str | None, str]:
    """(URL for redis-py, ``prefix`` query value, address safe to log: no credentials)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), None)
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "prefix"])
    clean = urllib.parse.urlunsplit(parts._replace(query=rest))
    if parts.scheme == "unix":
        where = parts.path
    else:
        host = parts.hostname or "localhost"
        where = f"{host}:{parts.port or 6379}{parts.path or '/0'}"
    return clean, prefix, f"{parts.scheme}://{where}"


class _Feed:
    """Pending (room, head) notifications of one ``changes()`` iterator, coalesced per
    room (only the newest head matters: the RoomManager reads the log from what it
    published last)."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.ready = asyncio.Event()

    def put(self, room: str, head: int) -> None:
        self.pending[room] = max(head, self.pending.get(room, head))
        self.ready.set()

    async def get(self) -> tuple[str, int]:
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        room = next(iter(self.pending))
        return room, self.pending.pop(room)


class RedisStore(Store):
    """Rooms on one Redis primary (standalone or Sentinel); see the module docstring."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        log_retention: int = DEFAULT_LOG_RETENTION,
        prefix: str | None = None,
        ready_ttl: int = DEFAULT_READY_TTL,
        retries: int = 6,
        socket_timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__(log_retention)
        self._url, url_prefix, self.address = _split_url(url)
        self.prefix = prefix if prefix is not None else (url_prefix or DEFAULT_PREFIX)
        self.ready_ttl = ready_ttl
        self.retries = retries
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        # tells this process's writes apart from other processes' in the change feed
        self.process_id = secrets.token_hex(8)
        self._redis: aioredis.Redis | None = None
        self._sub_redis: aioredis.Redis | None = None
        self._shas: dict[str, str] = {}
        self._feeds: set[_Feed] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._marker = b""
        p = self.prefix.encode()
        self._rooms_key = p + b"rooms"
        self._ds_key = p + b"ds_key"
        self._marker_key = p + b"marker"
        self.channel = p + b"changes"

    def __repr__(self) -> str:
        return f"<RedisStore {self.address} prefix={self.prefix!r}>"

    # ---- keys ----------------------------------------------------------------------
    # Every tag ends with ":" and none is a prefix of another, so keys never collide,
    # whatever the room name contains.

    def _key(self, tag: str, room: str) -> bytes:
        return f"{self.prefix}{tag}:{room}".encode()

    # ---- connection ----------------------------------------------------------------

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisStore is not open")
        return self._redis

    @contextlib.contextmanager
    def _surface(self, what: str) -> Iterator[None]:
        """Turns the client library's connection errors into one clear error."""
        try:
            yield
        except _TRANSIENT as e:
            raise RedisUnavailable(f"Redis at {self.address} unavailable ({what}): {e}") from e

    async def open(self) -> None:
        # A blocking pool: under load requests wait for a connection instead of failing
        # with "Too many connections" (what redis-py's default pool does at its limit).
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=self.max_connections,
            timeout=self.socket_timeout,
            decode_responses=False,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            health_check_interval=30,
            # covers a Redis restart (AOF load included) without failing requests; safe
            # for saves thanks to their write id
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), self.retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._redis = aioredis.Redis.from_pool(pool)
        # Subscriptions get a client that never retries by itself: redis-py would
        # re-subscribe silently, and we must know about every gap to report all rooms.
        self._sub_redis = aioredis.Redis.from_url(
            self._url,
            decode_responses=False,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        with self._surface("connect"):
            await self.redis.ping()
            await self._check_marker(first=True)
        await self._warn_without_persistence()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self._sub_redis, self._redis):
            if client is not None:
                await client.aclose()
        self._redis = self._sub_redis = None

    async def _warn_without_persistence(self) -> None:
        try:
            raw = await self.redis.config_get("append*")
        except RedisError:
            return  # CONFIG may be disabled on managed Redis
        config = {_text(k): _text(v) for k, v in raw.items() if k is not None and v is not None}
        if config.get("appendonly") != "yes":
            log.warning(
                "Redis at %s runs without appendonly: a Redis restart loses every room "
                "(see delivery_service/store/redis.py for the required configuration)",
                self.address,
            )
        elif config.get("appendfsync") != "always":
            log.info(
                "Redis at %s uses appendfsync %s: an OS crash may lose the last second "
                "of accepted commits",
                self.address,
                config.get("appendfsync", "?"),
            )

    async def _check_marker(self, *, first: bool) -> None:
        """Detects a Redis that came back without our data (no persistence, flushed)."""
        token = secrets.token_hex(8).encode()
        created = await self.redis.set(self._marker_key, token, nx=True)
        raw = await self.redis.get(self._marker_key)
        current = None if raw is None else _bytes(raw)
        if first:
            self._marker = current or token
            return
        if created or current != self._marker:
            log.error(
                "Redis at %s lost the delivery service's data (restarted without "
                "persistence, or flushed): rooms start again and members must join again",
                self.address,
            )
            self._marker = current or token

    async def _script(self, source: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script first when Redis does not know it (restart)."""
        sha = self._shas.get(source)
        if sha is not None:
            try:
                return await self.redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                pass
        self._shas[source] = sha = _text(await self.redis.script_load(source))
        return await self.redis.evalsha(sha, len(keys), *keys, *args)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- the Store interface -------------------------------------------------------

    async def ds_key(self, new_secret: bytes) -> bytes:
        with self._surface("ds_key"):
            await self.redis.set(self._ds_key, new_secret, nx=True)
            stored = await self.redis.get(self._ds_key)
        if stored is None:
            raise RedisUnavailable(f"Redis at {self.address} dropped the DS key just stored")
        return _bytes(stored)

    async def load(self, room: str) -> RoomState | None:
        with self._surface("load"):
            version, record = await self.redis.hmget(self._key("rec", room), [b"v", b"s"])
        if version is None or record is None:
            return None
        state = RoomState.from_json(_bytes(record))
        state.version = int(version)
        return state

    async def rooms(self) -> list[str]:
        with self._surface("rooms"):
            members = await self.redis.smembers(self._rooms_key)
        return sorted(_text(m) for m in members)

    async def save(
        self,
        state: RoomState,
        expected_version: int,
        entries: Sequence[LogEntry],
        put_key_packages: Mapping[bytes, bytes],
        drop_key_packages: Iterable[bytes],
    ) -> None:
        room = state.room
        new_version = expected_version + 1
        state.version = new_version
        args: list[Any] = [
            expected_version,
            new_version,
            state.to_json(),
            secrets.token_hex(8),
            room,
            self.log_retention,
            self.channel,
            self.process_id,
            len(entries),
        ]
        for entry in entries:
            args += [entry.seq, pack_entry(entry)]
        args.append(len(put_key_packages))
        for ref, data in put_key_packages.items():
            args += [ref, data]
        args += list(drop_key_packages)
        keys = [self._key("rec", room), self._key("log", room), self._key("kp", room)]
        try:
            with self._surface("save"):
                ok, stored = await self._script(_SAVE, [*keys, self._rooms_key], args)
        except RedisUnavailable:
            state.version = expected_version
            # the script may have run: if so, our own subscribers must still see it
            self._spawn(self._report_when_back(room))
            raise
        except BaseException:
            state.version = expected_version
            raise
        if not ok:
            state.version = expected_version
            raise VersionConflict(f"room {room!r} is at version {stored}")

    async def read_log(self, room: str, after: int, limit: int = 500) -> list[LogEntry]:
        if limit <= 0:
            return []
        with self._surface("read_log"):
            members = await self.redis.zrange(
                self._key("log", room), f"({after}", "+inf", byscore=True, offset=0, num=limit
            )
        return [unpack_entry(m) for m in members if isinstance(m, bytes)]

    async def log_start(self, room: str) -> int:
        with self._surface("log_start"):
            first = await self.redis.zrange(self._key("log", room), 0, 0, withscores=True)
        return int(first[0][1]) if first else 1

    async def key_package(self, room: str, ref: bytes) -> bytes | None:
        with self._surface("key_package"):
            data = await self.redis.hget(self._key("kp", room), ref)
        return None if data is None else _bytes(data)

    async def mark_ready(self, room: str, generation: int, epoch: int, identity: str) -> set[str]:
        keys = [self._key("rdy", room), self._key(f"rdyset:{generation}:{epoch}", room)]
        # the set key above is "<prefix>rdyset:<gen>:<epoch>:<room>": numbers first
        with self._surface("mark_ready"):
            members = await self._script(
                _MARK_READY, keys, [generation, epoch, identity, self.ready_ttl]
            )
        return {m.decode() for m in members}

    async def ready_acks(self, room: str, generation: int, epoch: int) -> set[str]:
        with self._surface("ready_acks"):
            members = await self.redis.smembers(self._key(f"rdyset:{generation}:{epoch}", room))
        return {_text(m) for m in members}

    # ---- presence (soft state: each process's open streams) ------------------------
    # One hash per room: field = this process's id (16 hex characters) + identity,
    # value = "<milliseconds> <1 open | 0 closed>".

    async def publish_presence(
        self, report: Mapping[str, Mapping[str, tuple[float, bool]]], *, ttl: float
    ) -> None:
        with self._surface("publish_presence"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for room, seen in report.items():
                    key = self._key("prs", room)
                    pipe.hset(
                        key,
                        mapping={
                            f"{self.process_id}{identity}".encode(): f"{int(at * 1000)} {int(o)}"
                            for identity, (at, o) in seen.items()
                        },
                    )
                    pipe.expire(key, math.ceil(ttl))
                await pipe.execute()

    async def read_presence(self, room: str) -> list[tuple[str, float, bool]]:
        with self._surface("read_presence"):
            fields = await self.redis.hgetall(self._key("prs", room))
        rows = []
        mine = self.process_id.encode()
        for field, value in fields.items():
            field = _bytes(field)
            if field.startswith(mine):
                continue  # this process knows its own streams better
            at, _, is_open = _text(value).partition(" ")
            rows.append((field[len(mine) :].decode(), int(at) / 1000, is_open == "1"))
        return rows

    # ---- changes by other processes ------------------------------------------------

    def changes(self) -> AsyncIterator[tuple[str, int]]:
        return self._changes()

    async def _changes(self) -> AsyncIterator[tuple[str, int]]:
        feed = _Feed()
        self._feeds.add(feed)
        reader = self._spawn(self._subscribe(feed))
        try:
            while True:
                yield await feed.get()
        finally:
            self._feeds.discard(feed)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _subscribe(self, feed: _Feed) -> None:
        """Fills ``feed`` from the change channel; reconnects for as long as it runs."""
        first = True
        interrupted = False
        backoff = 0.05
        while True:
            if self._sub_redis is None:
                raise RuntimeError("RedisStore is not open")
            pubsub = self._sub_redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                if not first:
                    await self._check_marker(first=False)
                    log.info("change feed of %s re-subscribed", self.address)
                # anything published before (or while) we were not subscribed
                for room, head in await self._heads():
                    feed.put(room, head)
                first = interrupted = False
                backoff = 0.05
                await self._listen(pubsub, feed)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # a dead feed would silently stop every cross-process update: never give up
                if isinstance(e, (*_TRANSIENT, OSError)):
                    if not interrupted:
                        log.warning(
                            "change feed of %s interrupted (%s); reconnecting", self.address, e
                        )
                else:
                    log.exception("change feed of %s failed; restarting it", self.address)
                interrupted = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self, pubsub: PubSub, feed: _Feed) -> None:
        idle = 0.0
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                idle += 1.0
                if idle >= _PING_EVERY:
                    await pubsub.ping()  # a dead connection raises here
                    idle = 0.0
                continue
            idle = 0.0
            if message.get("type") != "message":
                continue
            try:
                process, _version, head, room = bytes(message["data"]).split(b" ", 3)
            except ValueError:
                log.warning("ignoring a malformed change notification")
                continue
            if process.decode() != self.process_id:
                feed.put(room.decode(), int(head))

    async def _heads(self) -> list[tuple[str, int]]:
        """Every room with the seq of its last log entry."""
        rooms = await self.redis.smembers(self._rooms_key)
        names = sorted(_text(r) for r in rooms)
        heads: list[tuple[str, int]] = []
        for i in range(0, len(names), _HEADS_BATCH):
            batch = names[i : i + _HEADS_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in batch:
                    pipe.hget(self._key("rec", name), b"h")
                values = await pipe.execute()
            heads += [(name, int(v or 0)) for name, v in zip(batch, values, strict=True)]
        return heads

    async def _report_when_back(self, room: str) -> None:
        """After a save whose outcome is unknown: reports the room to this process's own
        change feeds once Redis answers, so a write that did happen reaches the local
        subscribers too."""
        delay = 0.1
        while True:
            try:
                head = await self.redis.hget(self._key("rec", room), b"h")
            except (*_TRANSIENT, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for feed in self._feeds:
                feed.put(room, int(head or 0))
            return
