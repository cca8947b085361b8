"""LiveKit smoke test on a real server: pins the SDK behaviour our key provider relies on.

Per-participant E2EE (``shared_key=None``, HKDF, no auto-ratchet, ``failure_tolerance=0``):

* a receiver decodes a sender's tone only with the sender's key at the index the sender's
  *local FrameCryptor* uses (``set_key_index``), not the last index passed to ``set_key``;
* when the sender switches to an index the receiver has no key for, the tone stops and the
  receiver gets ``e2ee_state_changed(sender, MISSING_KEY | DECRYPTION_FAILED)``;
* installing that key afterwards brings the tone back without any other action;
* a participant without encryption options never hears the tone.

Plus a check of the test harness itself: a second server (async context manager) with a
webhook URL delivers signed ``participant_joined``/``participant_left`` events.

All assertions are on decoded audio content (an AudioStream yields frames even when nothing
decrypts). Timings are printed (``pytest -s``) and summarised in docs/livekit-e2e-notes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from livekit import api, rtc

from mls_provider.testing import (
    LiveKitServer,
    TonePublisher,
    ToneRecorder,
    assert_silent_or_not_tone,
    describe,
    hears_tone,
    wait_for_no_tone,
    wait_for_tone,
)

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(60)]

TONE_HZ = 440.0
ALICE, BOB, CAROL = "alice", "bob", "carol"
# Non-zero on purpose: new sender cryptors start at index 0, so hearing the tone proves that
# set_key_index on alice's local cryptor took effect.
INDEX_IN_USE = 3
INDEX_BOB_LACKS = 7
CONNECT_TIMEOUT = 15.0
EVENT_TIMEOUT = 10.0
FAILURE_STATES = (rtc.EncryptionState.MISSING_KEY, rtc.EncryptionState.DECRYPTION_FAILED)


def per_participant_e2ee() -> rtc.E2EEOptions:
    """The options our key provider uses: keys per identity, MLS owns the key schedule."""
    options = rtc.E2EEOptions()
    kp = options.key_provider_options
    kp.shared_key = None  # per-participant mode (decided once, at connect)
    kp.key_derivation_function = rtc.KeyDerivationFunction.HKDF
    kp.ratchet_window_size = 0  # no auto-ratchet: a wrong/missing key must stay a failure
    kp.failure_tolerance = 0  # >= 0, otherwise DECRYPTION_FAILED is never surfaced
    kp.key_ring_size = 16
    return options


@dataclass
class Peer:
    """A connected participant and the e2ee states it observed (time, identity, state)."""

    identity: str
    room: rtc.Room
    states: list[tuple[float, str | None, rtc.EncryptionState.ValueType]] = field(
        default_factory=list
    )

    @property
    def key_provider(self) -> rtc.KeyProvider:
        kp = self.room.e2ee_manager.key_provider
        assert kp is not None
        return kp

    def states_of(self, identity: str, since: int = 0) -> list[rtc.EncryptionState.ValueType]:
        return [s for _, who, s in self.states[since:] if who == identity]


async def join(server: LiveKitServer, room_name: str, identity: str, *, encrypted: bool) -> Peer:
    room = rtc.Room()
    peer = Peer(identity, room)

    @room.on("e2ee_state_changed")
    def _on_state(
        participant: rtc.Participant | None, state: rtc.EncryptionState.ValueType
    ) -> None:
        who = participant.identity if participant is not None else None
        peer.states.append((time.monotonic(), who, state))

    options = rtc.RoomOptions(auto_subscribe=True)
    if encrypted:
        options.encryption = per_participant_e2ee()
    await asyncio.wait_for(
        room.connect(server.url, server.token(identity, room_name), options), CONNECT_TIMEOUT
    )
    return peer


async def wait_until(predicate: Callable[[], bool], timeout: float, message: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s: {message}")
        await asyncio.sleep(0.02)


async def subscribed_audio(
    peer: Peer, publisher: str
) -> tuple[rtc.Track, rtc.RemoteTrackPublication]:
    """Wait until ``peer`` is subscribed to ``publisher``'s audio track."""
    found: list[tuple[rtc.Track, rtc.RemoteTrackPublication]] = []

    def check() -> bool:
        participant = peer.room.remote_participants.get(publisher)
        for pub in participant.track_publications.values() if participant else ():
            if pub.kind == rtc.TrackKind.KIND_AUDIO and pub.track is not None:
                found.append((pub.track, pub))
                return True
        return False

    await wait_until(check, EVENT_TIMEOUT, f"{peer.identity} subscribed to {publisher}'s audio")
    return found[0]


async def local_cryptor(peer: Peer, track_sid: str) -> rtc.FrameCryptor:
    """The sender-side FrameCryptor of ``peer``'s own track ``track_sid``."""

    def find() -> rtc.FrameCryptor | None:
        for c in peer.room.e2ee_manager.frame_cryptors():
            if c.participant_identity == peer.identity and c.track_sid == track_sid:
                return c
        return None

    await wait_until(lambda: find() is not None, EVENT_TIMEOUT, "local frame cryptor exists")
    cryptor = find()
    assert cryptor is not None
    return cryptor


