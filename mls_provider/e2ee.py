"""``MlsE2EE``: MLS-agreed, rotating end-to-end encryption keys for one LiveKit room.

e2ee = MlsE2EE(ds_url, token, ds_public_key=...)
room = rtc.Room()
await room.connect(lk_url, token, rtc.RoomOptions(encryption=e2ee.encryption_options()))
await e2ee.attach(room)      # joins the room's MLS group; keys rotate from now on
e2ee.on("epoch_changed", lambda info: print(info.epoch, info.verification_code))
async with e2ee.sending_data():  # a rotation never leaves this send without a key
    await room.local_participant.publish_data(b"hello")
...
await e2ee.aclose()          # leaves the group (also done when the room disconnects)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from livekit import rtc

from mls_provider.events import Callback
from mls_provider.keys import DEFAULT_RING_SIZE
from mls_provider.livekit_adapter import LiveKitKeySink
from mls_provider.session import CredentialSource, EpochInfo, MlsSession, SessionConfig
from mls_provider.transport import DeliveryClient, DeliveryServiceError, TokenSource

log = logging.getLogger(__name__)


def _target(ds_url: str) -> tuple[str, grpc.ChannelCredentials | None]:
    """``host:port`` or ``grpc://host:port`` (plaintext), ``grpcs://host:port`` (TLS)."""
    if ds_url.startswith("grpcs://"):
        return ds_url.removeprefix("grpcs://"), grpc.ssl_channel_credentials()
    return ds_url.removeprefix("grpc://"), None


def encryption_options(ring_size: int, failure_tolerance: int = 0) -> rtc.E2EEOptions:
    """LiveKit E2EE options as the protocol fixes them: per-participant keys (no shared
    key), HKDF, no auto-ratchet (MLS owns rotation), a key ring of ``ring_size`` slots."""
    options = rtc.E2EEOptions()
    kp = options.key_provider_options
    kp.shared_key = None
    kp.key_derivation_function = rtc.KeyDerivationFunction.HKDF
    kp.ratchet_window_size = 0
    kp.failure_tolerance = failure_tolerance
    kp.key_ring_size = ring_size
    return options


class MlsE2EE:
    """One participant's MLS key management for one LiveKit room.

    ``ds_public_key`` pins the delivery service's signature key (hex or bytes): groups
    that list another external sender are refused. ``authority_key`` (hex or bytes, or
    several during a rotation) pins the app's identity authority: every member's
    credential must be signed by it, and ``get_credential(signature_public_key)`` gets
    ours from the app's backend (authority mode, docs/security.md). ``ring_size`` must
    equal the DS's.
    ``failure_tolerance`` is LiveKit's: >= 0 so that undecryptable frames are reported
    (``e2ee_state_changed`` DECRYPTION_FAILED) instead of retried silently.
    """

    def __init__(
        self,
        ds_url: str,
        token: TokenSource,
        *,
        ds_public_key: bytes | str | None = None,
        authority_key: bytes | str | Sequence[bytes | str] | None = None,
        get_credential: CredentialSource | None = None,
        ring_size: int = DEFAULT_RING_SIZE,
        failure_tolerance: int = 0,
        credentials: grpc.ChannelCredentials | None = None,
        config: SessionConfig | None = None,
    ) -> None:
        if isinstance(ds_public_key, str):
            ds_public_key = bytes.fromhex(ds_public_key)
        base = config or SessionConfig()
        changes: dict[str, Any] = {"ring_size": ring_size}
        if ds_public_key is not None:
            changes["ds_public_key"] = ds_public_key
        if authority_key is not None:
            keys = [authority_key] if isinstance(authority_key, bytes | str) else authority_key
            changes["authority_keys"] = tuple(
                bytes.fromhex(k) if isinstance(k, str) else k for k in keys
            )
        if get_credential is not None:
            changes["get_credential"] = get_credential
        self.config = dataclasses.replace(base, **changes)
        target, default_credentials = _target(ds_url)
        self.ds = DeliveryClient(target, token, credentials=credentials or default_credentials)
        self.failure_tolerance = failure_tolerance
        self.session: MlsSession | None = None
        self.sink: LiveKitKeySink | None = None
        self._room: rtc.Room | None = None
        self._handlers: list[tuple[str, Callback]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def encryption_options(self) -> rtc.E2EEOptions:
        """Room encryption options fixed by the protocol (per-participant keys, HKDF,
        no auto-ratchet: MLS owns rotation). Pass them to ``rtc.RoomOptions(encryption=)``."""
        return encryption_options(self.config.ring_size, self.failure_tolerance)

    def on(self, event: str, callback: Callback) -> Callback:
        """Subscribes to session events (see :class:`MlsSession`); works before attach."""
        self._handlers.append((event, callback))
        if self.session is not None:
            self.session.on(event, callback)
        return callback

    async def attach(self, room: rtc.Room) -> None:
        """Joins the room's MLS group. ``room`` must be connected with
        :meth:`encryption_options`."""
        if self.session is not None:
            raise RuntimeError("already attached")
        self._room = room
        self.sink = LiveKitKeySink(room)
        identity = room.local_participant.identity
        self.session = MlsSession(self.ds, identity, self.sink, self.config)
        for event, callback in self._handlers:
            self.session.on(event, callback)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("disconnected", self._on_disconnected)
        await self.session.start()

    async def aclose(self, *, leave: bool = True) -> None:
        """Leaves the group (unless ``leave=False``) and releases the room."""
        if self._room is not None:
            self._room.off("participant_disconnected", self._on_participant_disconnected)
            self._room.off("disconnected", self._on_disconnected)
        if self.sink is not None:
            self.sink.detach()
        if self.session is not None:
            await self.session.stop(leave=leave)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:  # aclose may run in one of them (on disconnect)
                task.cancel()
        await self.ds.close()

    @property
    def epoch(self) -> int | None:
        return None if self.session is None else self.session.epoch

    @property
    def members(self) -> list[str]:
        return [] if self.session is None else self.session.members

    @property
    def verification_code(self) -> str | None:
        return None if self.session is None else self.session.verification_code

    @property
    def last_epoch(self) -> EpochInfo | None:
        return None if self.session is None else self.session.last_info

    @contextlib.asynccontextmanager
    async def sending_data(self) -> AsyncIterator[None]:
        """Wrap each data send (``publish_data``, ``send_text``, ``perform_rpc``, a stream
        writer's ``write``) in this. LiveKit encrypts data with the index of the last key
        installed, whoever's it is; during a rotation's few milliseconds of key installs
        that index can hold no key of ours, and an unwrapped send then fails with
        ``PublishDataError`` ("no keys, or key_index out of range"). Inside this block key
        installs wait until the send has been encrypted; a rotation waits for at most the
        sends already in flight."""
        if self.sink is None:
            yield  # not attached: no keys rotate
            return
        async with self.sink.gate.sending():
            yield

    def _spawn(self, factory: Callable[[], Any]) -> None:
        task = asyncio.ensure_future(factory())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        identity = participant.identity

        async def report() -> None:
            try:
                await self.ds.report_disconnect(identity)
            except DeliveryServiceError as e:
                log.info("disconnect report for %s not accepted: %s", identity, e)

        self._spawn(report)

    def _on_disconnected(self, reason: Any) -> None:
        self._spawn(self.aclose)
