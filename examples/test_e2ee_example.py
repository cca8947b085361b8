"""Prove in your own CI that your LiveKit calls are end-to-end encrypted with livekit-mls.

Copy this file into your test suite. With livekit-mls installed, the pytest plugin
``livekit_mls`` provides the fixtures; it starts a real livekit-server (set
LIVEKIT_MLS_LIVEKIT_SERVER to its binary) and the delivery service on loopback.

    pytest examples/test_e2ee_example.py

Every check listens to decoded audio: each participant publishes a sine tone, and "hears"
means the tone's frequency dominates what it decodes (undecryptable audio decodes to
silence or noise, never to the tone).
"""

from __future__ import annotations

import pytest

from mls_provider.testing.assertions import (
    assert_cannot_hear,
    assert_everyone_hears_everyone,
    assert_keys_agree,
    wait_converged,
)
from mls_provider.testing.plugin import ParticipantFactory

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(120)]


async def test_everyone_hears_everyone_and_agrees_on_keys(participants: ParticipantFactory) -> None:
    alice = await participants.join("alice", tone_hz=440)
    bob = await participants.join("bob", tone_hz=660)
    carol = await participants.join("carol", tone_hz=880)

    epoch = await wait_converged([alice, bob, carol])  # same epoch, roster, verification code
    assert_keys_agree([alice, bob, carol], epoch)  # byte-identical keys in every key provider
    await assert_everyone_hears_everyone([alice, bob, carol])


async def test_a_participant_who_leaves_loses_access(participants: ParticipantFactory) -> None:
    alice = await participants.join("alice", tone_hz=440)
    bob = await participants.join("bob", tone_hz=660)
    mallory = await participants.join("mallory", tone_hz=550)
    await assert_everyone_hears_everyone([alice, bob, mallory])

    # mallory leaves the MLS group but stays in the LiveKit room, still sending
    await mallory.leave(disconnect=False)
    await wait_converged([alice, bob])
    await assert_cannot_hear(mallory, alice)  # she cannot decrypt the new keys
    await assert_cannot_hear(alice, mallory)  # and nothing she sends decrypts any more
    await assert_everyone_hears_everyone([alice, bob])


async def test_an_outsider_without_keys_hears_nothing(participants: ParticipantFactory) -> None:
    alice = await participants.join("alice", tone_hz=440)
    eve = await participants.join("eve", mls=False)  # in the LiveKit room, not in the group
    await assert_cannot_hear(eve, alice)  # alice's track reaches her; it does not decrypt
