"""The embedded default store: one SQLite file in WAL mode.

Durability: with ``synchronous=FULL`` every ``save`` is on disk (fsync) before it returns —
before the DS answers the request that caused it — so an accepted commit survives
``kill -9`` and power loss.

Throughput: one fsync costs milliseconds, so saves are *group-committed*. A single writer
thread owns the connection; when it starts a transaction it takes every save waiting in
its queue, runs each inside its own SAVEPOINT (a compare-and-set failure rolls back that
save only), and commits them together with one fsync. Each caller is answered after that
commit. Under load many rooms share one fsync; alone, a save is a transaction of its own.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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

MAX_GROUP = 256  # saves per group commit


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


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
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = ReadyAcks()
        self.group_commits = 0  # transactions committed (for tests and metrics)

    # ---- the writer thread ---------------------------------------------------------

    def _serve(self, db: sqlite3.Connection) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                db.close()
                return
            if not job.write:
                self._finish(job, *self._call(job, db))
                continue
            batch = [job]
            deferred: list[_Job | None] = []  # reads and the stop sentinel, after the commit
            while len(batch) < MAX_GROUP:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is not None and more.write:
                    batch.append(more)
                else:
                    deferred.append(more)
            self._commit_group(db, batch)
            for later in deferred:
                if later is None:
                    db.close()
                    return
                self._finish(later, *self._call(later, db))

    def _commit_group(self, db: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for job in batch:
                db.execute("SAVEPOINT save")
                try:
                    result = job.fn(db)
                except BaseException as e:  # this save only: its savepoint is undone
                    db.execute("ROLLBACK TO save")
                    outcomes.append((None, e))
                else:
                    outcomes.append((result, None))
                db.execute("RELEASE save")
            db.execute("COMMIT")  # one fsync for the whole group
            self.group_commits += 1
        except BaseException as e:  # the transaction failed: nothing of it is stored
            if db.in_transaction:
                db.execute("ROLLBACK")
            outcomes = [(None, e)] * len(batch)
        for job, (result, error) in zip(batch, outcomes, strict=True):
            self._finish(job, result, error)

    @staticmethod
    def _call(job: _Job, db: sqlite3.Connection) -> tuple[Any, BaseException | None]:
        try:
            return job.fn(db), None
        except BaseException as e:
            return None, e

    @staticmethod
    def _finish(job: _Job, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if job.future.cancelled():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        job.loop.call_soon_threadsafe(settle)

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        if self._thread is None:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, write, future, loop))
        return await future

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(fn, write=False)

    # ---- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def start() -> None:
            try:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                db.execute("PRAGMA busy_timeout=5000")
                db.executescript(SCHEMA)
            except BaseException as e:
                loop.call_soon_threadsafe(opened.set_exception, e)
                return
            loop.call_soon_threadsafe(opened.set_result, None)
            self._serve(db)

        self._thread = threading.Thread(target=start, name="sqlite-store", daemon=True)
        self._thread.start()
        try:
            await opened
        except BaseException:
            self._thread = None
            raise

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    # ---- the Store interface -------------------------------------------------------

    async def ds_key(self, new_secret: bytes) -> bytes:
        def get_or_put(db: sqlite3.Connection) -> bytes:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('ds_key', ?)", (new_secret,)
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'ds_key'").fetchone()
            return bytes(row[0])

        return await self._submit(get_or_put, write=True)

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

        def write(db: sqlite3.Connection) -> None:  # runs inside a group transaction
            row = db.execute("SELECT version FROM rooms WHERE room = ?", (state.room,)).fetchone()
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

        try:
            await self._submit(write, write=True)
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

    async def ready_acks(self, room: str, generation: int, epoch: int) -> set[str]:
        return self._ready.acks(room, generation, epoch)
