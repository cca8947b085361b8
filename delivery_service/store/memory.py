"""In-memory store, for unit tests of the ordering and API layers only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from delivery_service.errors import VersionConflict
from delivery_service.model import LogEntry, RoomState
from delivery_service.store.base import Store
from delivery_service.store.ready import ReadyAcks


class MemoryStore(Store):
    """Keeps serialized records (so tests exercise the same encoding as real stores)."""

    def __init__(self, log_retention: int = 10_000) -> None:
        super().__init__(log_retention)
        self._key: bytes | None = None
        self._records: dict[str, tuple[int, bytes]] = {}
        self._logs: dict[str, list[LogEntry]] = {}
        self._key_packages: dict[tuple[str, bytes], bytes] = {}
        self._ready = ReadyAcks()

    async def ds_key(self, new_secret: bytes) -> bytes:
        if self._key is None:
            self._key = new_secret
        return self._key

    async def load(self, room: str) -> RoomState | None:
        record = self._records.get(room)
        if record is None:
            return None
        state = RoomState.from_json(record[1])
        state.version = record[0]
        return state

    async def rooms(self) -> list[str]:
        return list(self._records)

    async def save(
        self,
        state: RoomState,
        expected_version: int,
        entries: Sequence[LogEntry],
        put_key_packages: Mapping[bytes, bytes],
        drop_key_packages: Iterable[bytes],
    ) -> None:
        stored = self._records.get(state.room, (0, b""))[0]
        if stored != expected_version:
            raise VersionConflict(f"room {state.room!r} is at version {stored}")
        state.version = expected_version + 1
        self._records[state.room] = (state.version, state.to_json())
        log = self._logs.setdefault(state.room, [])
        log.extend(entries)
        del log[: max(0, len(log) - self.log_retention)]
        for ref, data in put_key_packages.items():
            self._key_packages[(state.room, ref)] = data
        for ref in drop_key_packages:
            self._key_packages.pop((state.room, ref), None)

    async def read_log(self, room: str, after: int, limit: int = 500) -> list[LogEntry]:
        return [e for e in self._logs.get(room, []) if e.seq > after][:limit]

    async def log_start(self, room: str) -> int:
        log = self._logs.get(room)
        return log[0].seq if log else 1

    async def key_package(self, room: str, ref: bytes) -> bytes | None:
        return self._key_packages.get((room, ref))

    async def mark_ready(self, room: str, generation: int, epoch: int, identity: str) -> set[str]:
        return self._ready.mark(room, generation, epoch, identity)

    async def ready_acks(self, room: str, generation: int, epoch: int) -> set[str]:
        return self._ready.acks(room, generation, epoch)
