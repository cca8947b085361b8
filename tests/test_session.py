"""The client session against a real DS over gRPC (in-process, SQLite): recovery paths,
configuration checks, and the key installation order LiveKit depends on."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from delivery_service.ordering import OrderingConfig
from delivery_service.server import DeliveryServer
from delivery_service.settings import Settings
from mls_provider import mls
from mls_provider.session import DsKeyMismatch, MlsSession, SessionConfig, SessionError
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.tokens import join_token
from mls_provider.transport import DeliveryClient

pytestmark = pytest.mark.timeout(120)

KEY = "session-test"
SECRET = secrets.token_urlsafe(40)


def token(identity: str, room: str = "room") -> str:
    return join_token(KEY, SECRET, identity, room)


def settings(store: str) -> Settings:
    return Settings(
        livekit_api_key=KEY,
        livekit_api_secret=SECRET,
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        store=store,
        ordering=OrderingConfig(execute_timeout=2.0),
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[DeliveryServer]:
    ds = DeliveryServer(settings(f"sqlite:///{tmp_path / 'ds.db'}"))
    await ds.start()
    yield ds
    await ds.stop()


class Room:
    def __init__(self, target: str, public_key: bytes) -> None:
        self.target = target
        self.public_key = public_key
        self.sessions: dict[str, MlsSession] = {}

    async def join(
        self, identity: str, key_sink: HeadlessKeySink | None = None, **config: object
    ) -> MlsSession:
        session = MlsSession(
            DeliveryClient(self.target, token(identity)),
            identity,
            key_sink or HeadlessKeySink(),
            SessionConfig(ds_public_key=self.public_key, retry_max=0.5, **config),  # type: ignore[arg-type]
        )
        await session.start()
        self.sessions[identity] = session
        return session

    async def converged(self, timeout: float = 15.0) -> int:
        async def check() -> int:
            while True:
                sessions = list(self.sessions.values())
                codes = {s.verification_code for s in sessions}
                epochs = {(s.epoch, s.executed_epoch) for s in sessions}
                rosters = {tuple(sorted(s.members)) for s in sessions}
                if (
                    len(codes) == 1
                    and None not in codes
                    and len(epochs) == 1
                    and len({e for pair in epochs for e in pair}) == 1
                    and rosters == {tuple(sorted(self.sessions))}
                ):
                    epoch = sessions[0].epoch
                    assert epoch is not None
                    return epoch
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(check(), timeout)

    async def close(self) -> None:
        await asyncio.gather(*(s.stop(leave=False) for s in self.sessions.values()))
        await asyncio.gather(*(s.ds.close() for s in self.sessions.values()))


@pytest.fixture
async def room(server: DeliveryServer) -> AsyncIterator[Room]:
    assert server.observer is not None
    r = Room(f"127.0.0.1:{server.grpc_port}", server.observer.public_key)
    yield r
    await r.close()


def sink(session: MlsSession) -> HeadlessKeySink:
    assert isinstance(session.sink, HeadlessKeySink)
    return session.sink


async def test_keys_and_data_index_follow_prepare_then_execute(room: Room) -> None:
    """Remote keys are installed at prepare; our own key and the data index switch only at
    execute; LiveKit's 'last set_key index' (data packets) always equals the send index."""
    alice = await room.join("alice")
    await room.join("bob")
    epoch = await room.converged()
    index = epoch % 16
    for session in room.sessions.values():
        s = sink(session)
        assert s.sender_index == index
        assert s.latest_key_index == index  # data packets use the send index
        for identity in room.sessions:
            key = s.key(identity, index)
            assert key is not None and len(key) == 32
            assert key == sink(room.sessions["alice"]).key(identity, index)

    # between prepare and execute: alice holds carol's new key, but sends (and pins data) old
    seen: list[tuple[int | None, int | None, bool]] = []
    alice.on(
        "epoch_changed",
        lambda info: seen.append(
            (
                sink(alice).sender_index,
                sink(alice).latest_key_index,
                sink(alice).key("carol", info.key_index) is not None,
            )
        ),
    )
    await room.join("carol")
    new_epoch = await room.converged()
    assert seen and seen[0] == (index, index, True), (
        "prepare installs the new keys and must not move the send or data index"
    )
    assert sink(alice).sender_index == new_epoch % 16 == sink(alice).latest_key_index


