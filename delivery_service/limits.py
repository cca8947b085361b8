"""Request limits: message sizes per field and a per-identity rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from delivery_service.errors import RateLimited, TooLarge

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one request may carry. A 1000-member group's Welcome and
    GroupInfo (ratchet tree included) are ~0.3 MiB and a commit at most ~0.1 MiB; the
    defaults leave room for ten times that. The transport accepts no message larger than
    the largest legitimate request (``grpc_message``), so an oversized one is refused
    before it is read."""

    key_package: int = 16 * KIB
    commit: int = 1 * MIB
    welcome: int = 4 * MIB
    group_info: int = 4 * MIB
    reason: int = 1 * KIB
    identity: int = 1 * KIB
    # token bucket per (room, identity): sustained rate and burst of mutating calls
    rate_per_second: float = 50.0
    burst: int = 200

    @property
    def grpc_message(self) -> int:
        """The largest request (SubmitCommit: commit + Welcome + GroupInfo) or stream event
        (a Welcome), plus framing."""
        return self.commit + self.welcome + self.group_info + 4 * KIB

    def check_size(self, field: str, value: bytes | str) -> None:
        limit: int = getattr(self, field)
        size = len(value.encode()) if isinstance(value, str) else len(value)
        if size > limit:
            raise TooLarge(f"{field} is {size} bytes; the limit is {limit}")


class RateLimiter:
    """Token buckets per key, refilled continuously."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def check(self, key: tuple[str, str]) -> None:
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                f"rate limit of {self.rate:g}/s (burst {self.burst}) exceeded; slow down"
            )
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:  # forget idle identities
            cutoff = now - self.burst / self.rate
            self._buckets = {k: v for k, v in self._buckets.items() if v[1] >= cutoff}
