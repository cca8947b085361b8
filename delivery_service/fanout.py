"""In-process fan-out of new log entries to the room's open streams.

Publishing never waits: each subscription has a bounded queue, and a subscriber whose
queue is full is cut off (it resumes later from its cursor) so one slow reader never
delays a room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from delivery_service.model import LogEntry

DEFAULT_QUEUE_SIZE = 1024


class SlowSubscriber(Exception):
    """The subscriber's queue overflowed: close its stream; it resumes from its cursor."""


class StreamClosed(Exception):
    """The server is shutting down: close the stream; the client resumes elsewhere."""


class Replaced(Exception):
    """A newer instance of the identity joined (another device): the newest wins."""


class Removed(Exception):
    """The identity is no longer in the room's group: it must join again to follow it."""


class TokenExpired(Exception):
    """The stream's access token expired: subscribe again with a fresh one."""


class Subscription:
    def __init__(
        self, room: str, identity: str, maxsize: int, key_package_ref: bytes = b""
    ) -> None:
        self.room = room
        self.identity = identity
        # the key package of the client instance that opened the stream (empty: unknown)
        self.key_package_ref = key_package_ref
        self._queue: asyncio.Queue[LogEntry | BaseException] = asyncio.Queue(maxsize)
        self._failed: BaseException | None = None
        self.on_fail: Callable[[BaseException], None] | None = None

    def offer(self, entries: Sequence[LogEntry]) -> None:
        if self._failed is not None:
            return
        for entry in entries:
            try:
                self._queue.put_nowait(entry)
            except asyncio.QueueFull:
                self.fail(SlowSubscriber(f"stream of {self.identity!r} fell behind"))
                return

    def fail(self, error: BaseException) -> None:
        """Ends the stream with ``error`` as soon as the reader gets to it — or at once,
        through ``on_fail``, if the reader is stuck writing to a client that stopped
        reading."""
        if self._failed is not None:
            return
        self._failed = error
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(error)
        if self.on_fail is not None:
            self.on_fail(error)

    def end(self, error: BaseException) -> None:
        """Ends the stream with ``error`` after the entries already queued (e.g. the
        commit that removed the subscriber is still delivered)."""
        if self._failed is not None:
            return
        self._failed = error
        try:
            self._queue.put_nowait(error)
        except asyncio.QueueFull:
            self._failed = None
            self.fail(error)

    async def get(self) -> LogEntry:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Hub:
    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self._rooms: dict[str, set[Subscription]] = {}

    def register(self, room: str, identity: str, key_package_ref: bytes = b"") -> Subscription:
        sub = Subscription(room, identity, self.queue_size, key_package_ref)
        self._rooms.setdefault(room, set()).add(sub)
        return sub

    def subscriptions(self, room: str) -> list[Subscription]:
        return list(self._rooms.get(room, ()))

    def unregister(self, sub: Subscription) -> None:
        subs = self._rooms.get(sub.room)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._rooms[sub.room]

    def publish(self, room: str, entries: Sequence[LogEntry]) -> None:
        if entries:
            for sub in list(self._rooms.get(room, ())):
                sub.offer(entries)

    def close_all(self) -> None:
        for subs in list(self._rooms.values()):
            for sub in list(subs):
                sub.fail(StreamClosed("the delivery service is shutting down"))

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._rooms.values())
