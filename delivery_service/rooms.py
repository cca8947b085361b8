"""Runs the ordering rules for many rooms: locks, caching, persistence, deadlines, fan-out.

Every request on a room runs under that room's lock as one transaction: load (or reuse
the cached) record and observer, apply :class:`CommitOrdering`, write the result with one
compare-and-set ``Store.save``, publish the new log entries, and re-arm the room's next
deadline. Nothing is acknowledged before the write returns. If the write loses a race
(another DS process on a shared store) the transaction is retried on fresh state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from delivery_service.errors import (
    Contention,
    DeliveryError,
    NotFound,
    OutOfRange,
    VersionConflict,
)
from delivery_service.fanout import Hub, Removed, Replaced, TokenExpired
from delivery_service.metrics import Metrics
from delivery_service.model import LogEntry, Phase, RoomState
from delivery_service.ordering import CommitOrdering, RoomTx
from delivery_service.presence import StreamPresence
from delivery_service.store import Store
from mls_provider import mls
from mls_provider.proto import delivery_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_ATTEMPTS = 8


@dataclass
class CachedRoom:
    state: RoomState
    observed: mls.ObservedGroup | None


@dataclass
class _RoomLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders and waiters; the entry is dropped when nobody uses it


class _Load:
    """One read of a room's record from the store, in progress."""

    stale = False


