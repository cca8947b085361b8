"""Fixtures (registered by conftest.py) and helpers of the Redis tests: a real
redis-server per test, stores on it, delivery service subprocesses sharing it, and
headless members that fail over between DS processes.

* :func:`make_redis` — starts ``redis-server`` (``RedisServer``) with its own dir and port;
* :func:`make_store` — ``RedisStore`` instances on a URL, closed after the test;
* :func:`start_cluster` — N ``python -m delivery_service --store redis://...`` processes;
* :class:`FailoverClient` — a ``DeliveryClient`` over several DS addresses: when the one in
  use is unreachable it moves to the next and raises ``Unavailable``, which the session
  already handles by retrying (unary calls) or resuming from its cursor (the stream);
* :class:`Member` — ``MlsSession`` + ``HeadlessKeySink`` + ``FailoverClient``;
* :func:`wait_converged` — every member on one epoch, executed, same authenticator,
  same roster, identical keys in every sink.

This directory is deliberately not a package: ``tests/`` has no ``__init__.py``, so a
``tests/redis/__init__.py`` would make ``tests/redis`` importable as ``redis`` and shadow
redis-py for the whole test run. Modules here are imported by their (unique) names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from delivery_service.store.redis import RedisStore
from mls_provider import transport as tp
from mls_provider.keys import key_index
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.session import MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.redis_server import RedisServer
from mls_provider.testing.tokens import join_token

log = logging.getLogger(__name__)

T = TypeVar("T")

API_KEY = "lkmls-redis-test-key"
# >= 32 bytes: PyJWT warns about shorter HMAC keys, and warnings are errors here
API_SECRET = "redis-test-secret-3c9d1e7a5b2f4c6e8a0b1d3f5e7c9a2b"
RING_SIZE = 16
WAIT = 60.0  # bound of every convergence wait (seconds); typical waits take < 2 s

# Deadlines of the DS processes: quick batching, deadlines a loaded machine won't hit by
# accident, rate limits out of the way (50 members of one room hammer the DS).
DS_ARGS = (
    "--commit-timeout", "2",
    "--execute-timeout", "2",
    "--create-timeout", "5",
    "--batch-quiet", "0.02",
    "--batch-max-wait", "0.2",
    "--update-interval", "0",  # the race test makes epochs with update commits
    "--rate", "100000",
    "--burst", "100000",
)  # fmt: skip


def mint_token(identity: str, room: str) -> str:
    return join_token(API_KEY, API_SECRET, identity, room)


# ---- redis-server and stores ---------------------------------------------------------


class MakeRedis(Protocol):
    async def __call__(self, **kw: Any) -> RedisServer: ...


@pytest.fixture
async def make_redis(tmp_path: Path) -> AsyncIterator[MakeRedis]:
    """Starts redis-server instances (``RedisServer`` keywords); closes them after."""
    servers: list[RedisServer] = []

    async def make(**kw: Any) -> RedisServer:
        server = RedisServer(workdir=tmp_path / f"redis{len(servers)}", **kw)
        servers.append(server)
        return await server.astart()

    yield make
    for server in servers:
        await asyncio.to_thread(server.close)


@pytest.fixture
async def redis_server(make_redis: MakeRedis) -> RedisServer:
    """One redis-server without persistence."""
    return await make_redis()


class MakeStore(Protocol):
    async def __call__(self, url: str, **kw: Any) -> RedisStore: ...


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """Opens RedisStores (``RedisStore`` keywords); closes them after the test."""
    stores: list[RedisStore] = []

    async def make(url: str, **kw: Any) -> RedisStore:
        store = RedisStore(url, **kw)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


# ---- delivery service processes ------------------------------------------------------


class StartCluster(Protocol):
    async def __call__(self, count: int, redis_url: str) -> list[DeliveryServiceProcess]: ...


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[StartCluster]:
    """Starts DS subprocesses on one Redis (in parallel); stops or kills them after."""
    procs: list[DeliveryServiceProcess] = []

    async def start(count: int, redis_url: str) -> list[DeliveryServiceProcess]:
        batch = [
            DeliveryServiceProcess(
                API_KEY,
                API_SECRET,
                workdir=tmp_path / f"ds{len(procs) + i}",
                store=redis_url,
                extra_args=DS_ARGS,
            )
            for i in range(count)
        ]
        procs.extend(batch)
        for proc in batch:  # from this thread: a DS dies with the thread that started it
            proc.start()
        return batch

    yield start
    await asyncio.gather(*(asyncio.to_thread(p.stop, 5.0) for p in procs))
    for proc in procs:
        proc.kill()


def ds_errors(procs: Iterable[DeliveryServiceProcess]) -> list[str]:
    """Error-level log lines of the DS processes (tracebacks of unexpected failures)."""
    return [
        f"{p.target}: {r.get('msg')} {r.get('exc', '')}"
        for p in procs
        for r in p.log_lines()
        if r.get("level") in ("error", "critical")
    ]


# ---- members ---------------------------------------------------------------------------


class FailoverClient(tp.DeliveryClient):
    """A DeliveryClient over several DS addresses, using one at a time.

    A call or stream that fails with Unavailable moves the client to the next address (once
    per failure of the address in use: concurrent failures do not skip a healthy one), then
    the error propagates — the session retries the call or resumes the stream from its
    cursor, now on another DS process. Every SubmitCommit outcome is recorded.
    """

    def __init__(self, targets: Sequence[str], token: str) -> None:
        super().__init__(targets[0], token, timeout=15.0, wait_for_ready=False)
        self.targets = list(targets)
        self.failovers = 0
        # (epoch submitted, response or the EpochConflict raised)
        self.submits: list[tuple[int, pb.SubmitCommitResponse | tp.EpochConflict]] = []

    async def _fail_over(self, failed: str) -> None:
        if self.target != failed:
            return  # another call moved us already
        index = self.targets.index(failed)
        await self.close()
        self.target = self.targets[(index + 1) % len(self.targets)]
        self.failovers += 1

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: object, timeout: float | None = None
    ) -> T:
        target = self.target
        try:
            return await super()._call(method, request, timeout)
        except tp.Unavailable:
            await self._fail_over(target)
            raise

    async def subscribe(
        self, after: int, key_package_ref: bytes = b""
    ) -> AsyncIterator[pb.RoomEvent]:
        target = self.target
        try:
            async for event in super().subscribe(after, key_package_ref):
                yield event
        except tp.Unavailable:
            await self._fail_over(target)
            raise

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse:
        try:
            response = await super().submit_commit(epoch, commit, welcome, group_info)
        except tp.EpochConflict as e:
            self.submits.append((epoch, e))
            raise
        self.submits.append((epoch, response))
        return response


@dataclass
class Member:
    identity: str
    room: str
    client: FailoverClient
    sink: HeadlessKeySink
    session: MlsSession
    errors: list[BaseException] = field(default_factory=list)
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def accepted(self) -> list[tuple[int, pb.SubmitCommitResponse]]:
        return [(e, r) for e, r in self.client.submits if isinstance(r, pb.SubmitCommitResponse)]


SESSION_CONFIG = SessionConfig(ring_size=RING_SIZE, retry_initial=0.05, retry_max=0.5)


def make_member(identity: str, room: str, targets: Sequence[str], home: int = 0) -> Member:
    """A member talking to ``targets[home % len(targets)]`` first, then failing over to
    the next ones."""
    home %= len(targets)
    order = [*targets[home:], *targets[:home]]
    client = FailoverClient(order, mint_token(identity, room))
    sink = HeadlessKeySink()
    session = MlsSession(client, identity, sink, SESSION_CONFIG)
    member = Member(identity, room, client, sink, session)
    session.on("error", member.errors.append)
    # Every event is handled under the member's gate, so a test can act for the member
    # (e.g. commit) atomically with respect to its stream, as the session itself does.
    handle = session._handle

    async def gated(event: pb.RoomEvent) -> bool:
        async with member.gate:
            return await handle(event)

    session._handle = gated  # type: ignore[method-assign]
    return member


async def retry(call: Callable[[], Awaitable[T]], *, timeout: float = WAIT) -> T:
    """Retries a unary call while the DS in use is unreachable (the client fails over)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except tp.Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def leave(member: Member) -> None:
    """Stops the session and makes sure the DS got the Leave (whatever process is down)."""
    await member.session.stop(leave=False)
    await retry(member.client.leave)
    await member.client.close()