async def disconnect_all(peers: list[Peer]) -> None:
    for peer in peers:
        if peer.room.isconnected():
            # A hung disconnect must not block the other rooms' teardown.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.room.disconnect(), 10.0)


async def start_alice_tone(alice: Peer, key: bytes) -> tuple[TonePublisher, rtc.FrameCryptor]:
    """Alice installs her key at INDEX_IN_USE, publishes the tone and points her cryptor at it."""
    alice.key_provider.set_key(ALICE, key, INDEX_IN_USE)
    publisher = TonePublisher(alice.room, TONE_HZ)
    await publisher.start()
    # The cryptor exists once publish_track returns; until set_key_index it would encrypt with
    # index 0, where alice has no key (such frames are dropped, nothing is sent).
    cryptor = await local_cryptor(alice, publisher.track_sid)
    cryptor.set_key_index(INDEX_IN_USE)
    return publisher, cryptor


async def test_key_index_switch_gates_decoded_audio(livekit_server: LiveKitServer) -> None:
    room_name = f"smoke-{uuid.uuid4().hex[:8]}"
    key_in_use, key_next = secrets.token_bytes(32), secrets.token_bytes(32)
    peers: list[Peer] = []
    publisher: TonePublisher | None = None
    recorder: ToneRecorder | None = None
    try:
        t0 = time.monotonic()
        alice = await join(livekit_server, room_name, ALICE, encrypted=True)
        peers.append(alice)
        bob = await join(livekit_server, room_name, BOB, encrypted=True)
        peers.append(bob)
        t_connected = time.monotonic()
        # Bob gets alice's current key only; alice also holds the next one (a later epoch).
        bob.key_provider.set_key(ALICE, key_in_use, INDEX_IN_USE)
        alice.key_provider.set_key(ALICE, key_next, INDEX_BOB_LACKS)

        publisher, cryptor = await start_alice_tone(alice, key_in_use)
        t_published = time.monotonic()
        track, pub = await subscribed_audio(bob, ALICE)
        assert pub.encryption_type == rtc.EncryptionType.GCM
        recorder = ToneRecorder(track)

        # 1. Bob decodes the tone.
        assert await wait_for_tone(recorder, TONE_HZ, EVENT_TIMEOUT), (
            f"bob never heard alice: {describe(recorder.window(0.5), TONE_HZ)}; "
            f"bob saw {bob.states}"
        )
        t_heard = time.monotonic()
        await wait_until(
            lambda: rtc.EncryptionState.OK in bob.states_of(ALICE),
            EVENT_TIMEOUT,
            f"bob reports OK for alice (saw {bob.states})",
        )

        # 2. Alice switches to an index bob has no key for: content and events must show it.
        mark = len(bob.states)
        t_switch = time.monotonic()
        cryptor.set_key_index(INDEX_BOB_LACKS)
        # The FFI reports the sender cryptor's index (fresh query, not the Python object).
        assert (await local_cryptor(alice, publisher.track_sid)).key_index == INDEX_BOB_LACKS
        await wait_until(
            lambda: any(s in FAILURE_STATES for s in bob.states_of(ALICE, mark)),
            EVENT_TIMEOUT,
            f"bob reports MISSING_KEY/DECRYPTION_FAILED for alice (saw {bob.states[mark:]})",
        )
        t_failure_event = time.monotonic()
        assert await wait_for_no_tone(recorder, TONE_HZ, EVENT_TIMEOUT), (
            f"bob still hears alice after the switch: {describe(recorder.window(0.5), TONE_HZ)}"
        )
        t_quiet = time.monotonic()
        await asyncio.sleep(1.0)  # ... and it stays that way, not a glitch
        quiet = recorder.since(t_quiet)
        assert_silent_or_not_tone(quiet, TONE_HZ)
        failure_states = [rtc.EncryptionState.Name(s) for s in bob.states_of(ALICE, mark)]

        # 3. Recovery: bob installs the key for the new index, nothing else.
        mark = len(bob.states)
        t_key = time.monotonic()
        bob.key_provider.set_key(ALICE, key_next, INDEX_BOB_LACKS)
        assert await wait_for_tone(recorder, TONE_HZ, EVENT_TIMEOUT), (
            f"bob did not recover: {describe(recorder.window(0.5), TONE_HZ)}; "
            f"bob saw {bob.states[mark:]}"
        )
        t_recovered = time.monotonic()
        await wait_until(
            lambda: rtc.EncryptionState.OK in bob.states_of(ALICE, mark),
            EVENT_TIMEOUT,
            f"bob reports OK for alice after recovery (saw {bob.states[mark:]})",
        )
        timeline = [(f"{t - t0:.2f}", rtc.EncryptionState.Name(x)) for t, _, x in bob.states]
        print(
            f"\nconnect both {t_connected - t0:.2f} s; publish->tone {t_heard - t_published:.2f} s"
            f"; switch->{'/'.join(failure_states)} {t_failure_event - t_switch:.2f} s"
            f"; switch->no tone {t_quiet - t_switch:.2f} s; key->tone {t_recovered - t_key:.2f} s"
            f"\nbob after the switch: {describe(quiet, TONE_HZ)}"
            f"\nbob's e2ee states for alice: {timeline}"
        )
    finally:
        if recorder is not None:
            await recorder.aclose()
        if publisher is not None:
            await publisher.stop(unpublish=False)  # the disconnect below unpublishes
        await disconnect_all(peers)