class QuiesceCheckingSink(HeadlessKeySink):
    """Records key installs made outside a quiesce window: the window opens when quiesce
    returns and closes at the loop's next turn, i.e. as soon as the session awaits."""

    def __init__(self) -> None:
        super().__init__()
        self.window_open = False
        self.quiesced = 0
        self.outside_window: list[tuple[str, int]] = []

    async def quiesce(self) -> None:
        await asyncio.sleep(0)  # a real gate may wait for sends in flight
        self.quiesced += 1
        self.window_open = True
        asyncio.get_running_loop().call_soon(self._close)

    def _close(self) -> None:
        self.window_open = False

    def set_key(self, identity: str, material: bytes, key_index: int) -> None:
        if not self.window_open:
            self.outside_window.append((identity, key_index))
        super().set_key(identity, material, key_index)

    def set_sender_index(self, key_index: int) -> None:
        if not self.window_open:
            self.outside_window.append(("<sender>", key_index))
        super().set_sender_index(key_index)


async def test_every_key_install_follows_a_quiesce(room: Room) -> None:
    """Joins, a leave (removed member's slots overwritten), executes and old-slot wipes all
    install keys only right after ``KeySink.quiesce``, never across an await: LiveKit's
    data sends are held off exactly while the keys change."""
    sinks = {name: QuiesceCheckingSink() for name in ("alice", "bob", "carol")}
    for name in ("alice", "bob", "carol"):
        await room.join(name, key_sink=sinks[name], old_key_grace=0.1)
    await room.converged()
    carol = room.sessions.pop("carol")
    await carol.stop(leave=True)
    await carol.ds.close()
    await room.converged()
    await asyncio.sleep(0.5)  # the wipes of old slots, after the grace period
    for name, checked in sinks.items():
        assert checked.quiesced > 0, name
        assert checked.outside_window == [], (name, checked.outside_window)


async def test_removed_member_rejoins_automatically(room: Room) -> None:
    """A member the DS removes while it still wants to be in the room joins again."""
    await room.join("alice")
    bob = await room.join("bob")
    await room.converged()
    removed: list[str] = []
    bob.on("removed", removed.append)
    reporter = DeliveryClient(room.target, token("alice"))
    before = room.sessions["alice"].epoch
    assert before is not None
    await reporter.report_disconnect("bob")  # e.g. a network blip seen by alice
    await reporter.close()
    # removal, then re-join: two more epochs, and bob is back
    await bob.wait_until(lambda s: (s.epoch or 0) >= before + 2 and s.executed_epoch == s.epoch, 20)
    await room.converged(timeout=20)
    assert removed, "bob was never removed"
    assert "bob" in room.sessions["alice"].members


async def test_processing_failure_reports_and_rejoins(room: Room) -> None:
    """A member that fails to apply a commit reports it and comes back with a new leaf."""
    await room.join("alice")
    bob = await room.join("bob")
    await room.converged()
    original = bob._apply_commit
    failures = {"left": 1}

    def broken(group: mls.Group, commit: object) -> mls.CommitApplied:
        if failures["left"]:
            failures["left"] -= 1
            raise mls.ValidationError("simulated corrupt state")
        return original(group, commit)  # type: ignore[arg-type]

    bob._apply_commit = broken  # type: ignore[method-assign]
    rejoins: list[str] = []
    bob.on("rejoining", rejoins.append)
    await room.join("carol")
    await room.converged(timeout=20)
    assert rejoins and "simulated corrupt state" in rejoins[0]


def hold_commits(session: MlsSession, until: asyncio.Event) -> None:
    """Makes ``session`` answer commit requests only once ``until`` is set."""
    original = session._on_commit_request

    async def held(group: mls.Group, request: object) -> None:
        await until.wait()
        await original(group, request)  # type: ignore[arg-type]

    session._on_commit_request = held  # type: ignore[method-assign]


