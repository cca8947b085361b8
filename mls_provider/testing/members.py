"""The members a :class:`~mls_provider.testing.runner.ScenarioRunner` drives.

A :class:`Member` is one participant instance (an identity that joins again is a new
instance). It records what its MLS session reports — every epoch it prepared and executed,
lost groups, errors — and, for members with media, the decrypt failures and tones it hears.
Three kinds:

* :class:`LocalMember`: a real LiveKit participant
  (:class:`~mls_provider.testing.participant.Participant`) in this process;
* :class:`ProcessMember`: the same in its own process (``python -m
  mls_provider.testing.participant --events``), so that a scenario can SIGKILL it; it is
  followed through the ``EVENT`` lines it prints;
* :class:`HeadlessMember`: an ``MlsSession`` with a ``HeadlessKeySink`` on the delivery
  service only (no LiveKit, no media).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mls_provider.events import Callback
from mls_provider.session import EpochInfo, MlsSession
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.transport import DeliveryClient, DeliveryServiceError

if TYPE_CHECKING:
    # the LiveKit SDK loads lazily: headless runs and the CLI's --help do not need it
    from mls_provider.testing.livekit_server import LiveKitServer

__all__ = [
    "FAILURE_STATES",
    "TONE_TOLERANCE_HZ",
    "EpochRecord",
    "HeadlessMember",
    "LocalMember",
    "Member",
    "ProcessMember",
]

TONE_TOLERANCE_HZ = 20.0  # a tone heard this close to a speaker's counts as theirs
# rtc.EncryptionState values of failures (MISSING_KEY, DECRYPTION_FAILED); plain ints
# because the SDK reports the enum's value
FAILURE_STATES = {3: "DECRYPTION_FAILED", 4: "MISSING_KEY"}
SESSION_EVENTS = (
    "joined",
    "epoch_changed",
    "transition_executed",
    "removed",
    "rejoining",
    "error",
)
HEARD_REFRESH = 1.0  # seconds between the live table's "hears" analyses (FFTs) per member


class _SessionEvents(Protocol):
    """What reports session events: an ``MlsSession`` or an ``MlsE2EE``."""

    def on(self, event: str, callback: Callback) -> Any: ...


@dataclass
class EpochRecord:
    """One epoch as one member saw it."""

    epoch: int
    key_index: int
    members: tuple[str, ...]
    code: str
    prepared_at: float
    executed_at: float | None = None


class Member:
    """One participant instance (an identity that joins again is a new instance)."""

    kind = "member"

    def __init__(self, identity: str, instance: int, tone_hz: float | None) -> None:
        self.identity = identity
        self.instance = instance
        self.tone_hz = tone_hz
        self.status = "joining"
        self.requested_at = time.monotonic()
        self.joined_at: float | None = None
        self.ended_at: float | None = None  # when its leave/kill was requested
        self.epochs: dict[int, EpochRecord] = {}
        self.epoch: int | None = None
        self.executed_epoch = -1
        self.key_index: int | None = None
        self.members: tuple[str, ...] = ()
        self.code: str | None = None
        self.notes: list[tuple[float, str]] = []
        self.incidents: list[tuple[float, str]] = []  # session errors and re-joins
        self.pid: int | None = None
        self._heard_cache: tuple[float, dict[str, float]] | None = None

    @property
    def alive(self) -> bool:
        return self.status in ("joining", "in group", "rejoining")

    def observe(
        self,
        name: str,
        t: float,
        epoch: int,
        key_index: int,
        members: Sequence[str],
        code: str,
        executed: int,
    ) -> None:
        """Records a session event (``joined``/``epoch_changed``/``transition_executed``)."""
        record = self.epochs.get(epoch)
        if record is None or (name != "transition_executed" and record.members != tuple(members)):
            record = EpochRecord(epoch, key_index, tuple(members), code, t)
            self.epochs[epoch] = record
        if executed >= epoch and record.executed_at is None:
            record.executed_at = t
        self.epoch, self.executed_epoch = epoch, executed
        self.key_index, self.members, self.code = key_index, tuple(members), code
        if self.status == "rejoining" and executed >= 0:
            self.status = "in group"

    def lost_group(self, t: float, name: str, reason: str) -> None:
        """Records ``removed``/``rejoining`` (the group is gone) or ``error`` (noted)."""
        self.notes.append((t, f"{name}: {reason}"))
        if name in ("error", "rejoining"):
            # no scenario step asks for either: a check reports them as problems
            self.incidents.append((t, f"{name}: {reason}"))
        if name == "error":
            return
        if self.alive and self.status != "joining":
            self.status = "rejoining"
        self.epoch, self.executed_epoch, self.members = None, -1, ()

    def follow(self, source: _SessionEvents, executed_epoch: Callable[[], int]) -> None:
        """Records every session event of ``source`` (this member's ``MlsSession`` or
        ``MlsE2EE``); ``executed_epoch`` reads the epoch it sends with at that moment."""
        for name in SESSION_EVENTS:
            source.on(name, partial(self._session_event, name, executed_epoch))

    def _session_event(self, name: str, executed_epoch: Callable[[], int], arg: object) -> None:
        t = time.monotonic()
        if isinstance(arg, EpochInfo):
            self.observe(
                name,
                t,
                arg.epoch,
                arg.key_index,
                arg.members,
                arg.verification_code,
                executed_epoch(),
            )
        else:
            self.lost_group(t, name, str(arg))

    def first_executed_at(self, epoch: int) -> float | None:
        """When this member first sent with ``epoch`` or a later one."""
        times = [r.executed_at for r in self.epochs.values() if r.epoch >= epoch]
        return min((t for t in times if t is not None), default=None)

    def first_executed_with(self, identity: str, after: float) -> float | None:
        """When this member first executed an epoch that has ``identity`` in it (epochs
        prepared after ``after``: an earlier instance of that identity does not count)."""
        times = [
            r.executed_at
            for r in self.epochs.values()
            if identity in r.members and r.prepared_at >= after
        ]
        return min((t for t in times if t is not None), default=None)

    # what each kind of member implements

    async def start(self, timeout: float) -> None:
        raise NotImplementedError

    async def leave(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def emergency_kill(self) -> None:
        """Synchronous last resort (atexit, second Ctrl-C): end any process of ours."""

    def failures(self) -> list[tuple[float, str, int]]:
        """(time, speaker, state) of every decrypt failure this member's SDK reported."""
        return []

    def heard(self) -> dict[str, float]:
        """Speaker -> frequency of the tone this member decodes right now."""
        return {}

    def heard_lately(self) -> dict[str, float]:
        """:meth:`heard`, analysed at most every HEARD_REFRESH seconds (live views)."""
        now = time.monotonic()
        cached = self._heard_cache
        if cached is None or now - cached[0] >= HEARD_REFRESH:
            cached = (now, self.heard())
            self._heard_cache = cached
        return cached[1]

    async def hears(self, speaker: str, tone_hz: float, timeout: float) -> bool:
        return False

    def key_material(self, identity: str, epoch: int, key_index: int) -> bytes | None:
        """The key this member holds for ``identity`` at ``epoch``, or None if it cannot
        be read from here (a member in another process). Compared, never shown."""
        return None


