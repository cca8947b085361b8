"""The MLS key provider on a real livekit-server with the real delivery service.

Every assertion is on decoded audio content (a tone's frequency and power) or on the keys
LiveKit's key provider actually holds (``export_key``).
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from livekit import rtc

from mls_provider.session import SessionConfig
from mls_provider.testing.assertions import (
    assert_cannot_hear,
    assert_everyone_hears_everyone,
    assert_hears,
    assert_keys_agree,
    wait_converged,
)
from mls_provider.testing.plugin import ParticipantFactory

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(180)]

TONES = {"alice": 440.0, "bob": 660.0, "carol": 880.0, "dave": 1100.0, "erin": 550.0}


async def test_members_join_one_by_one_and_hear_everyone(participants: ParticipantFactory) -> None:
    """After each join: everyone hears everyone, keys per identity and epoch are identical
    in every member's key provider, and verification codes match."""
    joined = []
    epochs = []
    for name in ("alice", "bob", "carol"):
        joined.append(await participants.join(name, tone_hz=TONES[name]))
        epoch = await wait_converged(joined)
        epochs.append(epoch)
        assert_keys_agree(joined, epoch)
        await assert_everyone_hears_everyone(joined)
    assert epochs == sorted(set(epochs)), f"every join must start a new epoch: {epochs}"
    codes = {p.verification_code for p in joined}
    assert len(codes) == 1
    code = codes.pop()
    assert code is not None and len(code.replace(" ", "")) == 30
    # each identity's key differs from the others' at the same epoch
    epoch = epochs[-1]
    assert len({joined[0].installed_key(p.identity, epoch) for p in joined}) == len(joined)


async def test_left_and_killed_participants_lose_access(participants: ParticipantFactory) -> None:
    """A graceful leaver that stays in the LiveKit room and a killed participant: after the
    rotation each removed one hears nothing of the room, and nothing it sends decrypts."""
    alice = await participants.join("alice", tone_hz=TONES["alice"])
    bob = await participants.join("bob", tone_hz=TONES["bob"])
    carol = await participants.join("carol", tone_hz=TONES["carol"])
    dave_process = await participants.spawn("dave", tone_hz=TONES["dave"])
    dave = participants.new("dave", tone_hz=TONES["dave"])  # a handle to read dave's tone
    everyone = ["alice", "bob", "carol", "dave"]
    before = await wait_converged([alice, bob, carol], roster=everyone)
    await assert_everyone_hears_everyone([alice, bob, carol])
    await assert_hears(alice, dave)

    # carol leaves the MLS group but keeps her LiveKit connection and keeps sending
    assert carol.e2ee is not None
    await carol.e2ee.aclose(leave=True)
    after = await wait_converged([alice, bob], timeout=10, roster=["alice", "bob", "dave"])
    assert after > before
    await assert_cannot_hear(alice, carol)
    await assert_cannot_hear(bob, carol)
    await assert_cannot_hear(carol, alice)
    await assert_cannot_hear(carol, bob)
    await assert_hears(alice, bob)
    await assert_hears(bob, alice)

    # dave's process is killed: no goodbye at all
    dave_process.send_signal(signal.SIGKILL)
    dave_process.wait()
    assert alice.e2ee is not None and alice.e2ee.session is not None
    await alice.e2ee.session.wait_until(lambda s: "dave" not in s.members, timeout=30)
    epoch = await wait_converged([alice, bob], timeout=10)
    assert_keys_agree([alice, bob], epoch)
    await assert_everyone_hears_everyone([alice, bob])


async def test_joiner_cannot_decrypt_media_from_before_it_joined(
    participants: ParticipantFactory,
) -> None:
    """Media encrypted under an epoch key from before a join stays undecryptable to the
    joiner, while members of that epoch still decrypt it."""
    # old slots stay for the whole test: with the default 2 s grace bob's wipe raced the
    # hearing checks below
    keep = SessionConfig(old_key_grace=120.0)
    alice = await participants.join("alice", tone_hz=TONES["alice"], config=keep)
    bob = await participants.join("bob", tone_hz=TONES["bob"], config=keep)
    old_epoch = await wait_converged([alice, bob])
    carol = await participants.join("carol", tone_hz=TONES["carol"], config=keep)
    new_epoch = await wait_converged([alice, bob, carol])
    await assert_everyone_hears_everyone([alice, bob, carol])

    # alice sends with her pre-join key again (still installed at bob within the grace
    # period; carol never had it)
    assert alice.e2ee is not None and alice.e2ee.sink is not None
    for cryptor in alice.room.e2ee_manager.frame_cryptors():
        if cryptor.participant_identity == "alice":
            cryptor.set_key_index(old_epoch % alice.ring_size)
    assert carol.installed_key("alice", old_epoch) != alice.installed_key("alice", old_epoch)
    await assert_cannot_hear(carol, alice, timeout=5)
    await assert_hears(bob, alice)  # the control: a member of that epoch still decrypts it
    assert new_epoch % alice.ring_size != old_epoch % alice.ring_size


async def test_participant_without_mls_never_hears_anyone(participants: ParticipantFactory) -> None:
    """E2EE enabled but not in the MLS group (no keys), and E2EE off entirely: neither
    ever decodes anyone's tone, while members hear each other."""
    alice = await participants.join("alice", tone_hz=TONES["alice"])
    bob = await participants.join("bob", tone_hz=TONES["bob"])
    eve = await participants.join("eve", mls=False, encrypted=True)
    mallory = await participants.join("mallory", mls=False, encrypted=False)
    await wait_converged([alice, bob])
    await assert_everyone_hears_everyone([alice, bob])
    for outsider in (eve, mallory):
        for speaker in (alice, bob):
            recorder = await outsider.recorder(speaker.identity)
            await asyncio.sleep(1.5)
            assert not await outsider.hears(speaker, timeout=2), (
                f"{outsider.identity} hears {speaker.identity}: {outsider.describe_audio(speaker)}"
            )
            assert recorder.frames_received > 0  # it receives the track, only cannot decrypt
    missing = [e for e in eve.state_events if e.state == rtc.EncryptionState.MISSING_KEY]
    assert {e.identity for e in missing} >= {"alice", "bob"}
    assert "eve" not in alice.members and "mallory" not in alice.members