@pytest.fixture
async def members() -> AsyncIterator[list[Member]]:
    """Members a test creates are appended here; their sessions are stopped after."""
    created: list[Member] = []
    yield created
    for member in created:
        await member.session.stop(leave=False)
        await member.client.close()


# ---- convergence -----------------------------------------------------------------------


def convergence_problem(group: Sequence[Member], at_least: int = 0) -> str | None:
    """None if every member is on one epoch (``at_least`` or newer), executed, with one
    authenticator, the same roster (exactly ``group``) and identical keys in every sink;
    else what differs."""
    sessions = [m.session for m in group]
    epochs = {s.epoch for s in sessions}
    if None in epochs or len(epochs) != 1:
        return f"epochs differ: {sorted((m.identity, m.session.epoch) for m in group)}"
    epoch = next(iter(epochs))
    assert epoch is not None
    if epoch < at_least:
        return f"still at epoch {epoch}, waiting for {at_least}"
    if any(s.executed_epoch != epoch for s in sessions):
        return f"not executed everywhere: {[(m.identity, m.session.executed_epoch) for m in group]}"
    if len({s.verification_code for s in sessions}) != 1:
        return "epoch authenticators differ"
    expected = sorted(m.identity for m in group)
    if any(sorted(s.members) != expected for s in sessions):
        return f"rosters differ from {expected}"
    index = key_index(epoch, RING_SIZE)
    for identity in expected:
        keys = {m.sink.key(identity, index) for m in group}
        if None in keys or len(keys) != 1:
            return f"key of {identity} at index {index} differs between sinks"
    if any(m.sink.sender_index != index for m in group):
        return "a sender index differs"
    return None


