"""The LiveKit adapter: a KeySink over a connected ``rtc.Room``.

Facts it relies on (pinned by tests/e2e/test_livekit_smoke.py):

* ``KeyProvider.set_key(identity, material, index)`` installs receive/send material in
  that identity's ring; it never changes what a sender encrypts with.
* Only ``FrameCryptor.set_key_index`` on the *local* cryptors switches what we send, and
  every newly published track starts at index 0 — so the current index is re-applied
  whenever a local track is published.
"""

from __future__ import annotations

import logging
from typing import Any

from livekit import rtc

log = logging.getLogger(__name__)


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
        room.on("local_track_published", self._on_local_track_published)

    def set_key(self, identity: str, material: bytes, key_index: int) -> None:
        self._provider.set_key(identity, material, key_index)

    def set_sender_index(self, key_index: int) -> None:
        self.sender_index = key_index
        self._apply()

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
