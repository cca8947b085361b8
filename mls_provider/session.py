"""The client session: one participant's MLS group for one LiveKit room.

It speaks to the delivery service (:class:`~mls_provider.transport.DeliveryClient`) and
installs keys through a :class:`~mls_provider.sinks.KeySink` — LiveKit's key provider via
the adapter, or a recorder in headless mode. It knows nothing of LiveKit itself.

Lifecycle: upload a key package (Join); create the group when the DS says so, or join from
the Welcome; then process the room's event stream in order:

* proposals are validated and cached; when the DS designates us (or anyone), we commit
  every cached proposal in one commit;
* a commit for epoch ``e`` moves us to ``e+1``: **prepare** installs every remote member's
  new key at index ``(e+1) mod R`` (their old keys stay), overwrites every slot of removed
  members, re-pins our own current key so data packets keep the current index, and tells
  the DS we are ready;
* **execute** ``e+1`` (everyone ready, or the DS's deadline): we install our own new key
  and switch every local sender to the new index; the previous index is wiped after a
  grace period.

A broken stream is resumed from the cursor; a failure to process a message, a cursor too
old, or an unexpected removal leads to a clean re-join with a new key package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mls_provider import mls
from mls_provider.events import EventEmitter
from mls_provider.keys import DEFAULT_RING_SIZE, KeySchedule, verification_code
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.sinks import KeySink
from mls_provider.transport import (
    CursorTooOld,
    DeliveryClient,
    DeliveryServiceError,
    EpochConflict,
    InvalidRequest,
    NotJoined,
    PermissionDenied,
    Replaced,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CredentialSource = Callable[[bytes], Awaitable[bytes]]
"""Given this member's MLS signature public key, returns the credential the app's identity
authority issued for it (``IdentityAuthority.issue`` on the app's backend)."""


class SessionError(Exception):
    """A failure the session cannot recover from by itself."""


class DsKeyMismatch(SessionError):
    """The delivery service's key is not the pinned one: refuse its groups."""


@dataclass(frozen=True)
class SessionConfig:
    """How a session runs. ``ring_size`` and ``cipher_suite`` must match the DS's room
    configuration (checked at join)."""

    ring_size: int = DEFAULT_RING_SIZE
    cipher_suite: int = mls.DEFAULT_CIPHER_SUITE
    # pin the DS signature key: groups listing another external sender are refused
    ds_public_key: bytes | None = None
    # seconds after an execute before the previous epoch's key slots are overwritten
    old_key_grace: float = 2.0
    # backoff between attempts of a call (and stream resumes) that failed on the way:
    # short, because the DS removes a member whose stream stays gone (its presence
    # timeout, 3 s by default) and a call already waits for the DS to be reachable
    retry_initial: float = 0.1
    retry_max: float = 1.0
    # how long a call keeps being retried while the DS is unreachable (e.g. restarting)
    retry_timeout: float = 60.0
    # how long stop(leave=True) keeps trying to say goodbye; a leave that never arrives
    # is caught by the DS's presence timeout instead
    leave_timeout: float = 5.0
    # join again (new key package) if removed while still wanting to be in the room
    rejoin_on_removal: bool = True
    # called for every identity a commit adds; False raises a "member_rejected" event
    accept_member: Callable[[str], bool] | None = None
    # authority mode: the public keys of the app's identity authority (32-byte Ed25519;
    # several during a rotation). Every member's credential must be signed by one of them,
    # for this room, wherever it appears; the DS must check the same keys. Empty: open mode
    # (anyone with a LiveKit token for the room becomes a member).
    authority_keys: tuple[bytes, ...] = ()
    # authority mode: where this member gets its own credential (the app's backend)
    get_credential: CredentialSource | None = None
    # seconds before its credential expires when a member renews it (an update commit)
    credential_renewal: float = 3600.0


@dataclass(frozen=True)
class EpochInfo:
    """What an app may show when the group moves to a new epoch."""

    epoch: int
    key_index: int
    members: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    verification_code: str


@dataclass(frozen=True)
class RejectedMember:
    """Payload of ``member_rejected``: who was refused (if known) and why."""

    identity: str | None
    reason: str


@dataclass
class _OwnKey:
    epoch: int
    index: int
    material: bytes


class MlsSession(EventEmitter):
    """Events (``session.on(name, callback)``):

    * ``"joined"`` (EpochInfo) — we are in the group;
    * ``"epoch_changed"`` (EpochInfo) — keys of a new epoch are installed (prepare);
    * ``"transition_executed"`` (EpochInfo) — we now send with the new epoch's key;
    * ``"member_rejected"`` (RejectedMember) — an added identity was refused: its
      credential is not vouched for by the pinned authority (the commit or Welcome was not
      applied), or ``accept_member`` said no;
    * ``"removed"`` (reason) — we were removed from the group;
    * ``"rejoining"`` (reason) — joining again with a new key package;
    * ``"replaced"`` (reason) — a newer connection of our identity joined the room (another
      device): the session stopped and does not join again;
    * ``"error"`` (exception) — a fatal error; the session stopped.
    """

    def __init__(
        self,
        ds: DeliveryClient,
        identity: str,
        sink: KeySink,
        config: SessionConfig | None = None,
        *,
        key_pair: mls.SignatureKeyPair | None = None,
    ) -> None:
        super().__init__()
        self.ds = ds
        self.identity = identity
        self.sink = sink
        self.config = config or SessionConfig()
        self.schedule = KeySchedule(self.config.ring_size)
        self.key_pair = key_pair or mls.SignatureKeyPair.generate(self.config.cipher_suite)
        self.authority: mls.Authority | None = None
        self._client: mls.MlsClient | None = None
        self.credential: bytes | None = None  # ours, in authority mode
        if self.config.authority_keys:
            if self.config.get_credential is None:
                raise SessionError("authority mode needs SessionConfig.get_credential")
            # credentials must name the room of our own LiveKit token
            self.authority = mls.Authority(list(self.config.authority_keys), ds.room)
        else:
            self._client = mls.MlsClient(identity, self.key_pair)
        self.group: mls.Group | None = None
        self.generation = -1
        self.cursor = 0
        self.executed_epoch = -1
        self.room_config: pb.RoomConfig | None = None
        self.last_info: EpochInfo | None = None
        self._own: _OwnKey | None = None  # the key we send with
        self._next_own: _OwnKey | None = None  # prepared, installed on execute
        self._pending_commit: tuple[int, mls.CommitOutput] | None = None  # ours, unanswered
        self._key_package_ref = b""  # of the key package uploaded last: our Welcome names it
        self._task: asyncio.Task[None] | None = None
        self._wipes: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()  # the group: events and credential renewals take turns
        self._renewal: asyncio.Task[None] | None = None

    # ---- public API ----------------------------------------------------------------

    @property
    def client(self) -> mls.MlsClient:
        if self._client is None:
            raise SessionError("the session has no MLS client yet: start() it first")
        return self._client

    @property
    def epoch(self) -> int | None:
        return None if self.group is None else self.group.epoch

    @property
    def members(self) -> list[str]:
        return [] if self.group is None else [m.identity for m in self.group.members()]

    @property
    def verification_code(self) -> str | None:
        return None if self.group is None else verification_code(self.group.epoch_authenticator())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Uploads a key package and starts following the room's event stream (in
        authority mode, after getting this member's credential from the app)."""
        if self.authority is not None:
            self._install_credential(await self._fetch_credential())
            self._renewal = asyncio.create_task(
                self._renew_credentials(), name=f"mls-renewal-{self.identity}"
            )
        await self._join()
        self._task = asyncio.create_task(self._run(), name=f"mls-session-{self.identity}")

    async def stop(self, *, leave: bool = True) -> None:
        """Stops the session; with ``leave`` the DS removes us from the group. The leave
        is retried for up to ``leave_timeout`` seconds while the DS is unreachable; if it
        never arrives, the DS removes us once our stream has been gone for its presence
        timeout."""
        self._stopping = True
        for task in (self._task, self._renewal):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in list(self._wipes):
            task.cancel()
        if leave:
            budget = self.config.leave_timeout
            try:
                await self._retry(lambda: self.ds.leave(timeout=budget), timeout=budget)
            except DeliveryServiceError as e:
                log.info("%s: leave not confirmed: %s", self.identity, e)

    async def wait_until(self, predicate: Callable[[MlsSession], bool], timeout: float) -> None:
        """Waits until ``predicate(self)`` holds (checked after every handled event)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout)

    # ---- the event loop ------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.config.retry_initial
        while not self._stopping:
            try:
                async for event in self.ds.subscribe(self.cursor, self._key_package_ref):
                    backoff = self.config.retry_initial
                    restart = await self._handle(event)
                    if restart:
                        break  # re-joined: subscribe again from the new cursor
                    self.cursor = event.seq
                    await self._notify()
            except (Unavailable, ResourceExhausted) as e:
                log.info(
                    "%s: stream interrupted (%s); resuming from %d", self.identity, e, self.cursor
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_max)
            except (CursorTooOld, NotJoined) as e:
                await self._rejoin(f"stream refused: {e.message}")
            except Replaced as e:
                log.info("%s: replaced: %s", self.identity, e.message)
                self._drop_group()
                self._stopping = True
                self.emit("replaced", e.message)
                return
            except Unauthenticated as e:
                if self.ds.has_fresh_token() and not self._stopping:
                    # our token expired under an open stream: the next call takes a fresh one
                    log.info("%s: stream ended (%s); resuming", self.identity, e.message)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.retry_max)
                    continue
                log.error("%s: fatal: %s", self.identity, e)
                self.emit("error", e)
                return
            except (PermissionDenied, SessionError) as e:
                log.error("%s: fatal: %s", self.identity, e)
                self.emit("error", e)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("%s: unexpected failure; resuming", self.identity)
                self.emit("error", e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_max)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, event: pb.RoomEvent) -> bool:
        """Handles one event; True if the session re-joined (the stream must restart)."""
        async with self._lock:
            return await self._handle_locked(event)

    async def _handle_locked(self, event: pb.RoomEvent) -> bool:
        kind = event.WhichOneof("event")
        try:
            if kind == "reset":
                return await self._on_reset(event)
            if kind == "create_group":
                return await self._on_create_group(event)
            if kind == "welcome":
                return await self._on_welcome(event)
            group = self.group
            if group is None or event.generation != self.generation:
                return False  # not (yet) in this generation's group
            if kind == "proposal":
                if event.proposal.epoch == group.epoch:
                    group.process_message(event.proposal.message)
            elif kind == "commit_request":
                await self._on_commit_request(group, event.commit_request)
            elif kind == "commit":
                return await self._on_commit(group, event.commit)
            elif kind == "execute":
                await self._on_execute(group, event.execute.epoch)
        except mls.MlsError as e:
            reason = f"cannot process {kind} at seq {event.seq}: {e}"
            if getattr(e, "code", "") == "CredentialRejected":
                # a member the app's authority did not vouch for: refused, reported
                self.emit("member_rejected", RejectedMember(_named(str(e)), str(e)))
            # an epoch mismatch says we are behind, not that the message is bad
            seq = 0 if isinstance(e, mls.EpochError) else event.seq
            await self._report_and_rejoin(reason, seq)
            return True
        return False

    # ---- handlers ------------------------------------------------------------------

    async def _on_reset(self, event: pb.RoomEvent) -> bool:
        if self.group is None:
            return False  # waiting with a fresh key package: the DS adds us to the new group
        await self._rejoin(f"group retired: {event.reset.reason}")
        return True

    async def _on_create_group(self, event: pb.RoomEvent) -> bool:
        request = event.create_group
        if request.creator != self.identity or self.group is not None:
            return False
        self._check_room_config(request.config)
        group = self.client.create_group(request.group_id, [request.config.ds_signing_identity])
        self._check_external_sender(group, request.config)
        try:
            await self._retry(lambda: self.ds.create_group(event.generation, group.group_info()))
        except EpochConflict:
            return False  # the DS gave up on us as creator; it will say what is next
        await self.sink.quiesce()
        self.group = group
        self.generation = event.generation
        self._prepare(group, added=(), removed=())
        self.emit("joined", self.last_info)
        return False

    async def _on_welcome(self, event: pb.RoomEvent) -> bool:
        if self._key_package_ref not in event.welcome.key_package_refs or self.group is not None:
            return False  # for another key package: an earlier instance of our identity
        if self.room_config is None:
            return False
        group = self.client.join_group(event.welcome.message)
        self._check_external_sender(group, self.room_config)
        await self.sink.quiesce()
        self.group = group
        self.generation = event.generation
        # a joiner has no previous epoch: it sends with the new key at once
        self._prepare(group, added=(), removed=())
        self._execute(group)
        await self._ready(group.epoch)
        self.emit("joined", self.last_info)
        return False

    async def _on_commit_request(self, group: mls.Group, request: pb.CommitRequest) -> None:
        if request.epoch != group.epoch or request.committer not in (self.identity, ""):
            return
        earlier = self._pending_commit
        if earlier is not None and earlier[0] == group.epoch and group.has_pending_commit:
            # An earlier commit's outcome is unknown (the DS may still accept it: it asks
            # again when its deadline passes, not only when proposals arrive). Submitting
            # the same bytes again is idempotent at the DS.
            if await self._submit(group, earlier[1]):
                return
        elif group.has_pending_commit:
            group.discard_pending_commit()
        output = group.commit()
        if output.left_out:
            # a proposal our rules refuse (an Add the app's authority did not vouch for):
            # the DS would refuse a commit without it, and we will not commit it
            group.discard_pending_commit()
            for who in output.left_out:
                reason = "its credential is not vouched for by the pinned identity authority"
                log.warning("%s: refusing to add %r: %s", self.identity, who, reason)
                self.emit("member_rejected", RejectedMember(who, reason))
            return
        self._pending_commit = (group.epoch, output)
        await self._submit(group, output)

    async def _submit(self, group: mls.Group, output: mls.CommitOutput) -> bool:
        """Submits a pending commit; False if the DS refused it (it is discarded then)."""
        try:
            await self._retry(
                lambda: self.ds.submit_commit(
                    group.epoch, output.commit, output.welcome or b"", output.group_info or b""
                )
            )
        except (EpochConflict, InvalidRequest) as e:
            # another commit won, or proposals came in meanwhile: the stream tells us more
            log.debug("%s: commit not accepted: %s", self.identity, e)
            group.discard_pending_commit()
            self._pending_commit = None
            return False
        except DeliveryServiceError as e:
            # outcome unknown (e.g. a timeout after the DS stored it): keep it pending; if
            # it was accepted it comes back through the stream and applies there
            log.info("%s: commit outcome unknown: %s", self.identity, e)
        return True

    async def _on_commit(self, group: mls.Group, commit: pb.Commit) -> bool:
        if commit.epoch < group.epoch:
            return False  # applied already
        if commit.epoch > group.epoch:
            raise mls.EpochError(f"missed commits: at epoch {group.epoch}, got {commit.epoch}")
        await self.sink.quiesce()
        applied = self._apply_commit(group, commit)
        if applied.self_removed:
            return await self._on_removed("removed from the group by a commit")
        await self._ready(group.epoch)
        self.emit("epoch_changed", self.last_info)
        return False

    def _apply_commit(self, group: mls.Group, commit: pb.Commit) -> mls.CommitApplied:
        """Applies the commit and prepares the new epoch's keys (all CPU, no I/O)."""
        applied = group.process_message(commit.message)  # ours, or it clears ours
        self._pending_commit = None
        if not isinstance(applied, mls.CommitApplied):
            raise mls.ValidationError("the DS relayed a non-commit as commit")
        if applied.self_removed:
            return applied
        added = tuple(m.identity for m in applied.added)
        for identity in added:
            if self.config.accept_member is not None and not self.config.accept_member(identity):
                self.emit("member_rejected", RejectedMember(identity, "accept_member refused it"))
        self._prepare(group, added=added, removed=tuple(m.identity for m in applied.removed))
        return applied

    async def _on_execute(self, group: mls.Group, epoch: int) -> None:
        if epoch == group.epoch and self.executed_epoch < epoch:
            await self.sink.quiesce()  # only this task changes the group: still current
            self._execute(group)
            self.emit("transition_executed", self.last_info)

    async def _on_removed(self, reason: str) -> bool:
        self._drop_group()
        self.emit("removed", reason)
        if self._stopping or not self.config.rejoin_on_removal:
            self._stopping = True
            return True
        await self._rejoin(reason)
        return True

    # ---- keys ----------------------------------------------------------------------

    def _prepare(self, group: mls.Group, added: tuple[str, ...], removed: tuple[str, ...]) -> None:
        epoch = group.epoch
        members = [m.identity for m in group.members()]
        keys = self.schedule.epoch_keys(group.export_secret, epoch, members)
        garbage = secrets.token_bytes(32)  # unknown to anyone: frames under it never decrypt
        for identity in removed:
            # removed members' frames, at any index, must stop decrypting now
            for index in range(self.config.ring_size):
                self.sink.set_key(identity, garbage, index)
        for identity, material in keys.material.items():
            if identity != self.identity:
                self.sink.set_key(identity, material, keys.key_index)
        self._next_own = _OwnKey(epoch, keys.key_index, keys.material[self.identity])
        self._pin_own_key()
        self.last_info = EpochInfo(
            epoch=epoch,
            key_index=keys.key_index,
            members=tuple(members),
            added=added,
            removed=removed,
            verification_code=verification_code(group.epoch_authenticator()),
        )

    def _execute(self, group: mls.Group) -> None:
        new = self._next_own
        if new is None or new.epoch != group.epoch:
            return
        previous = self._own
        self._own = new
        self.sink.set_key(self.identity, new.material, new.index)  # last set_key: data too
        self.sink.set_sender_index(new.index)
        self.executed_epoch = new.epoch
        if previous is not None and previous.index != new.index:
            task = asyncio.ensure_future(self._wipe_later(previous.index, group))
            self._wipes.add(task)
            task.add_done_callback(self._wipes.discard)

    def _pin_own_key(self) -> None:
        """LiveKit encrypts data packets with the index of the last ``set_key`` call:
        re-install the key we send with last, so data switches only on execute."""
        if self._own is not None:
            self.sink.set_key(self.identity, self._own.material, self._own.index)

    async def _wipe_later(self, index: int, group: mls.Group) -> None:
        await asyncio.sleep(self.config.old_key_grace)
        await self.sink.quiesce()
        live = {k.index for k in (self._own, self._next_own) if k is not None}
        if index in live or self.group is not group:
            return  # the slot holds a live epoch again (tiny rings) or we left the group
        garbage = secrets.token_bytes(32)
        for member in group.members():
            self.sink.set_key(member.identity, garbage, index)
        self._pin_own_key()

    # ---- joining -------------------------------------------------------------------

    def _check_room_config(self, config: pb.RoomConfig) -> None:
        pinned = self.config.ds_public_key
        if pinned is not None and config.ds_public_key != pinned:
            raise DsKeyMismatch("the delivery service's key is not the pinned one")
        if self.config.authority_keys and set(config.authority_keys) != set(
            self.config.authority_keys
        ):
            raise SessionError(
                "the delivery service does not check credentials with this session's "
                "identity authority: start it with --authority-key set to the same keys"
            )
        if config.ring_size != self.config.ring_size:
            raise SessionError(
                f"the room's key ring size is {config.ring_size}, this session uses "
                f"{self.config.ring_size}: configure the same value"
            )
        if config.cipher_suite != self.config.cipher_suite:
            raise SessionError(f"the room's cipher suite is {config.cipher_suite}")

    @staticmethod
    def _check_external_sender(group: mls.Group, config: pb.RoomConfig) -> None:
        """The group's only external sender must hold the DS key the room config names
        (checked against the pinned key, if any, by ``_check_room_config``)."""
        if [key for _, key in group.external_senders()] != [config.ds_public_key]:
            raise DsKeyMismatch("the group's external sender is not the delivery service's key")

    async def _join(self) -> None:
        key_package = self.client.generate_key_package()
        response = await self._retry(lambda: self.ds.join(key_package))
        self._key_package_ref = mls.message_info(key_package).key_package_ref or b""
        self._check_room_config(response.config)
        self.room_config = response.config
        self.cursor = response.cursor
        self.generation = response.config.generation

    async def _rejoin(self, reason: str) -> None:
        log.info("%s: re-joining: %s", self.identity, reason)
        self._drop_group()
        self.emit("rejoining", reason)
        await self._join()

    async def _report_and_rejoin(self, reason: str, seq: int) -> None:
        """Tells the DS which event we could not process (it weighs reports about a commit
        against the other members': docs/protocol.md, "Bad commits"), then joins again."""
        log.warning("%s: %s", self.identity, reason)
        epoch = self.group.epoch if self.group is not None else 0
        with contextlib.suppress(DeliveryServiceError):
            await self._retry(lambda: self.ds.report_failure(epoch, reason, seq))
        await self._rejoin(reason)

    def _drop_group(self) -> None:
        self.group = None
        self._pending_commit = None
        self._next_own = None
        self.executed_epoch = -1

    async def _ready(self, epoch: int) -> None:
        try:
            await self._retry(lambda: self.ds.ready(epoch))
        except (EpochConflict, NotJoined) as e:
            log.debug("%s: ready for %d not counted: %s", self.identity, epoch, e)

    # ---- credentials (authority mode) -------------------------------------------------

    async def _fetch_credential(self) -> bytes:
        source = self.config.get_credential
        assert source is not None
        try:
            return await source(self.key_pair.public_key)
        except Exception as e:
            raise SessionError(f"could not get a credential from the app: {e}") from e

    def _install_credential(self, credential: bytes) -> None:
        """Our credential from now on (key packages, re-joins): it must pass the checks
        every other member makes (raises SessionError otherwise)."""
        try:
            if self._client is None:
                self._client = mls.MlsClient(
                    self.identity, self.key_pair, credential=credential, authority=self.authority
                )
            else:  # the key packages we handed out stay usable
                self._client = self._client.renewed(credential)
        except (mls.MlsError, ValueError) as e:
            raise SessionError(f"the app's credential for {self.identity!r} is refused: {e}") from e
        self.credential = credential

    def _renewal_due(self) -> float:
        """``credential_renewal`` seconds before our credential expires, but not before
        half its validity (a short-lived credential is not renewed in a loop)."""
        assert self.credential is not None
        c = mls.decode_credential(self.credential)
        return float(
            c.not_after - min(self.config.credential_renewal, (c.not_after - c.not_before) / 2)
        )

    async def _renew_credentials(self) -> None:
        """Before our credential expires, gets a new one and commits it (an update), so
        that no member ever holds an expired leaf (joiners refuse a group that has one)."""
        while not self._stopping:
            due = self._renewal_due()
            await asyncio.sleep(max(0.0, due - time.time()))
            credential = await self._fetch_credential()
            while not self._stopping and not await self._commit_renewal(credential):
                # try again after the next event (e.g. the transition that blocked it)
                with contextlib.suppress(TimeoutError):
                    async with self._changed:
                        await asyncio.wait_for(self._changed.wait(), self.config.retry_max)

    async def _commit_renewal(self, credential: bytes) -> bool:
        """Commits ``credential`` as ours when the group is quiet; True once accepted."""
        async with self._lock:
            group = self.group
            if group is None:  # between groups: our next key package carries it
                self._install_credential(credential)
                return True
            if group.has_pending_commit or self.executed_epoch != group.epoch:
                return False
            try:
                output = group.commit_renewal(self.key_pair, credential)
            except mls.MlsError as e:
                log.warning("%s: cannot renew the credential: %s", self.identity, e)
                return False
            self._pending_commit = (group.epoch, output)
            try:
                await self.ds.submit_commit(
                    group.epoch, output.commit, output.welcome or b"", output.group_info or b""
                )
            except DeliveryServiceError as e:
                # another commit won, proposals are pending (then only the designee
                # commits), or the update interval has not passed: try again later
                log.info("%s: credential renewal not accepted yet: %s", self.identity, e)
                group.discard_pending_commit()
                self._pending_commit = None
                return False
            self._install_credential(credential)
            log.info("%s: credential renewed", self.identity)
            return True

    async def _retry(self, call: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Retries an idempotent unary call while the DS is unreachable, with backoff, for
        up to ``timeout`` seconds (default ``retry_timeout``; a session that is stopping
        gives up at once, unless a timeout is given)."""
        delay = self.config.retry_initial
        budget = self.config.retry_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + budget
        while True:
            try:
                return await call()
            except (Unavailable, ResourceExhausted):
                if self._stopping and timeout is None:
                    raise
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)


def _named(reason: str) -> str | None:
    """The identity a credential refusal names (the engine quotes it), if any."""
    match = re.search(r'credential of "((?:[^"\\]|\\.)*)"', reason)
    return match.group(1) if match else None
