"""Asks LiveKit whether a participant is still in a room (RoomService.GetParticipant).

Used to verify members' disconnect reports when the DS knows the LiveKit server's URL:
a report about a participant LiveKit still has in the room is ignored, so one member
cannot make the DS remove another who is still connected.
"""

from __future__ import annotations

import logging

from livekit import api

log = logging.getLogger(__name__)


class LiveKitPresence:
    def __init__(self, url: str, api_key: str, api_secret: str) -> None:
        self.url = url
        self._api_key = api_key
        self._api_secret = api_secret
        self._client: api.LiveKitAPI | None = None

    async def is_present(self, room: str, identity: str) -> bool | None:
        """True/False as LiveKit says; None when LiveKit cannot be asked."""
        if self._client is None:
            self._client = api.LiveKitAPI(self.url, self._api_key, self._api_secret)
        try:
            await self._client.room.get_participant(
                api.RoomParticipantIdentity(room=room, identity=identity)
            )
            return True
        except api.TwirpError as e:
            if e.code == "not_found":
                return False
            log.warning("LiveKit presence check failed: %s", e)
            return None
        except Exception as e:  # network errors: do not block removals on LiveKit's health
            log.warning("LiveKit presence check failed: %s", e)
            return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