async def test_a_removal_that_also_adds_someone_takes_the_removed_path(
    server: DeliveryServer, room: Room
) -> None:
    """One commit removes bob and adds carol: bob's session sees itself removed (the
    ``removed`` event, ``rejoin_on_removal`` honoured), not a processing failure followed
    by a re-join (the engine used to fail with AddedMemberNotFound)."""
    alice = await room.join("alice")
    bob = await room.join("bob", rejoin_on_removal=False)
    await room.converged()
    release = asyncio.Event()
    hold_commits(alice, release)
    events: list[tuple[str, object]] = []
    for name in ("removed", "rejoining", "error"):
        bob.on(name, lambda value, name=name: events.append((name, value)))
    carol = await room.join("carol")
    assert server.manager is not None
    await server.manager.leave("room", "bob")  # as a webhook would

    async def pending() -> int:
        assert server.manager is not None
        return len((await server.manager.room_state("room")).pending)

    for _ in range(1000):  # the Remove and the Add are both waiting for alice's commit
        if await pending() == 2:
            break
        await asyncio.sleep(0.01)
    assert await pending() == 2
    release.set()
    del room.sessions["bob"]
    await room.converged()
    assert [name for name, _ in events] == ["removed"]
    assert not bob.running and bob.group is None
    assert sorted(carol.members) == ["alice", "carol"]
    await bob.ds.close()


async def test_a_new_instance_ignores_its_predecessors_welcome(room: Room) -> None:
    """bob's first instance uploads a key package and vanishes; a second instance joins
    before alice commits the first one's Add. The Welcome of that commit is encrypted to
    the first key package: the second instance must not try it (it used to fail with
    WelcomeKeyPackageNotFound, report a failure and re-join), and joins from the next."""
    alice = await room.join("alice")
    await room.converged()
    release = asyncio.Event()
    hold_commits(alice, release)
    first = DeliveryClient(room.target, token("bob"))
    await first.join(mls.MlsClient("bob", mls.SignatureKeyPair.generate()).generate_key_package())
    await first.close()
    rejoins: list[str] = []
    bob = MlsSession(
        DeliveryClient(room.target, token("bob")),
        "bob",
        HeadlessKeySink(),
        SessionConfig(ds_public_key=room.public_key, retry_max=0.5),
    )
    bob.on("rejoining", rejoins.append)
    await bob.start()
    room.sessions["bob"] = bob
    release.set()
    await room.converged()
    assert rejoins == []
    assert sorted(alice.members) == ["alice", "bob"]


async def test_stream_resumes_after_ds_restart(tmp_path: Path) -> None:
    """A graceful DS restart on the same store: sessions resume from their cursors."""
    store = f"sqlite:///{tmp_path / 'ds.db'}"
    first = DeliveryServer(settings(store))
    await first.start()
    port = first.grpc_port
    assert first.observer is not None
    room = Room(f"127.0.0.1:{port}", first.observer.public_key)
    try:
        await room.join("alice")
        await room.join("bob")
        before = await room.converged()
        await first.stop()
        second_settings = settings(store)
        second_settings.grpc_listen = f"127.0.0.1:{port}"
        second = DeliveryServer(second_settings)
        await second.start()
        try:
            await room.join("carol")
            after = await room.converged(timeout=20)
            assert after > before
        finally:
            await room.close()
            await second.stop()
    finally:
        await first.stop()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda public_key: {"ring_size": 8}, SessionError),
        (lambda public_key: {"ds_public_key": bytes(32)}, DsKeyMismatch),
    ],
)
async def test_configuration_mismatches_fail_at_start(
    room: Room, change: Callable[[bytes], dict[str, object]], error: type[Exception]
) -> None:
    config = {"ds_public_key": room.public_key, "retry_max": 0.5, **change(room.public_key)}
    session = MlsSession(
        DeliveryClient(room.target, token("zed")),
        "zed",
        HeadlessKeySink(),
        SessionConfig(**config),  # type: ignore[arg-type]
    )
    with pytest.raises(error):
        await session.start()
    await session.ds.close()
