"""Assertions for end-to-end tests: who hears whom, and whether members agree."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from mls_provider.testing.participant import Participant


async def assert_hears(listener: Participant, speaker: Participant, timeout: float = 10.0) -> None:
    assert await listener.hears(speaker, timeout), (
        f"{listener.identity} does not hear {speaker.identity}: {listener.describe_audio(speaker)}"
    )


async def assert_cannot_hear(
    listener: Participant, speaker: Participant, timeout: float = 10.0
) -> None:
    # the speaker's track must reach the listener: only its content may not decode
    recorder = await listener.recorder(speaker.identity, timeout)
    received = recorder.frames_received
    assert await listener.cannot_hear(speaker, timeout), (
        f"{listener.identity} still hears {speaker.identity}: {listener.describe_audio(speaker)}"
    )
    assert recorder.frames_received > received, (
        f"{listener.identity} gets no frames of {speaker.identity}'s track at all"
    )


async def assert_everyone_hears_everyone(
    participants: Sequence[Participant], timeout: float = 10.0
) -> None:
    checks = [
        assert_hears(listener, speaker, timeout)
        for listener in participants
        for speaker in participants
        if listener is not speaker and speaker.tone_hz is not None
    ]
    await asyncio.gather(*checks)


async def wait_converged(
    participants: Sequence[Participant],
    timeout: float = 15.0,
    *,
    roster: Sequence[str] | None = None,
) -> int:
    """Waits until all are in the same executed epoch with the same roster (``roster``, by
    default exactly these participants) and the same verification code; returns the epoch."""
    names = sorted(roster if roster is not None else [p.identity for p in participants])
    deadline = time.monotonic() + timeout
    while True:
        epochs = {p.epoch for p in participants}
        executed = {p.executed_epoch for p in participants}
        codes = {p.verification_code for p in participants}
        rosters = {tuple(sorted(p.members)) for p in participants}
        if (
            len(epochs) == 1
            and epochs == executed
            and len(codes) == 1
            and rosters == {tuple(names)}
        ):
            epoch = epochs.pop()
            assert epoch is not None
            return epoch
        if time.monotonic() >= deadline:
            state = {p.identity: (p.epoch, p.executed_epoch, p.members) for p in participants}
            raise AssertionError(f"participants did not converge: {state}")
        await asyncio.sleep(0.02)


def assert_keys_agree(participants: Sequence[Participant], epoch: int) -> None:
    """Every participant holds byte-identical key material for every member at ``epoch``."""
    for identity in (p.identity for p in participants):
        keys = {p.installed_key(identity, epoch) for p in participants}
        assert len(keys) == 1, f"members hold different keys for {identity} at epoch {epoch}"
        assert len(next(iter(keys))) == 32
