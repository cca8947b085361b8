"""Authority mode on a real livekit-server: the delivery service itself is hostile.

It advertises the app's identity authority but adds whoever asks — here mallory, holding a
LiveKit token the LiveKit operator minted for her and no credential from the app's
authority. The honest members never commit her Add, never install a key for her, and she
decodes none of their audio; before she tried, they heard each other.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from delivery_service.ordering import CommitOrdering, OrderingConfig
from delivery_service.server import DeliveryServer
from delivery_service.settings import DS_IDENTITY, Settings
from mls_provider import mls
from mls_provider.authority import IdentityAuthority
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.session import RejectedMember, SessionConfig
from mls_provider.testing.assertions import assert_cannot_hear, assert_hears, wait_converged
from mls_provider.testing.livekit_server import LiveKitServer
from mls_provider.testing.participant import Participant
from mls_provider.testing.tokens import credential_source

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(180)]


class HostileOrdering(CommitOrdering):
    """Tells members it checks the app's authority; checks nothing."""

    def __init__(self, honest: CommitOrdering, advertised: tuple[bytes, ...]) -> None:
        super().__init__(honest.observer, replace(honest.config, authority_keys=()))
        self.advertised = advertised

    def room_config(self, state: object) -> pb.RoomConfig:
        config = super().room_config(state)  # type: ignore[arg-type]
        config.authority_keys.extend(self.advertised)
        return config


@pytest.fixture
async def hostile_ds(
    livekit_server: LiveKitServer, tmp_path: Path
) -> AsyncIterator[tuple[DeliveryServer, IdentityAuthority]]:
    authority = IdentityAuthority.generate()
    secret = mls.SignatureKeyPair.generate().secret_key
    (tmp_path / "ds.key").write_text(secret.hex())
    ds = DeliveryServer(
        Settings(
            livekit_api_key=livekit_server.api_key,
            livekit_api_secret=livekit_server.api_secret,
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            store="memory://",
            ds_key_file=str(tmp_path / "ds.key"),
            ordering=OrderingConfig(authority_keys=(authority.public_key,)),
        )
    )
    await ds.start()
    assert ds.manager is not None
    pair = mls.SignatureKeyPair.from_secret(secret)
    honest = ds.manager.ordering
    honest.observer = mls.ExternalObserver(DS_IDENTITY, pair)  # checks no credential
    ds.manager.ordering = HostileOrdering(honest, (authority.public_key,))
    yield ds, authority
    await ds.stop()


async def test_a_hostile_ds_cannot_give_an_intruder_a_key(
    livekit_server: LiveKitServer,
    hostile_ds: tuple[DeliveryServer, IdentityAuthority],
) -> None:
    ds, authority = hostile_ds
    room = f"authority-{secrets.token_hex(3)}"
    assert ds.observer is not None
    target = f"127.0.0.1:{ds.grpc_port}"

    def member(identity: str, tone_hz: float, config: SessionConfig) -> Participant:
        return Participant(
            identity,
            livekit_url=livekit_server.url,
            token=livekit_server.token(identity, room),
            ds_target=target,
            ds_public_key=ds.observer.public_key if ds.observer else None,
            tone_hz=tone_hz,
            config=config,
        )

    def vouched(identity: str) -> SessionConfig:
        return SessionConfig(
            authority_keys=(authority.public_key,),
            get_credential=credential_source(authority, identity, room),
        )

    alice = member("alice", 440.0, vouched("alice"))
    bob = member("bob", 660.0, vouched("bob"))
    rejected: list[RejectedMember] = []
    participants = [alice, bob]
    try:
        await alice.join()
        assert alice.e2ee is not None
        alice.e2ee.on("member_rejected", rejected.append)
        await bob.join()
        await wait_converged([alice, bob])
        await assert_hears(alice, bob)
        await assert_hears(bob, alice)

        # mallory: a token from the LiveKit operator, an open-mode client (basic credential)
        mallory = member("mallory", 880.0, SessionConfig())
        participants.append(mallory)
        await mallory.room.connect(livekit_server.url, mallory.token, mallory._options())
        assert mallory.e2ee is not None
        attach = asyncio.ensure_future(mallory.e2ee.attach(mallory.room))
        await asyncio.wait_for(attach, 20)  # her key package is taken; she waits for a Welcome
        for _ in range(500):  # the designated committer refuses her Add and says why
            if rejected:
                break
            await asyncio.sleep(0.02)
        assert rejected and rejected[0].identity == "mallory", rejected
        assert "not vouched for" in rejected[0].reason
        await assert_cannot_hear(mallory, alice)
        await assert_cannot_hear(mallory, bob)
        for honest in (alice, bob):
            provider = honest.room.e2ee_manager.key_provider
            keys = [provider.export_key("mallory", i) for i in range(honest.ring_size)]
            assert not any(keys), f"{honest.identity} holds a key for mallory"
        assert mallory.epoch is None  # never in any group
    finally:
        await asyncio.gather(*(p.close() for p in participants), return_exceptions=True)