async def wait_converged(
    group: Sequence[Member],
    *,
    at_least: int = 0,
    timeout: float = WAIT,
    procs: Sequence[DeliveryServiceProcess] = (),
) -> int:
    """Waits for :func:`convergence_problem` to be None; returns the common epoch.
    Pass ``at_least`` after an accepted commit: the old epoch looks converged too."""
    deadline = time.monotonic() + timeout
    while True:
        problem = convergence_problem(group, at_least)
        if problem is None:
            epoch = group[0].session.epoch
            assert epoch is not None
            return epoch
        if time.monotonic() > deadline:
            dead = [p.target for p in procs if not p.running]
            cursors = [(m.identity, m.session.epoch, m.session.executed_epoch, m.session.cursor)
                       for m in group]  # fmt: skip
            raise AssertionError(
                f"members did not converge in {timeout:g}s: {problem}; "
                f"(identity, epoch, executed, cursor): {cursors}; "
                f"dead DS processes: {dead}; DS errors: {ds_errors(procs)[:5]}"
            )
        await asyncio.sleep(0.02)


CONTENTION_RETRIES: list[str] = []  # joins the DS gave up on, retried (see join_all)


async def join_all(group: Sequence[Member], concurrency: int = 6) -> None:
    """Starts every member's session, at most ``concurrency`` joins in flight.

    A burst of joins of one room spread over several DS processes can make a DS give up
    after MAX_ATTEMPTS compare-and-set conflicts and answer INTERNAL "too much write
    contention" (delivery_service/rooms.py; reported). The session does not retry that
    status, so the test does, as an app would, and records it in CONTENTION_RETRIES.
    """
    gate = asyncio.Semaphore(concurrency)

    async def start(member: Member) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    await member.session.start()
                    return
                except tp.DeliveryServiceError as e:
                    if "contention" not in e.message or attempt == 4:
                        raise
                    CONTENTION_RETRIES.append(member.identity)
                    log.warning("%s: join refused (%s); retrying", member.identity, e)
                    await asyncio.sleep(0.1 * (attempt + 1))

    await asyncio.gather(*(start(m) for m in group))


# ---- the accepted commits, from the store -----------------------------------------------


@dataclass(frozen=True)
class LoggedCommit:
    seq: int
    generation: int
    epoch: int
    committer: str


async def logged_commits(store: RedisStore, room: str) -> list[LoggedCommit]:
    """Every commit event of the room's retained log, in log order."""
    commits: list[LoggedCommit] = []
    after = 0
    while True:
        page = await store.read_log(room, after)
        for entry in page:
            event = entry.decode()
            if event.WhichOneof("event") == "commit":
                commits.append(
                    LoggedCommit(
                        entry.seq, event.generation, event.commit.epoch, event.commit.committer
                    )
                )
        if len(page) < 500:
            return commits
        after = page[-1].seq


def assert_one_commit_per_epoch(commits: Sequence[LoggedCommit]) -> None:
    """Per generation, the logged commits' epochs are strictly consecutive: no epoch has
    two accepted commits, and none is missing."""
    by_generation: dict[int, list[int]] = {}
    for commit in commits:
        by_generation.setdefault(commit.generation, []).append(commit.epoch)
    for generation, epochs in by_generation.items():
        assert epochs == list(range(epochs[0], epochs[0] + len(epochs))), (
            f"generation {generation}: commit epochs are not consecutive: {epochs}"
        )


def assert_accepted_are_logged(group: Iterable[Member], commits: Sequence[LoggedCommit]) -> int:
    """Every commit a DS acknowledged to a member is in the log, at the seq and epoch it
    was acknowledged with (nothing accepted was lost). Returns how many distinct commits
    were checked (a commit submitted again is acknowledged again, with the same seq)."""
    by_seq = {c.seq: c for c in commits}
    checked: set[int] = set()
    for member in group:
        for epoch, response in member.accepted:
            logged = by_seq.get(response.seq)
            assert logged is not None, f"{member.identity}'s commit at seq {response.seq} lost"
            assert (logged.epoch, logged.epoch + 1, logged.committer) == (
                epoch,
                response.epoch,
                member.identity,
            ), f"seq {response.seq} holds another commit than the one acknowledged"
            checked.add(response.seq)
    return len(checked)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@contextlib.asynccontextmanager
async def running(coro: Awaitable[None]) -> AsyncIterator[asyncio.Future[None]]:
    """Runs ``coro`` as a task for the block; cancels it after unless it finished."""
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
