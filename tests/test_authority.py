"""Authority mode against a real DS over gRPC (in-process): only members the app's own
identity authority vouched for hold keys — a LiveKit token alone is not enough, and a
delivery service that tries to add someone else gets no honest member to install a key
for it. Credentials are renewed before they expire; a member whose credential expired is
removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from delivery_service.ordering import OrderingConfig
from delivery_service.server import DeliveryServer
from delivery_service.settings import DS_IDENTITY, Settings
from mls_provider import mls
from mls_provider.authority import IdentityAuthority
from mls_provider.session import MlsSession, RejectedMember, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.tokens import join_token
from mls_provider.transport import DeliveryClient, PermissionDenied

pytestmark = pytest.mark.timeout(120)

KEY = "authority-test"
SECRET = secrets.token_urlsafe(40)
ROOM = "vouched-room"


def token(identity: str, room: str = ROOM) -> str:
    return join_token(KEY, SECRET, identity, room)


class App:
    """The app: its identity authority and a DS that checks with it."""

    def __init__(self, tmp_path: Path, **ordering: object) -> None:
        self.authority = IdentityAuthority.generate()
        self.ds_secret = mls.SignatureKeyPair.generate().secret_key
        key_file = tmp_path / "ds.key"
        key_file.write_text(self.ds_secret.hex())
        self.settings = Settings(
            livekit_api_key=KEY,
            livekit_api_secret=SECRET,
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            store="memory://",
            ds_key_file=str(key_file),
            ordering=OrderingConfig(
                execute_timeout=2.0,
                authority_keys=(self.authority.public_key,),
                **ordering,  # type: ignore[arg-type]
            ),
        )
        self.server = DeliveryServer(self.settings)
        self.sessions: dict[str, MlsSession] = {}
        self.rejected: dict[str, list[RejectedMember]] = {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def issuer(
        self, identity: str, valid_for: timedelta = timedelta(hours=1)
    ) -> Callable[[bytes], asyncio.Future[bytes]]:
        async def issue(signature_key: bytes) -> bytes:
            return self.authority.issue(identity, ROOM, signature_key, valid_for=valid_for)

        return issue  # type: ignore[return-value]

    def config(self, identity: str, **overrides: object) -> SessionConfig:
        assert self.server.observer is not None
        options: dict[str, object] = {
            "ds_public_key": self.server.observer.public_key,
            "retry_max": 0.5,
            "authority_keys": (self.authority.public_key,),
            "get_credential": self.issuer(identity),
            **overrides,
        }
        return SessionConfig(**options)  # type: ignore[arg-type]

    async def join(self, identity: str, **overrides: object) -> MlsSession:
        session = MlsSession(
            DeliveryClient(self.target, token(identity)),
            identity,
            HeadlessKeySink(),
            self.config(identity, **overrides),
        )
        self.rejected[identity] = []
        session.on("member_rejected", self.rejected[identity].append)
        await session.start()
        self.sessions[identity] = session
        return session

    async def converged(self, names: set[str], timeout: float = 20.0) -> int:
        async def check() -> int:
            while True:
                sessions = [self.sessions[n] for n in names]
                states = {(s.epoch, s.executed_epoch, s.verification_code) for s in sessions}
                if (
                    len(states) == 1
                    and None not in next(iter(states))
                    and all(set(s.members) == names for s in sessions)
                    and sessions[0].epoch == sessions[0].executed_epoch
                ):
                    epoch = sessions[0].epoch
                    assert epoch is not None
                    return epoch
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(check(), timeout)

    def installed_anywhere(self, identity: str) -> bool:
        """Whether any honest session holds a key for ``identity`` at any index."""
        return any(
            isinstance(s.sink, HeadlessKeySink) and identity in s.sink.keys
            for s in self.sessions.values()
        )

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.stop(leave=False)
            await session.ds.close()
        await self.server.stop()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    a = App(tmp_path)
    await a.server.start()
    yield a
    await a.close()


def key_package(identity: str, credential_for: Callable[[bytes], bytes] | None) -> bytes:
    pair = mls.SignatureKeyPair.generate()
    credential = None if credential_for is None else credential_for(pair.public_key)
    return mls.MlsClient(identity, pair, credential=credential).generate_key_package()


async def test_vouched_members_join_and_a_token_alone_is_not_enough(app: App) -> None:
    """alice and bob, vouched for, form the group. A LiveKit token for mallory (minted
    with the LiveKit secret, as the LiveKit operator can) with a basic credential, one
    signed by another authority, an expired one, one for another room and one expiring too
    soon are all refused at Join with PERMISSION_DENIED and the reason."""
    await app.join("alice")
    await app.join("bob")
    await app.converged({"alice", "bob"})
    other = IdentityAuthority.generate()
    now = int(time.time())
    cases: dict[str, tuple[bytes, str]] = {
        "basic credential": (key_package("mallory", None), "not vouched for"),
        "other authority": (
            key_package("mallory", lambda k: other.issue("mallory", ROOM, k)),
            "not signed by a pinned authority",
        ),
        "expired": (
            key_package(
                "mallory",
                lambda k: app.authority.issue(
                    "mallory", ROOM, k, not_before=now - 7200, valid_for=timedelta(hours=1)
                ),
            ),
            "expired",
        ),
        "other room": (
            key_package("mallory", lambda k: app.authority.issue("mallory", "elsewhere", k)),
            "for room 'elsewhere'",
        ),
        "expires too soon": (
            key_package(
                "mallory",
                lambda k: app.authority.issue("mallory", ROOM, k, valid_for=timedelta(minutes=2)),
            ),
            "expires in less than",
        ),
    }
    async with DeliveryClient(app.target, token("mallory")) as mallory:
        for name, (kp, reason) in cases.items():
            with pytest.raises(PermissionDenied) as info:
                await mallory.join(kp)
            assert reason in info.value.message, f"{name}: {info.value.message}"
    state = await app.server.manager.room_state(ROOM)  # type: ignore[union-attr]
    assert "mallory" not in state.participants
    assert not app.installed_anywhere("mallory")


async def test_a_session_refuses_a_ds_that_does_not_check_its_authority(app: App) -> None:
    """A member pinning the app's authority refuses a DS that does not check it (here: a
    DS in open mode, which would let anyone's key packages in): the session fails at start
    with a configuration error naming --authority-key."""
    from mls_provider.session import SessionError

    manager = app.server.manager
    assert manager is not None
    ordering = manager.ordering
    ordering.config = dataclasses.replace(ordering.config, authority_keys=())
    pair = mls.SignatureKeyPair.from_secret(app.ds_secret)
    ordering.observer = mls.ExternalObserver(DS_IDENTITY, pair)
    session = MlsSession(
        DeliveryClient(app.target, token("alice")), "alice", HeadlessKeySink(), app.config("alice")
    )
    with pytest.raises(SessionError, match="--authority-key"):
        await session.start()
    await session.ds.close()


async def test_a_hostile_ds_gets_no_honest_member_to_hold_an_intruders_key(
    tmp_path: Path,
) -> None:
    """The DS itself is the attacker: it advertises the app's authority but adds whoever
    asks (its observer checks nothing). mallory, with a credential of her own making,
    joins; the DS proposes her Add. The honest committer leaves it out and says why
    (member_rejected), and no honest member installs a key for mallory."""
    app = App(tmp_path)
    await app.server.start()
    try:
        manager = app.server.manager
        assert manager is not None
        # the hostile DS: same key, an observer that checks no credential
        pair = mls.SignatureKeyPair.from_secret(app.ds_secret)
        manager.ordering.observer = mls.ExternalObserver(DS_IDENTITY, pair)
        await app.join("alice")
        await app.join("bob")
        await app.converged({"alice", "bob"})
        forger = IdentityAuthority.generate()
        async with DeliveryClient(app.target, token("mallory")) as mallory:
            await mallory.join(key_package("mallory", lambda k: forger.issue("mallory", ROOM, k)))

            for _ in range(750):  # until alice (the designee) refused mallory's Add
                if app.rejected["alice"]:
                    break
                await asyncio.sleep(0.02)
        rejection = app.rejected["alice"][0]
        assert rejection.identity == "mallory"
        assert "not vouched for" in rejection.reason
        await asyncio.sleep(2.5)  # designees after alice (bob) refuse it too
        assert not app.installed_anywhere("mallory")
        assert all("mallory" not in s.members for s in app.sessions.values())
    finally:
        await app.close()


async def test_credentials_are_renewed_before_they_expire(tmp_path: Path) -> None:
    """Credentials valid for 40 s, renewed 32 s before they expire: each member commits a
    renewal; everyone sees the later expiry; nobody is removed and the room keeps going."""
    app = App(tmp_path, credential_margin=5.0, update_interval=0.0)
    await app.server.start()
    try:
        short = timedelta(seconds=40)
        for name in ("alice", "bob"):
            await app.join(name, get_credential=app.issuer(name, short), credential_renewal=32.0)
        epoch = await app.converged({"alice", "bob"})
        first = {m.identity: m.not_after for m in app.sessions["alice"].group.members()}  # type: ignore[union-attr]

        async def renewed() -> None:
            while True:
                group = app.sessions["bob"].group
                if group is not None:
                    now = {m.identity: m.not_after for m in group.members()}
                    if all((now[n] or 0) > (first[n] or 0) for n in ("alice", "bob")):
                        return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(renewed(), 30)
        assert await app.converged({"alice", "bob"}) > epoch
        assert all(not r for r in app.rejected.values())
    finally:
        await app.close()


async def test_a_member_whose_credential_expired_is_removed(tmp_path: Path) -> None:
    """carol's app never renews her credential (valid 12 s): when it expires the DS removes
    her (an expired leaf would make every joiner refuse the group)."""
    app = App(tmp_path, credential_margin=5.0)
    await app.server.start()
    try:
        await app.join("alice")
        await app.join("bob")
        await app.join(
            "carol",
            get_credential=app.issuer("carol", timedelta(seconds=12)),
            credential_renewal=-3600.0,  # "renew" long after it expired: never in time
        )
        await app.converged({"alice", "bob", "carol"})
        carol = app.sessions.pop("carol")
        await app.converged({"alice", "bob"}, timeout=30)
        await carol.stop(leave=False)
        await carol.ds.close()
    finally:
        await app.close()