class LocalMember(Member):
    """A real LiveKit participant in this process."""

    kind = "livekit"

    def __init__(
        self,
        identity: str,
        instance: int,
        tone_hz: float | None,
        livekit: LiveKitServer,
        ds: DeliveryServiceProcess,
        room: str,
    ) -> None:
        from mls_provider.testing.participant import Participant

        super().__init__(identity, instance, tone_hz)
        self.participant = Participant(
            identity,
            livekit_url=livekit.url,
            token=livekit.token(identity, room),
            ds_target=ds.target,
            ds_public_key=ds.public_key,
            tone_hz=tone_hz,
            config=ds.session_config(identity, room),
        )
        assert self.participant.e2ee is not None
        self.follow(self.participant.e2ee, lambda: self.participant.executed_epoch)
        self.pid = os.getpid()

    async def start(self, timeout: float) -> None:
        await asyncio.wait_for(self.participant.join(timeout), timeout)

    async def leave(self) -> None:
        await asyncio.wait_for(self.participant.leave(), 20)

    async def kill(self) -> None:
        raise RuntimeError(f"{self.identity} runs in this process and cannot be killed")

    async def close(self) -> None:
        await self.participant.close()

    def failures(self) -> list[tuple[float, str, int]]:
        return [
            (e.at, e.identity, int(e.state))
            for e in self.participant.state_events
            if int(e.state) in FAILURE_STATES
        ]

    def heard(self) -> dict[str, float]:
        return self.participant.current_tones()

    async def hears(self, speaker: str, tone_hz: float, timeout: float) -> bool:
        from mls_provider.testing.audio import wait_for_tone

        deadline = time.monotonic() + timeout
        try:
            recorder = await self.participant.recorder(speaker, timeout)
        except TimeoutError:
            return False
        return await wait_for_tone(recorder, tone_hz, max(deadline - time.monotonic(), 0.5))

    def key_material(self, identity: str, epoch: int, key_index: int) -> bytes | None:
        return self.participant.installed_key(identity, epoch)


