"""Where a session's keys go: LiveKit's key provider, or a recorder (headless mode).

The session decides *what* to install and *when*; a sink only performs it. The order of
``set_key`` calls is the session's business (LiveKit encrypts data packets with the index
of the last ``set_key`` call, whatever its identity). Before each run of ``set_key`` calls
the session awaits :meth:`KeySink.quiesce`, then installs without awaiting in between.
"""

from __future__ import annotations

import time
from typing import Protocol


class KeySink(Protocol):
    def set_key(self, identity: str, material: bytes, key_index: int) -> None:
        """Installs ``material`` for ``identity`` in slot ``key_index`` of its key ring."""

    def set_sender_index(self, key_index: int) -> None:
        """Makes every local sender (current and future tracks) encrypt with ``key_index``."""

    async def quiesce(self) -> None:
        """Returns when keys may change: nothing is being encrypted with the current ones
        in a way a run of ``set_key`` calls could disturb."""


class HeadlessKeySink:
    """Records what a LiveKit key provider would hold, and when the sender switched.

    Used where no LiveKit room exists: benchmarks with hundreds of members on one machine,
    and unit tests of the session.
    """

    def __init__(self) -> None:
        self.keys: dict[str, dict[int, bytes]] = {}
        self.sender_index: int | None = None
        self.sender_switched_at: float | None = None
        self.latest_key_index: int | None = None  # what LiveKit would encrypt data with

    def set_key(self, identity: str, material: bytes, key_index: int) -> None:
        self.keys.setdefault(identity, {})[key_index] = material
        self.latest_key_index = key_index

    def set_sender_index(self, key_index: int) -> None:
        self.sender_index = key_index
        self.sender_switched_at = time.monotonic()

    async def quiesce(self) -> None:
        return  # nothing is sent

    def key(self, identity: str, key_index: int) -> bytes | None:
        return self.keys.get(identity, {}).get(key_index)
