"""The embedded default store: one SQLite file in WAL mode.

Every ``save`` is one IMMEDIATE transaction (record + log entries + key packages), and
with ``synchronous=FULL`` it is on disk before ``save`` returns — before the DS answers
the request that caused it. So an accepted commit survives ``kill -9`` and power loss.
SQLite calls run on one worker thread; the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from delivery_service.errors import VersionConflict
from delivery_service.model import LogEntry, RoomState
from delivery_service.store.base import DEFAULT_LOG_RETENTION, Store
from delivery_service.store.ready import ReadyAcks

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY, version INTEGER NOT NULL, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    room TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL, recipients TEXT,
    PRIMARY KEY (room, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_packages (
    room TEXT NOT NULL, ref BLOB NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (room, ref)) WITHOUT ROWID;
"""


class SqliteStore(Store):
    def __init__(
        self,
        path: str | Path,
        *,
        log_retention: int = DEFAULT_LOG_RETENTION,
        synchronous: str = "FULL",
    ) -> None:
        super().__init__(log_retention)
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = Path(path)
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._ready = ReadyAcks()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                if self._db is None:
                    raise RuntimeError("store is closed")
                return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def connect() -> None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    async def close(self) -> None:
        def disconnect() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, disconnect)
        self._executor.shutdown(wait=True)

    async def ds_key(self, new_secret: bytes) -> bytes:
        def get_or_put(db: sqlite3.Connection) -> bytes:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('ds_key', ?)", (new_secret,)
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'ds_key'").fetchone()
            return bytes(row[0])

        return await self._run(get_or_put)

    async def load(self, room: str) -> RoomState | None:
        def read(db: sqlite3.Connection) -> tuple[int, bytes] | None:
            row = db.execute("SELECT version, state FROM rooms WHERE room = ?", (room,)).fetchone()
            return None if row is None else (int(row[0]), bytes(row[1]))

        row = await self._run(read)
        if row is None:
            return None
        state = RoomState.from_json(row[1])
        state.version = row[0]
        return state

    async def rooms(self) -> list[str]:
        return await self._run(
            lambda db: [r[0] for r in db.execute("SELECT room FROM rooms ORDER BY room")]
        )

    async def save(
        self,
        state: RoomState,
        expected_version: int,
        entries: Sequence[LogEntry],
        put_key_packages: Mapping[bytes, bytes],
        drop_key_packages: Iterable[bytes],
    ) -> None:
        new_version = expected_version + 1
        state.version = new_version
        record = state.to_json()
        drops = list(drop_key_packages)
        retention = self.log_retention

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT version FROM rooms WHERE room = ?", (state.room,)
                ).fetchone()
                stored = 0 if row is None else int(row[0])
                if stored != expected_version:
                    raise VersionConflict(f"room {state.room!r} is at version {stored}")
                db.execute(
                    "INSERT INTO rooms (room, version, state) VALUES (?, ?, ?) "
                    "ON CONFLICT (room) DO UPDATE SET version = excluded.version, "
                    "state = excluded.state",
                    (state.room, new_version, record),
                )
                db.executemany(
                    "INSERT INTO log (room, seq, event, recipients) VALUES (?, ?, ?, ?)",
                    [
                        (
                            state.room,
                            e.seq,
                            e.event,
                            None if e.recipients is None else json.dumps(e.recipients),
                        )
                        for e in entries
                    ],
                )
                if entries:
                    db.execute(
                        "DELETE FROM log WHERE room = ? AND seq <= ?",
                        (state.room, entries[-1].seq - retention),
                    )
                db.executemany(
                    "INSERT OR REPLACE INTO key_packages (room, ref, data) VALUES (?, ?, ?)",
                    [(state.room, ref, data) for ref, data in put_key_packages.items()],
                )
                db.executemany(
                    "DELETE FROM key_packages WHERE room = ? AND ref = ?",
                    [(state.room, ref) for ref in drops],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        try:
            await self._run(write)
        except BaseException:
            state.version = expected_version
            raise

    async def read_log(self, room: str, after: int, limit: int = 500) -> list[LogEntry]:
        def read(db: sqlite3.Connection) -> list[LogEntry]:
            rows = db.execute(
                "SELECT seq, event, recipients FROM log WHERE room = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (room, after, limit),
            ).fetchall()
            return [
                LogEntry(
                    int(seq),
                    bytes(event),
                    None if recipients is None else tuple(json.loads(recipients)),
                )
                for seq, event, recipients in rows
            ]

        return await self._run(read)

    async def log_start(self, room: str) -> int:
        def first(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT MIN(seq) FROM log WHERE room = ?", (room,)).fetchone()
            return 1 if row is None or row[0] is None else int(row[0])

        return await self._run(first)

    async def key_package(self, room: str, ref: bytes) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT data FROM key_packages WHERE room = ? AND ref = ?", (room, ref)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(read)

    async def mark_ready(self, room: str, generation: int, epoch: int, identity: str) -> set[str]:
        return self._ready.mark(room, generation, epoch, identity)