class ProcessMember(Member):
    """A real LiveKit participant in its own process (``python -m
    mls_provider.testing.participant --events``), so that it can be SIGKILLed."""

    kind = "livekit-process"

    def __init__(
        self,
        identity: str,
        instance: int,
        tone_hz: float | None,
        livekit: LiveKitServer,
        ds: DeliveryServiceProcess,
        room: str,
        log_dir: Path,
    ) -> None:
        from mls_provider.testing.participant import spawn_participant

        super().__init__(identity, instance, tone_hz)
        self._spawn_process = partial(
            spawn_participant,
            identity,
            livekit_url=livekit.url,
            token=livekit.token(identity, room),
            ds_target=ds.target,
            ds_public_key=ds.public_key,
            authority=ds.authority,
            tone_hz=tone_hz,
            events=True,
            die_with_parent=True,  # even if the runner is killed, no participant outlives it
            stdin=subprocess.DEVNULL,
            # a Ctrl-C in the terminal is ours to handle: the runner ends it
            start_new_session=True,
        )
        self.log_path = log_dir / f"participant-{identity}-{instance}.log"
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._failures: list[tuple[float, str, int]] = []
        self._heard: dict[str, float] = {}
        self._heard_at = 0.0

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> subprocess.Popen[str]:
        with open(self.log_path, "ab") as log:
            proc = self._spawn_process(stderr=log)
        self._reader = threading.Thread(
            target=self._read, args=(loop, proc), name=f"reader-{self.identity}", daemon=True
        )
        self._reader.start()
        return proc

    async def start(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.proc = self._spawn(loop)
        self.pid = self.proc.pid
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.identity}'s process did not join in {timeout:g} s (log: {self.log_path})"
            ) from None

    def _read(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                loop.call_soon_threadsafe(self._on_line, line.rstrip("\n"))
            except RuntimeError:  # the loop is closed: nobody listens any more
                return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit)

    def _on_exit(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                RuntimeError(f"{self.identity}'s process exited (log: {self.log_path})")
            )
        if self.status in ("joining", "in group", "rejoining"):
            self.status = "exited"
            self.ended_at = self.ended_at or time.monotonic()

    def _on_line(self, line: str) -> None:
        if line.startswith("READY"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if not line.startswith("EVENT "):
            return
        try:
            event = json.loads(line[6:])
            name, t = str(event["event"]), float(event["t"])
            if name in ("joined", "epoch_changed", "transition_executed"):
                self.observe(
                    name,
                    t,
                    int(event["epoch"]),
                    int(event["key_index"]),
                    [str(m) for m in event["members"]],
                    str(event["code"]),
                    int(event["executed"]),
                )
            elif name in ("removed", "rejoining", "error"):
                self.lost_group(t, name, str(event.get("reason", "")))
            elif name == "e2ee_state" and int(event["state"]) in FAILURE_STATES:
                self._failures.append((t, str(event["identity"]), int(event["state"])))
            elif name == "status":
                self._heard = {str(k): float(v) for k, v in event["heard"].items()}
                self._heard_at = t
        except (ValueError, KeyError, TypeError, AttributeError):
            self.notes.append((time.monotonic(), f"unreadable line: {line[:80]}"))

    async def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)

    async def leave(self) -> None:
        # SIGINT: the participant's main leaves the group and the room on the way out
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                await self.kill()

    async def close(self) -> None:
        if self.proc is None:
            return
        await self.kill()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def emergency_kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def failures(self) -> list[tuple[float, str, int]]:
        return list(self._failures)

    def heard(self) -> dict[str, float]:
        return dict(self._heard) if time.monotonic() - self._heard_at < 1.0 else {}

    async def hears(self, speaker: str, tone_hz: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abs(self.heard().get(speaker, 0.0) - tone_hz) <= TONE_TOLERANCE_HZ:
                return True
            await asyncio.sleep(0.1)
        return False


class HeadlessMember(Member):
    """An ``MlsSession`` with a ``HeadlessKeySink``: the real client session, keys
    recorded instead of installed in LiveKit. No media."""

    kind = "headless"

    def __init__(self, identity: str, instance: int, ds: DeliveryServiceProcess, room: str) -> None:
        super().__init__(identity, instance, None)
        self.client = DeliveryClient(ds.target, ds.token(identity, room))
        self.sink = HeadlessKeySink()
        self.session = MlsSession(
            self.client, identity, self.sink, ds.session_config(identity, room)
        )
        self.follow(self.session, lambda: self.session.executed_epoch)
        self.pid = os.getpid()
        self._closed = False

    async def start(self, timeout: float) -> None:
        await asyncio.wait_for(self.session.start(), timeout)
        await self.session.wait_until(lambda s: s.executed_epoch >= 0, timeout)

    async def _stop(self, leave: bool) -> None:
        if self._closed:
            return
        self._closed = True
        await self.session.stop(leave=leave)
        await self.client.close()

    async def leave(self) -> None:
        await self._stop(leave=True)

    async def kill(self) -> None:
        await self._stop(leave=False)

    async def close(self) -> None:
        await self._stop(leave=False)

    def key_material(self, identity: str, epoch: int, key_index: int) -> bytes | None:
        return self.sink.key(identity, key_index)

    async def report_disconnect(self, identity: str) -> None:
        with contextlib.suppress(DeliveryServiceError):
            await self.client.report_disconnect(identity)