async def test_participant_without_e2ee_does_not_hear_tone(livekit_server: LiveKitServer) -> None:
    room_name = f"smoke-{uuid.uuid4().hex[:8]}"
    key = secrets.token_bytes(32)
    peers: list[Peer] = []
    publisher: TonePublisher | None = None
    recorders: list[ToneRecorder] = []
    try:
        alice = await join(livekit_server, room_name, ALICE, encrypted=True)
        peers.append(alice)
        bob = await join(livekit_server, room_name, BOB, encrypted=True)
        peers.append(bob)
        carol = await join(livekit_server, room_name, CAROL, encrypted=False)
        peers.append(carol)
        bob.key_provider.set_key(ALICE, key, INDEX_IN_USE)

        publisher, _ = await start_alice_tone(alice, key)
        bob_track, _ = await subscribed_audio(bob, ALICE)
        carol_track, carol_pub = await subscribed_audio(carol, ALICE)
        # The server tells even non-E2EE participants that the track is encrypted.
        assert carol_pub.encryption_type == rtc.EncryptionType.GCM
        bob_rec, carol_rec = ToneRecorder(bob_track), ToneRecorder(carol_track)
        recorders += [bob_rec, carol_rec]

        # Bob (the positive control) hears the tone, so it is on the wire right now ...
        assert await wait_for_tone(bob_rec, TONE_HZ, EVENT_TIMEOUT), describe(
            bob_rec.window(0.5), TONE_HZ
        )
        t_start = time.monotonic()
        await asyncio.sleep(1.5)
        # ... during the same interval carol, decoding ciphertext, must not.
        bob_audio, carol_audio = bob_rec.since(t_start), carol_rec.since(t_start)
        assert hears_tone(bob_audio, TONE_HZ), describe(bob_audio, TONE_HZ)
        assert carol_audio.size > 0.5 * bob_audio.size, "carol's stream produced no frames"
        assert_silent_or_not_tone(carol_audio, TONE_HZ)
        # No key provider, no cryptors: carol gets no e2ee events at all, only garbage audio.
        assert carol.states == []
        print(f"\nbob: {describe(bob_audio, TONE_HZ)}\ncarol: {describe(carol_audio, TONE_HZ)}")
    finally:
        for rec in recorders:
            await rec.aclose()
        if publisher is not None:
            await publisher.stop(unpublish=False)  # the disconnect below unpublishes
        await disconnect_all(peers)


async def test_server_harness_webhooks_and_tokens() -> None:
    """A second, independent server: own ports/key, signed webhooks, tokens it accepts."""
    events: asyncio.Queue[api.WebhookEvent] = asyncio.Queue()
    app = web.Application()
    runner = web.AppRunner(app)
    server: LiveKitServer | None = None

    async def on_webhook(request: web.Request) -> web.Response:
        assert server is not None
        receiver = api.WebhookReceiver(api.TokenVerifier(server.api_key, server.api_secret))
        # raises on a bad signature or a body whose sha256 does not match the token
        events.put_nowait(receiver.receive(await request.text(), request.headers["Authorization"]))
        return web.Response(text="ok")

    app.router.add_post("/livekit/webhook", on_webhook)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    peers: list[Peer] = []
    try:
        server = LiveKitServer(webhook_urls=[f"http://127.0.0.1:{port}/livekit/webhook"])
        async with server:
            assert server.running and server.url.startswith("ws://127.0.0.1:")
            room_name = f"hooks-{uuid.uuid4().hex[:8]}"
            peers.append(await join(server, room_name, BOB, encrypted=True))

            async def next_event(kind: str) -> api.WebhookEvent:
                while True:
                    event = await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
                    if event.event == kind:
                        return event

            joined = await next_event("participant_joined")
            assert (joined.room.name, joined.participant.identity) == (room_name, BOB)
            await disconnect_all(peers)
            left = await next_event("participant_left")
            assert (left.room.name, left.participant.identity) == (room_name, BOB)
            pid = server.pid
        assert not server.running and pid is not None
    finally:
        await disconnect_all(peers)
        await runner.cleanup()
