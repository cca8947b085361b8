"""Presence on a real livekit-server: a participant that vanishes is removed by the delivery
service once its event stream has been gone for the presence timeout (default 3 s), not
after LiveKit's ping timeout and webhook (~20 s), and loses access to the room's media.

Assertions are on decoded audio and on which mechanism the DS logged for the removal.
"""

from __future__ import annotations

import signal

import pytest

from mls_provider.testing.assertions import (
    assert_cannot_hear,
    assert_everyone_hears_everyone,
    assert_hears,
    assert_keys_agree,
    wait_converged,
)
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.plugin import ParticipantFactory

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(180)]


def removal_messages(ds: DeliveryServiceProcess, room: str, identity: str) -> list[str]:
    """The DS's log messages that removed ``identity`` from ``room``, in order."""
    kinds = (f"vanished room={room} identity={identity}", f"leave room={room} identity={identity}")
    messages = [str(r.get("msg", "")) for r in ds.log_lines()]
    return [
        m
        for m in messages
        if m.startswith(kinds)
        or (m.startswith("webhook") and f"room={room} identity={identity} removed=True" in m)
        or m.startswith(f"disconnect reported room={room} identity={identity}")
    ]


async def test_a_killed_participant_is_removed_by_presence(
    participants: ParticipantFactory, delivery_service: DeliveryServiceProcess, room_name: str
) -> None:
    """dave's process is SIGKILLed (no goodbye; LiveKit keeps him for its ping timeout): the
    DS removes him because his stream is gone, the others rotate and still hear each other."""
    alice = await participants.join("alice", tone_hz=440.0)
    bob = await participants.join("bob", tone_hz=660.0)
    dave = await participants.spawn("dave", tone_hz=1100.0)
    await wait_converged([alice, bob], roster=["alice", "bob", "dave"])
    dave.send_signal(signal.SIGKILL)
    dave.wait()
    assert alice.e2ee is not None and alice.e2ee.session is not None
    await alice.e2ee.session.wait_until(lambda s: "dave" not in s.members, timeout=30)
    epoch = await wait_converged([alice, bob], roster=["alice", "bob"])
    assert_keys_agree([alice, bob], epoch)
    await assert_everyone_hears_everyone([alice, bob])
    # the first thing that removed dave was presence, not a LiveKit webhook or a report
    removals = removal_messages(delivery_service, room_name, "dave")
    assert removals and removals[0].startswith("vanished"), removals


async def test_a_member_cut_off_from_the_ds_stops_being_heard(
    participants: ParticipantFactory, delivery_service: DeliveryServiceProcess, room_name: str
) -> None:
    """carol loses her connection to the DS but stays in the LiveKit room, still sending her
    tone with her last key: once the DS removed her for her missing stream, alice and bob
    no longer decrypt her and she no longer decrypts them."""
    alice = await participants.join("alice", tone_hz=440.0)
    bob = await participants.join("bob", tone_hz=660.0)
    carol = await participants.join("carol", tone_hz=880.0)
    before = await wait_converged([alice, bob, carol])
    await assert_everyone_hears_everyone([alice, bob, carol])
    assert carol.e2ee is not None
    await carol.e2ee.aclose(leave=False)  # stream and channel gone; LiveKit and tone go on
    after = await wait_converged([alice, bob], timeout=20, roster=["alice", "bob"])
    assert after > before
    await assert_cannot_hear(alice, carol)
    await assert_cannot_hear(bob, carol)
    await assert_cannot_hear(carol, alice)
    await assert_hears(alice, bob)
    await assert_hears(bob, alice)
    removals = removal_messages(delivery_service, room_name, "carol")
    assert removals and removals[0].startswith("vanished"), removals
