"""The LiveKit adapter: a KeySink over a connected ``rtc.Room``.

Facts it relies on (pinned by tests/e2e/test_livekit_smoke.py):

* ``KeyProvider.set_key(identity, material, index)`` installs receive/send material in
  that identity's ring; it never changes what a sender encrypts with.
* Only ``FrameCryptor.set_key_index`` on the *local* cryptors switches what we send, and
  every newly published track starts at index 0 — so the current index is re-applied
  whenever a local track is published.
* Data packets are encrypted with our key at the index of the *last* ``set_key`` call, by
  a task of the SDK's own runtime, after ``publish_data`` has handed the packet over. The
  session pins that index back to our current key after installing a peer's next-epoch
  key, but a packet encrypted between the two calls finds no key of ours at the peer's
  index and ``publish_data`` fails. :class:`DataSendGate` keeps the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from livekit import rtc

log = logging.getLogger(__name__)


class DataSendGate:
    """Keeps key installation and data encryption apart.

    Senders enter :meth:`sending` around a data call (e.g. ``publish_data``), which returns
    once the SDK has encrypted and sent; the session awaits :meth:`quiesce` before a run of
    ``set_key`` calls, which it then makes without awaiting. A waiting key update holds
    new senders back, so a chatty app cannot delay a rotation for more than one send.
    """

    def __init__(self) -> None:
        self._sending = 0
        self._updates_waiting = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def sending(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._updates_waiting == 0)
            self._sending += 1
        try:
            yield
        finally:
            async with self._changed:
                self._sending -= 1
                self._changed.notify_all()

    async def quiesce(self) -> None:
        """Returns when no send is in flight. The caller must not await before its
        ``set_key`` calls: senders released here run only once it yields."""
        async with self._changed:
            self._updates_waiting += 1
            try:
                await self._changed.wait_for(lambda: self._sending == 0)
            finally:
                self._updates_waiting -= 1
                self._changed.notify_all()


class LiveKitKeySink:
    def __init__(self, room: rtc.Room) -> None:
        manager = room.e2ee_manager
        provider = manager.key_provider
        if provider is None:
            raise ValueError(
                "the room has no key provider: connect with "
                "rtc.RoomOptions(encryption=e2ee.encryption_options())"
            )
        self.room = room
        self.local_identity = room.local_participant.identity
        self._provider = provider
        self._manager = manager
        self.sender_index = 0
        self.gate = DataSendGate()
        room.on("local_track_published", self._on_local_track_published)

    def set_key(self, identity: str, material: bytes, key_index: int) -> None:
        self._provider.set_key(identity, material, key_index)

    def set_sender_index(self, key_index: int) -> None:
        self.sender_index = key_index
        self._apply()

    async def quiesce(self) -> None:
        await self.gate.quiesce()

    def _apply(self, track_sid: str | None = None) -> None:
        for cryptor in self._manager.frame_cryptors():
            if cryptor.participant_identity != self.local_identity:
                continue
            if track_sid is not None and cryptor.track_sid != track_sid:
                continue
            if cryptor.key_index != self.sender_index:
                cryptor.set_key_index(self.sender_index)

    def _on_local_track_published(self, publication: Any, track: Any) -> None:
        # the SDK created the cryptor at index 0 before dispatching this event
        self._apply(publication.sid)

    def detach(self) -> None:
        self.room.off("local_track_published", self._on_local_track_published)
