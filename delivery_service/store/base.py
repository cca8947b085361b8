"""The store interface the ordering logic is written against."""

from __future__ import annotations

import abc
import importlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

from delivery_service.model import LogEntry, RoomState

DEFAULT_LOG_RETENTION = 10_000
"""Log entries kept per room; a cursor older than that must join again (OUT_OF_RANGE)."""


class Store(abc.ABC):
    """Durable room records and logs.

    ``save`` is the only write of room data: it checks that the stored version is
    ``expected_version``, then atomically writes the record (version + 1), appends the
    log entries and applies the key package changes — all or nothing. A store never
    interprets the record; the ordering logic does.
    """

    # True if several DS processes write this store, so a process's cache may lag it
    shared = False

    def __init__(self, log_retention: int = DEFAULT_LOG_RETENTION) -> None:
        self.log_retention = log_retention

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connects and creates the schema."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flushes and disconnects."""

    @abc.abstractmethod
    async def ds_key(self, new_secret: bytes) -> bytes:
        """The DS's signature secret key: the stored one, or ``new_secret`` stored now."""

    @abc.abstractmethod
    async def load(self, room: str) -> RoomState | None: ...

    @abc.abstractmethod
    async def rooms(self) -> list[str]:
        """Every room with a record."""

    @abc.abstractmethod
    async def save(
        self,
        state: RoomState,
        expected_version: int,
        entries: Sequence[LogEntry],
        put_key_packages: Mapping[bytes, bytes],
        drop_key_packages: Iterable[bytes],
    ) -> None:
        """Compare-and-set write; sets ``state.version`` on success, raises
        :class:`delivery_service.errors.VersionConflict` if another writer won."""

    @abc.abstractmethod
    async def read_log(self, room: str, after: int, limit: int = 500) -> list[LogEntry]:
        """Entries with ``seq > after``, oldest first, at most ``limit``."""

    @abc.abstractmethod
    async def log_start(self, room: str) -> int:
        """The oldest retained seq (1 for a new room)."""

    @abc.abstractmethod
    async def key_package(self, room: str, ref: bytes) -> bytes | None: ...

    @abc.abstractmethod
    async def mark_ready(self, room: str, generation: int, epoch: int, identity: str) -> set[str]:
        """Records a ready ack and returns every identity ready for that epoch."""

    @abc.abstractmethod
    async def ready_acks(self, room: str, generation: int, epoch: int) -> set[str]:
        """Every identity ready for that epoch (empty once a newer epoch was acked)."""

    async def publish_presence(  # noqa: B027 - optional hook
        self, report: Mapping[str, Mapping[str, tuple[float, bool]]], *, ttl: float
    ) -> None:
        """Shared stores: this process's streams, room -> identity -> (time, open): an
        open stream at that time, or the time its last stream closed. Kept ``ttl``
        seconds. Single-process stores keep presence in the process and ignore this."""

    async def read_presence(self, room: str) -> list[tuple[str, float, bool]]:
        """Shared stores: (identity, time, open) as the *other* processes last reported
        them for ``room``. Empty for single-process stores."""
        return []

    def changes(self) -> AsyncIterator[tuple[str, int]] | None:
        """(room, head) notifications of writes by *other* DS processes, for stores that
        several processes share; None for single-process stores."""
        return None


def open_store(url: str, *, log_retention: int = DEFAULT_LOG_RETENTION) -> Store:
    """A store from a URL: ``sqlite:///path``, ``memory://`` or ``redis://...``."""
    if url.startswith("sqlite://"):
        from delivery_service.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        if not path:
            raise ValueError("sqlite store URL needs a path: sqlite:///path/to/ds.db")
        return SqliteStore(path, log_retention=log_retention)
    if url == "memory://":
        from delivery_service.store.memory import MemoryStore

        return MemoryStore(log_retention=log_retention)
    if url.startswith(("redis://", "rediss://", "unix://")):
        # imported on demand: only Redis deployments need the redis client library
        redis_module = importlib.import_module("delivery_service.store.redis")
        store: Store = redis_module.RedisStore(url, log_retention=log_retention)
        return store
    raise ValueError(f"unknown store URL {url!r} (use sqlite:///path, memory:// or redis://...)")
