"""Who in a room is reachable: members' event streams, and LiveKit's own view.

:class:`StreamPresence` is the DS's own signal. A member that is in a call keeps its
``Subscribe`` stream open for the whole call (gRPC keepalives keep a quiet stream alive
and let the server notice a dead one), so "has an open stream" is "is reachable". A
participant whose stream has been gone for longer than the presence timeout — killed,
network lost, or a leave that never arrived — is removed by an external Remove; a shorter
gap (a network blip, a DS restart it resumes from) is not. Gaps are counted from the
newest evidence: the stream's close, the participant's join, or this DS process's start
(a restarted DS cannot know how long a member was gone before it started).

On a shared store (several DS processes) each process publishes its open streams to the
store every ``heartbeat`` seconds, so a stream on another process counts, and a stream
whose process died stops counting once its heartbeat is stale.

:class:`LiveKitPresence` asks LiveKit's RoomService (``--livekit-url``) about a member
another member reported as disconnected: one member cannot get another removed while
LiveKit still has it in the room.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from livekit import api

from delivery_service.model import Participant
from delivery_service.store import Store

log = logging.getLogger(__name__)

DEFAULT_PRESENCE_TIMEOUT = 3.0


@dataclass(frozen=True)
class PresenceView:
    """Who is reachable in one room at ``now``."""

    now: float
    timeout: float
    # identities with an open stream (on this process, or freshly reported by another)
    connected: frozenset[str]
    # newest evidence of a stream per identity that has none open now (its close)
    last_seen: Mapping[str, float]
    # gaps are never counted from before this (the DS process's start)
    since: float

    def expires(self, identity: str, joined_at: float) -> float:
        """When ``identity`` counts as gone if nothing changes (inf while connected)."""
        if identity in self.connected:
            return math.inf
        return max(self.last_seen.get(identity, 0.0), joined_at, self.since) + self.timeout

    def absent(self, participants: Mapping[str, Participant]) -> frozenset[str]:
        return frozenset(
            name for name, p in participants.items() if self.expires(name, p.joined_at) <= self.now
        )

    def next_expiry(self, participants: Mapping[str, Participant]) -> float | None:
        soonest = min((self.expires(n, p.joined_at) for n, p in participants.items()), default=None)
        return None if soonest is None or soonest == math.inf else soonest


class StreamPresence:
    """This process's open streams, per room and identity (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        timeout: float = DEFAULT_PRESENCE_TIMEOUT,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout <= 0:
            raise ValueError("the presence timeout must be positive")
        self.store = store
        self.timeout = timeout
        # how often a shared store hears of our streams; a report older than 3 beats is
        # from a process that died
        self.heartbeat = min(1.0, timeout / 3)
        self.clock = clock
        self.since = clock()
        self._open: dict[str, dict[str, int]] = {}  # room -> identity -> open streams
        self._closed: dict[str, dict[str, float]] = {}  # room -> identity -> last close
        # shared stores: the latest reports of every process, per room
        self._shared: dict[str, list[tuple[str, float, bool]]] = {}

    def start(self) -> None:
        self.since = self.clock()

    # ---- this process's streams ------------------------------------------------------

    def opened(self, room: str, identity: str) -> None:
        streams = self._open.setdefault(room, {})
        streams[identity] = streams.get(identity, 0) + 1
        self._closed.get(room, {}).pop(identity, None)

    def closed(self, room: str, identity: str) -> None:
        streams = self._open.get(room, {})
        left = streams.get(identity, 0) - 1
        if left > 0:
            streams[identity] = left
            return
        streams.pop(identity, None)
        if not streams:
            self._open.pop(room, None)
        self._closed.setdefault(room, {})[identity] = self.clock()

    def forget(self, room: str) -> None:
        """The room went idle: its closed streams need no more counting."""
        self._closed.pop(room, None)
        self._shared.pop(room, None)

    def is_open_here(self, room: str, identity: str) -> bool:
        return identity in self._open.get(room, {})

    # ---- views ---------------------------------------------------------------------

    def view(self, room: str) -> PresenceView:
        """The view from what this process knows now (shared reports as last read)."""
        now = self.clock()
        connected = set(self._open.get(room, {}))
        last_seen = dict(self._closed.get(room, {}))
        stale = now - 3 * self.heartbeat
        for identity, at, is_open in self._shared.get(room, ()):
            if is_open and at >= stale:
                connected.add(identity)
            elif identity not in connected:
                last_seen[identity] = max(last_seen.get(identity, 0.0), min(at, now))
        for identity in connected:
            last_seen.pop(identity, None)
        return PresenceView(now, self.timeout, frozenset(connected), last_seen, self.since)

    async def fresh_view(self, room: str) -> PresenceView:
        """The view after reading the other processes' latest reports (shared stores)."""
        if self.store.shared:
            self._shared[room] = await self.store.read_presence(room)
        return self.view(room)

    async def publish(self) -> None:
        """Reports this process's open streams and recent closes to a shared store."""
        now = self.clock()
        report: dict[str, dict[str, tuple[float, bool]]] = {}
        for room, streams in self._open.items():
            report.setdefault(room, {}).update((i, (now, True)) for i in streams)
        for room, closed in list(self._closed.items()):
            for identity, at in list(closed.items()):
                report.setdefault(room, {})[identity] = (at, False)
                if now - at > self.timeout + 3 * self.heartbeat:
                    del closed[identity]  # reported long enough for every process
            if not closed:
                del self._closed[room]
        if report:
            await self.store.publish_presence(report, ttl=max(60.0, 10 * self.timeout))


class LiveKitPresence:
    """Asks LiveKit whether a participant is still in a room (RoomService.GetParticipant)."""

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