def _log_orphaned_failure(room: str, task: asyncio.Future[Any]) -> None:
    """Retrieves (and logs once, with context) the failure of a transaction whose caller
    gave up waiting for it (e.g. a client's deadline while the store was unreachable)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, DeliveryError):
        log.warning(
            "room %r: a transaction failed after its caller had gone: %s: %s",
            room,
            type(error).__name__,
            error,
        )


def is_idle(state: RoomState) -> bool:
    """No group and nobody waiting for one: nothing of the room needs to stay in memory."""
    return state.phase is Phase.EMPTY and not state.participants


class RoomManager:
    def __init__(
        self,
        store: Store,
        ordering: CommitOrdering,
        hub: Hub,
        metrics: Metrics,
        *,
        presence: StreamPresence | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ordering = ordering
        self.hub = hub
        self.metrics = metrics
        # None: presence is not tracked (unit tests driving the manager without streams)
        self.presence = presence
        self.clock = clock
        self.tick_retry = 1.0  # seconds before a failed deadline tick is tried again
        self._stopped = False
        # Per-room memory is held only for rooms in use (a DS sees an endless stream of
        # room names over its life): idle rooms are not cached, locks go with their last
        # user, and load bookkeeping exists only while a load runs.
        self._rooms: dict[str, CachedRoom] = {}
        self._locks: dict[str, _RoomLock] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._published: dict[str, int] = {}  # seq of the last entry handed to the hub
        self._loads: dict[str, set[_Load]] = {}  # reads from the store in progress
        self._tasks: set[asyncio.Future[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Re-arms the deadlines of every stored room and follows other processes."""
        if self.presence is not None:
            self.presence.start()  # members of stored rooms get a full timeout to return
            if self.store.shared:
                self._heartbeat = asyncio.create_task(self._share_presence())
        for room in await self.store.rooms():
            cached = await self._load(room)
            if not is_idle(cached.state):
                self._published[room] = cached.state.head
                self._schedule(room, cached.state)
        changes = self.store.changes()
        if changes is not None:
            self._watcher = asyncio.create_task(self._follow(changes))

    async def stop(self) -> None:
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for background in (self._watcher, self._heartbeat):
            if background is not None:
                background.cancel()
        if self._tasks:  # let running transactions finish their write and publish
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- transactions --------------------------------------------------------------

    async def _load(self, room: str) -> CachedRoom:
        cached = self._rooms.get(room)
        if cached is not None:
            return cached
        load = _Load()  # marked stale if the room is dropped from the cache meanwhile
        loads = self._loads.setdefault(room, set())
        loads.add(load)
        try:
            state = await self.store.load(room) or RoomState(room=room)
            observed = None
            if state.phase is Phase.ACTIVE:
                observed = await asyncio.to_thread(self._restore_observer, state)
        finally:
            loads.discard(load)
            if not loads:
                del self._loads[room]
        cached = CachedRoom(state, observed)
        current = self._rooms.get(room)
        if current is not None and current.state.version >= state.version:
            return current  # loaded meanwhile by another request, and at least as new
        if not load.stale and not is_idle(state):
            self._rooms[room] = cached
            self.metrics.rooms_cached.set(len(self._rooms))
        return cached

    def _restore_observer(self, state: RoomState) -> mls.ObservedGroup:
        try:
            return self.ordering.observer.load(state.observer_snapshot)
        except mls.MlsError:
            # a damaged snapshot: follow the group again from its latest GroupInfo
            log.warning("observer snapshot of room %r unusable, re-observing", state.room)
            return self.ordering.observer.observe(state.group_info)

    @contextlib.asynccontextmanager
    async def _locked(self, room: str) -> AsyncIterator[None]:
        """Holds the room's lock; the lock object lives only while someone uses it."""
        entry = self._locks.get(room)
        if entry is None:
            entry = self._locks[room] = _RoomLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[room]

    async def transact(
        self,
        room: str,
        operation: Callable[[RoomTx], Awaitable[T]],
        *,
        ready: set[str] | None = None,
    ) -> T:
        """Runs ``operation`` on the room's state and persists what it did. ``ready``: the
        open transition's ready acks, for operations that may execute it.

        Shielded from the caller: a client that gives up (deadline, disconnect) must not
        interrupt a transaction whose write may already be committed — its entries still
        have to be published and its deadlines armed.
        """
        task = asyncio.ensure_future(self._transact(room, operation, ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the caller is gone: nobody will see how the transaction ends but this log
            task.add_done_callback(lambda t: _log_orphaned_failure(room, t))
            raise

    async def _transact(
        self, room: str, operation: Callable[[RoomTx], Awaitable[T]], ready: set[str] | None
    ) -> T:
        async with self._locked(room):
            for attempt in range(MAX_ATTEMPTS):
                cached = await self._load(room)
                expected = cached.state.version
                view = None if self.presence is None else self.presence.view(room)
                tx = RoomTx(
                    cached.state,
                    cached.observed,
                    self.clock(),
                    lambda ref: self.store.key_package(room, ref),
                    connected=None if view is None else view.connected,
                    absent=frozenset() if view is None else view.absent(cached.state.participants),
                    ready=ready,
                )
                try:
                    result = await operation(tx)
                    if tx.observed_changed:
                        cached.state.observer_snapshot = (
                            b""
                            if tx.observed is None
                            else await asyncio.to_thread(tx.observed.snapshot)
                        )
                    if tx.state_changed or tx.observed_changed or tx.put_key_packages:
                        await self.store.save(
                            tx.state,
                            expected,
                            tx.entries,
                            tx.put_key_packages,
                            tx.drop_key_packages,
                        )
                except VersionConflict:
                    # another process wrote first: retry on fresh state, after a short
                    # random pause so that competing processes do not collide again
                    self._forget(room)
                    await asyncio.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))
                    continue
                except DeliveryError:
                    # the ordering rules raise only before changing anything
                    raise
                except BaseException:
                    self._forget(room)  # state may be half-changed: reload next time
                    raise
                cached.observed = tx.observed
                self._after_write(room, tx)
                return result
            raise Contention("too much write contention on this room; retry")

    def _forget(self, room: str) -> None:
        self._rooms.pop(room, None)
        for load in self._loads.get(room, ()):
            load.stale = True
        self.metrics.rooms_cached.set(len(self._rooms))

    def _after_write(self, room: str, tx: RoomTx) -> None:
        self.hub.publish(room, tx.entries)
        if tx.state_changed:
            self._enforce_streams(room, tx.state)
        if is_idle(tx.state):
            self._rooms.pop(room, None)
            self._published.pop(room, None)
            if self.presence is not None:
                self.presence.forget(room)
            self.metrics.rooms_cached.set(len(self._rooms))
        elif tx.entries:
            self._published[room] = tx.entries[-1].seq
        for kind, proposal_kind in tx.emitted:  # no need to decode what was just encoded
            if kind == "commit":
                self.metrics.commits_accepted.inc()
            elif kind == "proposal":
                self.metrics.proposals_issued.labels(proposal_kind).inc()
        self._schedule(room, tx.state)

    def _enforce_streams(self, room: str, state: RoomState) -> None:
        """Ends the streams that may no longer follow the room: of identities neither
        joined nor in the group (after what was already queued for them, e.g. the commit
        that removed them), and of client instances a newer one of the same identity
        replaced (the newest connection of an identity wins, as in LiveKit)."""
        for sub in self.hub.subscriptions(room):
            participant = state.participants.get(sub.identity)
            if participant is None and sub.identity not in state.members:
                sub.end(Removed(f"{sub.identity!r} is no longer in the room's group; join again"))
            elif (
                participant is not None
                and sub.key_package_ref
                and sub.key_package_ref != participant.kp_ref
            ):
                sub.fail(
                    Replaced(
                        f"a newer connection of {sub.identity!r} joined the room; this one "
                        "was replaced"
                    )
                )

    # ---- deadlines -----------------------------------------------------------------

    def _schedule(self, room: str, state: RoomState) -> None:
        timer = self._timers.pop(room, None)
        if timer is not None:
            timer.cancel()
        deadlines = [self.ordering.next_deadline(state, self.clock())]
        if self.presence is not None and state.participants:
            # when a participant without a stream counts as gone
            deadlines.append(self.presence.view(room).next_expiry(state.participants))
        deadline = min((d for d in deadlines if d is not None), default=None)
        if deadline is None:
            return
        delay = max(0.0, deadline - self.clock())
        self._timers[room] = asyncio.get_running_loop().call_later(delay, self._spawn_tick, room)

    def _spawn_tick(self, room: str) -> None:
        task = asyncio.ensure_future(self._tick(room))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick(self, room: str) -> None:
        timer = self._timers.pop(room, None)
        if timer is not None:
            timer.cancel()  # run now instead (a stream closed)

        async def tick(tx: RoomTx) -> tuple[bool, list[str]]:
            was_open = tx.state.transition_open
            vanished = await self.ordering.tick(tx)
            return was_open and not tx.state.transition_open, vanished

        try:
            ready = None
            if self.presence is not None:
                await self.presence.fresh_view(room)  # other processes' streams, if shared
                state = (await self._load(room)).state
                if state.transition_open:
                    ready = await self.store.ready_acks(room, state.generation, state.epoch)
            executed, vanished = await self.transact(room, tick, ready=ready)
            if executed:  # counted once, for the attempt that stuck
                self.metrics.transitions.labels("deadline").inc()
            for identity in vanished:
                self.metrics.presence_removals.inc()
                log.info(
                    "vanished room=%s identity=%s (no event stream for %.1f s, or its "
                    "credential expired)",
                    room,
                    identity,
                    self.presence.timeout if self.presence is not None else 0.0,
                )
        except Exception:
            log.exception("deadline handling failed for room %r", room)
            if not self._stopped:
                # the failed transaction dropped the room from the cache: try again rather
                # than leave its deadlines waiting for the next client request
                loop = asyncio.get_running_loop()
                self._timers[room] = loop.call_later(self.tick_retry, self._spawn_tick, room)

    # ---- requests ------------------------------------------------------------------

    async def join(self, room: str, identity: str, key_package: bytes) -> pb.JoinResponse:
        return await self.transact(room, lambda tx: self.ordering.join(tx, identity, key_package))

    async def create_group(
        self, room: str, identity: str, generation: int, group_info: bytes
    ) -> pb.CreateGroupResponse:
        seq = await self.transact(
            room, lambda tx: self.ordering.create_group(tx, identity, generation, group_info)
        )
        return pb.CreateGroupResponse(seq=seq)

    async def submit_commit(
        self, room: str, identity: str, request: pb.SubmitCommitRequest
    ) -> pb.SubmitCommitResponse:
        return await self.transact(
            room,
            lambda tx: self.ordering.submit_commit(
                tx, identity, request.epoch, request.commit, request.welcome, request.group_info
            ),
        )

    async def ready(self, room: str, identity: str, epoch: int) -> None:
        cached = await self._load(room)
        state = cached.state
        if identity not in state.participants and identity not in state.members:
            raise NotFound(f"{identity!r} has not joined room {room!r}")
        if not CommitOrdering.ready_counts(state, identity, epoch):
            return
        ready = await self.store.mark_ready(room, state.generation, epoch, identity)
        connected = None if self.presence is None else self.presence.view(room).connected
        if CommitOrdering.all_ready(state.members, ready, connected):

            async def execute(tx: RoomTx) -> bool:
                was_open = tx.state.transition_open
                await self.ordering.execute_if_ready(tx, epoch)
                return was_open and not tx.state.transition_open

            if await self.transact(room, execute, ready=ready):
                self.metrics.transitions.labels("all_ready").inc()

    async def report_failure(self, room: str, identity: str, seq: int, reason: str) -> str:
        """A member could not process the event at ``seq``; returns what the DS concluded
        (``CommitOrdering.report_failure``)."""
        state = (await self._load(room)).state
        if identity not in state.participants and identity not in state.members:
            raise NotFound(f"{identity!r} has not joined room {room!r}")
        ready = None
        if state.transition_open:
            ready = await self.store.ready_acks(room, state.generation, state.epoch)
        return await self.transact(
            room,
            lambda tx: self.ordering.report_failure(tx, identity, seq, reason),
            ready=ready,
        )

    async def leave(self, room: str, identity: str, *, left_at: float | None = None) -> bool:
        return await self.transact(
            room, lambda tx: self.ordering.leave(tx, identity, left_at=left_at)
        )

    async def is_participant(self, room: str, identity: str) -> bool:
        state = (await self._load(room)).state
        return identity in state.participants or identity in state.members

    async def room_state(self, room: str) -> RoomState:
        """The room's current record (read-only use)."""
        return (await self._load(room)).state

    # ---- streams -------------------------------------------------------------------

    async def stream(
        self,
        room: str,
        identity: str,
        after: int,
        on_fail: Callable[[BaseException], None] | None = None,
        *,
        key_package_ref: bytes = b"",
        expires_at: float | None = None,
    ) -> AsyncIterator[LogEntry]:
        """The entries after ``after`` that ``identity`` may see, then live ones.

        Ends with :class:`~delivery_service.fanout.SlowSubscriber` if the reader falls
        behind (``on_fail`` is called at once in that case: the reader may be stuck
        writing to a client that stopped reading); with ``Replaced`` when a newer instance
        of the identity joined (``key_package_ref`` names this instance's key package);
        with ``Removed`` once the identity is out of the group; with ``TokenExpired`` at
        ``expires_at`` (wall-clock time the caller's token expires).
        """
        state = (await self._load(room)).state
        participant = state.participants.get(identity)
        if participant is None and identity not in state.members:
            raise NotFound(f"{identity!r} has not joined room {room!r}; call Join first")
        if participant is not None and key_package_ref and key_package_ref != participant.kp_ref:
            raise Replaced(
                f"a newer connection of {identity!r} joined the room; this one was replaced"
            )
        sub = self.hub.register(room, identity, key_package_ref)
        sub.on_fail = on_fail
        expiry = None
        if expires_at is not None:
            loop = asyncio.get_running_loop()
            expiry = loop.call_at(
                loop.time() + max(0.0, expires_at - time.time()),
                sub.fail,
                TokenExpired("the access token expired; subscribe again with a fresh one"),
            )
        self.metrics.subscribers.set(self.hub.subscriber_count)
        if self.presence is not None:
            self.presence.opened(room, identity)
        try:
            start = await self.store.log_start(room)
            head = (await self._load(room)).state.head
            if after > head and self.store.shared:  # our cache may lag another process
                self._forget(room)
                head = (await self._load(room)).state.head
            if after > head:
                raise OutOfRange(
                    f"cursor {after} is ahead of the room's log (at {head}): the store lost "
                    "data; join again"
                )
            if after + 1 < start:
                raise OutOfRange(
                    f"cursor {after} is older than the retained log (starts at {start}); join again"
                )
            last = after
            while True:  # the backlog, in pages
                page = await self.store.read_log(room, last)
                for entry in page:
                    last = entry.seq
                    if entry.visible_to(identity):
                        yield entry
                if len(page) < 500:
                    break
            while True:  # live entries (registered before the backlog: no gap)
                entry = await sub.get()
                if entry.seq <= last:
                    continue
                if entry.seq > last + 1:  # published while we paged: fetch the gap
                    for missed in await self.store.read_log(room, last, entry.seq - last - 1):
                        last = missed.seq
                        if missed.visible_to(identity):
                            yield missed
                last = entry.seq
                if entry.visible_to(identity):
                    yield entry
        finally:
            if expiry is not None:
                expiry.cancel()
            self.hub.unregister(sub)
            self.metrics.subscribers.set(self.hub.subscriber_count)
            if self.presence is not None:
                self.presence.closed(room, identity)
                if not self._stopped:
                    # a transition may now wait for nobody; arm the member's removal
                    self._spawn_tick(room)

    async def _share_presence(self) -> None:
        """Shared stores: reports our streams to the other processes, and acts on what
        they report (a member whose stream was on a process that died must be noticed
        by the survivors)."""
        presence = self.presence
        assert presence is not None
        while True:
            await asyncio.sleep(presence.heartbeat)
            try:
                await presence.publish()
                for room in list(self._published):
                    await presence.fresh_view(room)
                    cached = self._rooms.get(room)
                    if cached is not None:
                        self._schedule(room, cached.state)
                    elif room not in self._timers:
                        self._spawn_tick(room)  # not cached here: load it and look
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sharing presence failed; trying again")

    async def _follow(self, changes: AsyncIterator[tuple[str, int]]) -> None:
        """Publishes entries other DS processes wrote (shared stores only)."""
        async for room, head in changes:
            try:
                # another process wrote, possibly without new log entries: our record is stale
                self._forget(room)
                if head <= self._published.get(room, 0):
                    continue
                async with self._locked(room):
                    after = self._published.get(room, head - 1)
                    entries = await self.store.read_log(room, after)
                    self.hub.publish(room, entries)
                    log.debug(
                        "room %r: published %d entries written elsewhere (after %d, head %d)",
                        room,
                        len(entries),
                        after,
                        head,
                    )
                    cached = await self._load(room)
                    self._enforce_streams(room, cached.state)
                    if is_idle(cached.state):
                        self._published.pop(room, None)
                    elif entries:
                        self._published[room] = entries[-1].seq
                    self._schedule(room, cached.state)
            except Exception:
                log.exception("following changes of room %r failed", room)
