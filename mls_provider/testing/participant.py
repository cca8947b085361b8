"""Participants for end-to-end tests: a real ``rtc.Room`` with livekit-mls keys.

:class:`Participant` connects to a LiveKit server, joins the room's MLS group through
:class:`~mls_provider.MlsE2EE`, optionally publishes a sine tone, decodes every remote
audio track, and records E2EE state events and data messages — so tests can assert "X
hears Y", "X cannot decrypt Y", and compare installed keys across members.

``python -m mls_provider.testing.participant ...`` runs one participant in its own process
(for tests that ``kill -9`` a participant; :func:`spawn_participant` starts one); it prints
``READY <epoch>`` once in the group. With ``--events`` it also prints ``EVENT <json>``
lines (session events, E2EE state changes, tones heard) for a parent that follows it,
e.g. the scenario runner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, cast

from livekit import rtc

from mls_provider.authority import IdentityAuthority
from mls_provider.e2ee import MlsE2EE, encryption_options
from mls_provider.events import Callback
from mls_provider.keys import DEFAULT_RING_SIZE, key_index
from mls_provider.session import EpochInfo, SessionConfig
from mls_provider.testing._process import pdeathsig_prefix
from mls_provider.testing.audio import (
    SAMPLE_RATE,
    TonePublisher,
    ToneRecorder,
    describe,
    dominant_frequency,
    hears_tone,
    wait_for_no_tone,
    wait_for_tone,
)
from mls_provider.testing.members import SESSION_EVENTS
from mls_provider.testing.tokens import credential_source
from mls_provider.transport import DeliveryClient


@dataclass(frozen=True)
class StateEvent:
    at: float
    identity: str  # whose cryptor changed state (the sender, for receive cryptors)
    state: int  # an rtc.EncryptionState value


@dataclass(frozen=True)
class DataMessage:
    at: float
    sender: str
    payload: bytes


class Participant:
    """One LiveKit participant. ``mls=False`` joins the LiveKit room without any MLS key
    (with E2EE enabled but no keys, or with ``encrypted=False`` without E2EE at all).

    ``tone_buffer_ms`` is the audio queued ahead of the encoder: 100 ms keeps the tone's
    latency low; a talker sharing its event loop with many other participants needs more,
    or a stall of the loop longer than the buffer sends silence (a gap the test did make).
    ``config`` tunes the MLS session (e.g. a longer ``old_key_grace``).
    """

    def __init__(
        self,
        identity: str,
        *,
        livekit_url: str,
        token: str,
        ds_target: str = "",
        ds_public_key: bytes | None = None,
        tone_hz: float | None = None,
        tone_buffer_ms: int = 100,
        mls: bool = True,
        encrypted: bool = True,
        subscribe: bool = True,
        ring_size: int = DEFAULT_RING_SIZE,
        config: SessionConfig | None = None,
    ) -> None:
        self.identity = identity
        self.subscribe = subscribe
        self.livekit_url = livekit_url
        self.token = token
        self.tone_hz = tone_hz
        self.tone_buffer_ms = tone_buffer_ms
        self.mls = mls
        self.encrypted = encrypted
        self.ring_size = ring_size
        self.room = rtc.Room()
        self.e2ee: MlsE2EE | None = (
            MlsE2EE(
                ds_target, token, ds_public_key=ds_public_key, ring_size=ring_size, config=config
            )
            if mls
            else None
        )
        self.publisher: TonePublisher | None = None
        self.recorders: dict[str, ToneRecorder] = {}
        self.state_events: list[StateEvent] = []
        self.data: list[DataMessage] = []
        self._track_arrived = asyncio.Event()
        # speakers whose recorded track went away: a new track of theirs (a re-join with the
        # same identity) replaces the old recorder instead of being ignored
        self._stale_recorders: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_unsubscribed)
        self.room.on("e2ee_state_changed", self._on_e2ee_state)
        self.room.on("data_received", self._on_data)

    def __repr__(self) -> str:
        return f"<Participant {self.identity} epoch={self.epoch}>"

    # ---- lifecycle -----------------------------------------------------------------

    def _options(self) -> rtc.RoomOptions:
        if self.e2ee is not None:
            return rtc.RoomOptions(
                auto_subscribe=self.subscribe, encryption=self.e2ee.encryption_options()
            )
        if self.encrypted:  # E2EE on, but never any key
            return rtc.RoomOptions(
                auto_subscribe=self.subscribe, encryption=encryption_options(self.ring_size)
            )
        return rtc.RoomOptions(auto_subscribe=self.subscribe)

    async def join(self, timeout: float = 20.0) -> None:
        """Connects, joins the MLS group (waits until in it) and starts the tone."""
        await asyncio.wait_for(
            self.room.connect(self.livekit_url, self.token, self._options()), timeout
        )
        if self.e2ee is not None:
            await self.e2ee.attach(self.room)
            assert self.e2ee.session is not None
            await self.e2ee.session.wait_until(lambda s: s.executed_epoch >= 0, timeout)
        if self.tone_hz is not None:
            self.publisher = TonePublisher(
                self.room, self.tone_hz, queue_size_ms=self.tone_buffer_ms
            )
            await self.publisher.start()

    async def leave(self, *, disconnect: bool = True) -> None:
        """Leaves the MLS group; with ``disconnect`` also the LiveKit room."""
        if self.e2ee is not None:
            await self.e2ee.aclose(leave=True)
        if disconnect:
            await self.close()

    async def close(self) -> None:
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await self.publisher.stop(unpublish=False)
            self.publisher = None
        for recorder in list(self.recorders.values()):
            with contextlib.suppress(Exception):
                await recorder.aclose()
        self.recorders.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.e2ee is not None:
            with contextlib.suppress(Exception):
                await self.e2ee.aclose(leave=False)
        with contextlib.suppress(Exception):
            await self.room.disconnect()

    # ---- observations --------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        return None if self.e2ee is None else self.e2ee.epoch

    @property
    def executed_epoch(self) -> int:
        if self.e2ee is None or self.e2ee.session is None:
            return -1
        return self.e2ee.session.executed_epoch

    @property
    def verification_code(self) -> str | None:
        return None if self.e2ee is None else self.e2ee.verification_code

    @property
    def members(self) -> list[str]:
        return [] if self.e2ee is None else self.e2ee.members

    def installed_key(self, identity: str, epoch: int) -> bytes:
        """The key material this participant's key provider holds for ``identity`` at the
        slot of ``epoch`` (LiveKit's ``export_key``)."""
        provider = self.room.e2ee_manager.key_provider
        assert provider is not None
        return provider.export_key(identity, key_index(epoch, self.ring_size))

    def failures(self, identity: str, since: float = 0.0) -> list[StateEvent]:
        """Decryption failures reported for ``identity``'s media after ``since``."""
        bad = {rtc.EncryptionState.MISSING_KEY, rtc.EncryptionState.DECRYPTION_FAILED}
        return [
            e
            for e in self.state_events
            if e.identity == identity and e.at >= since and e.state in bad
        ]

    async def recorder(self, speaker: str, timeout: float = 10.0) -> ToneRecorder:
        deadline = time.monotonic() + timeout
        # a recorder whose track went away is waited over: its speaker may come back
        while speaker not in self.recorders or speaker in self._stale_recorders:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.identity} never received a track from {speaker}")
            self._track_arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._track_arrived.wait(), 0.2)
        return self.recorders[speaker]

    async def hears(self, speaker: Participant, timeout: float = 10.0) -> bool:
        """True once this participant decodes ``speaker``'s tone."""
        assert speaker.tone_hz is not None
        try:
            recorder = await self.recorder(speaker.identity, timeout)
        except TimeoutError:
            return False
        return await wait_for_tone(recorder, speaker.tone_hz, timeout)

    async def cannot_hear(
        self, speaker: Participant, timeout: float = 10.0, hold: float = 1.0
    ) -> bool:
        """True once ``speaker``'s tone is gone and stays gone for ``hold`` seconds."""
        assert speaker.tone_hz is not None
        recorder = self.recorders.get(speaker.identity)
        if recorder is None:
            return True  # nothing of it is even decoded
        if not await wait_for_no_tone(recorder, speaker.tone_hz, timeout):
            return False
        start = time.monotonic()
        await asyncio.sleep(hold)
        return not hears_tone(recorder.since(start), speaker.tone_hz)

    def describe_audio(self, speaker: Participant, seconds: float = 1.0) -> str:
        recorder = self.recorders.get(speaker.identity)
        if recorder is None or speaker.tone_hz is None:
            return "no track"
        return describe(recorder.window(seconds), speaker.tone_hz)

    def current_tones(self, seconds: float = 0.3) -> dict[str, float]:
        """Speaker -> frequency of the clear tone in the last ``seconds`` of their decoded
        audio; speakers heard as noise, silence, or not recently at all are absent.
        Non-blocking: for live displays (tests should use :meth:`hears`)."""
        heard: dict[str, float] = {}
        now = time.monotonic()
        wanted = int(seconds * SAMPLE_RATE)
        for speaker, recorder in self.recorders.items():
            # only audio received lately: a stopped track's last samples are not "heard"
            samples = recorder.since(now - seconds - 0.2)[-wanted:]
            if samples.size < wanted * 0.9:
                continue
            freq = dominant_frequency(samples, recorder.sample_rate)
            if hears_tone(samples, freq, sample_rate=recorder.sample_rate):
                heard[speaker] = freq
        return heard

    # ---- SDK callbacks -------------------------------------------------------------

    def _on_track_subscribed(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        if track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        identity = participant.identity
        if identity in self._stale_recorders:
            self._stale_recorders.discard(identity)
            old = self.recorders.pop(identity, None)
            if old is not None:
                task = asyncio.ensure_future(old.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        if identity not in self.recorders:
            self.recorders[identity] = ToneRecorder(track)
            self._track_arrived.set()

    def _on_track_unsubscribed(
        self,
        track: rtc.Track,
        publication: rtc.RemoteTrackPublication,
        participant: rtc.RemoteParticipant,
    ) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and participant.identity in self.recorders:
            self._stale_recorders.add(participant.identity)

    def _on_e2ee_state(
        self, participant: rtc.Participant | None, state: rtc.EncryptionState
    ) -> None:
        if participant is not None:
            # the SDK annotates the enum wrapper, but passes the enum's int value
            value = cast(int, state)
            self.state_events.append(StateEvent(time.monotonic(), participant.identity, value))

    def _on_data(self, packet: rtc.DataPacket) -> None:
        sender = packet.participant.identity if packet.participant is not None else ""
        self.data.append(DataMessage(time.monotonic(), sender, bytes(packet.data)))


def _emit(kind: str, payload: dict[str, object]) -> None:
    """One ``EVENT <json>`` line (``--events``): what a parent process needs to follow this
    participant — session events, E2EE state changes and the tones it hears. No keys."""
    print("EVENT " + json.dumps({"t": time.monotonic(), "event": kind, **payload}), flush=True)


def _report_events(participant: Participant) -> None:
    assert participant.e2ee is not None

    def session_event(name: str) -> Callback:
        def handler(arg: object) -> None:
            session = participant.e2ee.session if participant.e2ee is not None else None
            payload: dict[str, object] = {
                "executed": -1 if session is None else session.executed_epoch
            }
            if isinstance(arg, EpochInfo):
                payload.update(
                    epoch=arg.epoch,
                    key_index=arg.key_index,
                    members=list(arg.members),
                    code=arg.verification_code,
                )
            else:
                payload["reason"] = str(arg)
            _emit(name, payload)

        return handler

    for name in SESSION_EVENTS:
        participant.e2ee.on(name, session_event(name))

    def state_changed(p: rtc.Participant | None, state: rtc.EncryptionState) -> None:
        if p is not None:
            _emit("e2ee_state", {"identity": p.identity, "state": cast(int, state)})

    participant.room.on("e2ee_state_changed", state_changed)


AUTHORITY_SEED_ENV = "LIVEKIT_MLS_TEST_AUTHORITY_SEED"
"""A spawned test participant's credentials: the test's identity authority (hex seed),
playing the app's backend. Only test processes get it, through their environment."""


async def _main(args: argparse.Namespace) -> None:
    config = None
    seed = os.environ.pop(AUTHORITY_SEED_ENV, "")
    if seed:
        authority = IdentityAuthority.from_seed(bytes.fromhex(seed))
        room = DeliveryClient(args.ds, args.token).room
        config = SessionConfig(
            ring_size=args.ring_size,
            authority_keys=(authority.public_key,),
            get_credential=credential_source(authority, args.identity, room),
        )
    participant = Participant(
        args.identity,
        livekit_url=args.livekit_url,
        token=args.token,
        ds_target=args.ds,
        ds_public_key=bytes.fromhex(args.ds_public_key) if args.ds_public_key else None,
        tone_hz=args.tone,
        ring_size=args.ring_size,
        config=config,
    )
    if args.events:
        _report_events(participant)
    await participant.join()
    print(f"READY {participant.epoch}", flush=True)
    try:
        # until killed. Nothing else goes to stdout unless asked for (--events): a
        # spawner that stops reading after READY must not fill the pipe and block us.
        while True:
            await asyncio.sleep(0.2)
            if args.events:
                _emit("status", {"heard": participant.current_tones()})
    finally:
        await participant.leave()


def spawn_participant(
    identity: str,
    *,
    livekit_url: str,
    token: str,
    ds_target: str,
    ds_public_key: bytes | None = None,
    authority: IdentityAuthority | None = None,
    tone_hz: float | None = None,
    events: bool = False,
    die_with_parent: bool = False,
    stdin: int | None = None,
    stderr: int | IO[bytes] | None = None,
    start_new_session: bool = False,
) -> subprocess.Popen[str]:
    """Starts :func:`main` (``python -m mls_provider.testing.participant``): one participant
    in its own process, its stdout a pipe of text lines — ``READY <epoch>`` once in the
    group, then, with ``events``, ``EVENT <json>`` lines (read them: a full pipe blocks
    it). SIGINT makes it leave the group and the room; SIGKILL is a crash.
    ``die_with_parent`` (Linux): SIGKILL when the spawning thread ends, even if this
    process is killed. With ``authority`` (the test's identity authority) it gets its
    credential as from the app's backend. ``stdin``, ``stderr`` and ``start_new_session``
    go to ``subprocess.Popen``."""
    args = [
        *(pdeathsig_prefix("KILL") if die_with_parent else []),
        sys.executable, "-m", "mls_provider.testing.participant",
        "--identity", identity,
        "--livekit-url", livekit_url,
        "--token", token,
        "--ds", ds_target,
    ]  # fmt: skip
    if ds_public_key is not None:
        args += ["--ds-public-key", ds_public_key.hex()]
    if events:
        args.append("--events")
    if tone_hz is not None:
        args += ["--tone", str(tone_hz)]
    env = dict(os.environ)
    if authority is not None:
        env[AUTHORITY_SEED_ENV] = authority.seed.hex()
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stdin=stdin,
        stderr=stderr,
        text=True,
        start_new_session=start_new_session,
        env=env,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one livekit-mls test participant.")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--livekit-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ds", required=True, help="delivery service gRPC target host:port")
    parser.add_argument("--ds-public-key", default="", help="pin the DS key (hex)")
    parser.add_argument("--tone", type=float, default=None, help="publish a sine of this frequency")
    parser.add_argument("--ring-size", type=int, default=DEFAULT_RING_SIZE)
    parser.add_argument(
        "--events",
        action="store_true",
        help="also print EVENT <json> lines: session events, E2EE states, tones heard",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))
    sys.exit(0)


if __name__ == "__main__":
    main()
