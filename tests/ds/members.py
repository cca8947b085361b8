"""A scriptable test member of a DS room: a real MLS client and explicit protocol steps.

:class:`Member` holds the MLS side and reacts to one room event at a time
(:meth:`Member.handle`), the way a livekit-mls participant does:

* ``create_group`` naming it: create the group (DS as external sender), upload GroupInfo;
* ``proposal``: validate and cache the DS's proposal;
* ``commit_request`` naming it (or anyone) with ``auto_commit``: commit every cached proposal;
* ``commit``: apply it (our own pending one or another's), then ack Ready for the new epoch;
* ``welcome`` for it: join, then ack Ready;
* ``execute``: remember the executed epoch;
* ``reset``: drop the group; with ``auto_rejoin`` join again with a new key package.

It talks to the DS through a :class:`Transport`: :class:`ManagerTransport` calls a
``RoomManager`` directly (unit tests), :class:`GrpcMember` uses the real gRPC client and
stream. A member never acts behind the test's back except as listed above.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from delivery_service import errors as ds_errors
from delivery_service.rooms import RoomManager
from mls_provider import mls
from mls_provider import transport as tp
from mls_provider.proto import delivery_pb2 as pb

EVENT_TIMEOUT = 15.0
EPOCH_CONFLICTS = (tp.EpochConflict, ds_errors.EpochConflict)


class ProtocolViolation(AssertionError):
    """The DS sent something a correct member cannot make sense of."""


class Transport(Protocol):
    async def join(self, key_package: bytes) -> pb.JoinResponse: ...

    async def create_group(self, generation: int, group_info: bytes) -> int: ...

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse: ...

    async def ready(self, epoch: int) -> None: ...

    async def leave(self) -> None: ...


class ManagerTransport:
    """Calls a :class:`RoomManager` in process (raises the DS's domain errors)."""

    def __init__(self, manager: RoomManager, room: str, identity: str) -> None:
        self.manager = manager
        self.room = room
        self.identity = identity

    async def join(self, key_package: bytes) -> pb.JoinResponse:
        return await self.manager.join(self.room, self.identity, key_package)

    async def create_group(self, generation: int, group_info: bytes) -> int:
        response = await self.manager.create_group(self.room, self.identity, generation, group_info)
        return response.seq

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse:
        request = pb.SubmitCommitRequest(
            epoch=epoch, commit=commit, welcome=welcome, group_info=group_info
        )
        return await self.manager.submit_commit(self.room, self.identity, request)

    async def ready(self, epoch: int) -> None:
        await self.manager.ready(self.room, self.identity, epoch)

    async def leave(self) -> None:
        await self.manager.leave(self.room, self.identity)


class Member:
    """One participant identity with its MLS state. See the module docstring."""

    def __init__(
        self,
        identity: str,
        transport: Transport,
        *,
        auto_commit: bool = True,
        auto_rejoin: bool = True,
    ) -> None:
        self.identity = identity
        self.transport = transport
        self.client = mls.MlsClient(identity, mls.SignatureKeyPair.generate())
        self.group: mls.Group | None = None
        self.config: pb.RoomConfig | None = None
        self.generation = 0
        self.executed = -1  # newest executed epoch of the current generation
        self.auto_commit = auto_commit
        self.auto_rejoin = auto_rejoin
        self.left = False
        self.submitted: bytes | None = None  # our commit the DS accepted, not applied yet
        self.accepted: list[pb.SubmitCommitResponse] = []
        self.rejected: list[Exception] = []
        self.applied: list[mls.CommitApplied] = []
        self.requests: list[pb.CommitRequest] = []
        self.acked: list[int] = []
        self.key_package_ref = b""  # of the key package uploaded last

    # ---- explicit steps --------------------------------------------------------------

    async def join(self) -> pb.JoinResponse:
        """Uploads a fresh key package (join or re-join)."""
        self.left = False
        key_package = self.client.generate_key_package()
        response = await self.transport.join(key_package)
        self.key_package_ref = mls.message_info(key_package).key_package_ref or b""
        self.config = response.config
        return response

    async def leave(self) -> None:
        self.left = True
        await self.transport.leave()

    def make_commit(
        self, **changes: Iterable[bytes] | Iterable[int] | Iterable[str]
    ) -> mls.CommitOutput:
        """A commit of every cached proposal (plus ``changes``); it stays pending."""
        group = self.require_group()
        return group.commit(**changes)  # type: ignore[arg-type]

    async def submit(
        self, output: mls.CommitOutput, *, epoch: int | None = None
    ) -> pb.SubmitCommitResponse:
        """Submits a commit made by :meth:`make_commit`; a rejected one is discarded."""
        group = self.require_group()
        # set before the call: the stream may deliver the accepted commit before it returns
        self.submitted = output.commit
        try:
            response = await self.transport.submit_commit(
                group.epoch if epoch is None else epoch,
                output.commit,
                output.welcome or b"",
                output.group_info or b"",
            )
        except BaseException:
            self.submitted = None
            if group.has_pending_commit and self.group is group:
                group.discard_pending_commit()
            raise
        self.accepted.append(response)
        return response

    async def commit(self) -> pb.SubmitCommitResponse:
        return await self.submit(self.make_commit())

    async def ready(self, epoch: int) -> None:
        await self.transport.ready(epoch)
        self.acked.append(epoch)

    def require_group(self) -> mls.Group:
        if self.group is None:
            raise ProtocolViolation(f"{self.identity} has no group")
        return self.group

    # ---- reacting to room events -----------------------------------------------------

    async def handle(self, event: pb.RoomEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "create_group":
            await self._on_create_group(event)
        elif kind == "proposal":
            self._on_proposal(event.proposal)
        elif kind == "commit_request":
            await self._on_commit_request(event.commit_request)
        elif kind == "commit":
            await self._on_commit(event.commit)
        elif kind == "welcome":
            await self._on_welcome(event.welcome)
        elif kind == "execute":
            self.executed = event.execute.epoch
        elif kind == "reset":
            self.group = None
            self.executed = -1
            self.generation = event.reset.generation
            if self.auto_rejoin and not self.left:
                await self.join()
        else:
            raise ProtocolViolation(f"unknown event {event}")

    async def _on_create_group(self, event: pb.RoomEvent) -> None:
        request = event.create_group
        self.generation = event.generation
        if request.creator != self.identity:
            return
        ds_sender = request.config.ds_signing_identity
        self.group = self.client.create_group(request.group_id, [ds_sender])
        await self.transport.create_group(event.generation, self.group.group_info())

    def _on_proposal(self, proposal: pb.Proposal) -> None:
        group = self.group
        if group is None:
            return  # not in the group yet (our own Add, or others' while we wait)
        if proposal.epoch != group.epoch:
            raise ProtocolViolation(
                f"{self.identity} at epoch {group.epoch} got a proposal for {proposal.epoch}"
            )
        received = group.process_message(proposal.message)
        if not isinstance(received, mls.ProposalReceived):
            raise ProtocolViolation(f"proposal event carried {received!r}")

    async def _on_commit_request(self, request: pb.CommitRequest) -> None:
        self.requests.append(request)
        group = self.group
        if not self.auto_commit or group is None or request.epoch != group.epoch:
            return
        if request.committer not in (self.identity, "") or group.has_pending_commit:
            return
        try:
            await self.commit()
        except EPOCH_CONFLICTS as e:
            self.rejected.append(e)  # another commit won, or a proposal came in between

    async def _on_commit(self, commit: pb.Commit) -> None:
        group = self.group
        if group is None:
            return  # a commit that adds us: the Welcome follows
        if commit.epoch != group.epoch:
            raise ProtocolViolation(
                f"{self.identity} at epoch {group.epoch} got the commit of epoch {commit.epoch}"
            )
        if group.has_pending_commit and commit.message != self.submitted:
            group.discard_pending_commit()  # another member's commit won the epoch
        applied = group.process_message(commit.message)
        self.submitted = None
        if not isinstance(applied, mls.CommitApplied):
            raise ProtocolViolation(f"commit event carried {applied!r}")
        self.applied.append(applied)
        if applied.self_removed or group.is_removed:
            self.group = None
            return
        await self.ready(group.epoch)

    async def _on_welcome(self, welcome: pb.Welcome) -> None:
        if self.identity not in welcome.recipients:
            raise ProtocolViolation(f"{self.identity} got a welcome for {welcome.recipients}")
        if self.key_package_ref not in welcome.key_package_refs:
            return  # made for a key package we uploaded before (the commit raced a re-join)
        if self.group is not None:
            raise ProtocolViolation(f"{self.identity} got a welcome while in the group")
        self.group = self.client.join_group(welcome.message)
        if self.group.epoch != welcome.epoch:
            raise ProtocolViolation(f"welcome for epoch {welcome.epoch} joined {self.group.epoch}")
        await self.ready(self.group.epoch)

    # ---- observations ----------------------------------------------------------------

    def roster(self) -> list[str]:
        return sorted(m.identity for m in self.require_group().members())


class GrpcMember(Member):
    """A member on a real gRPC connection with its room event stream.

    The stream is read into a queue by a background task. Drive the member either step by
    step (:meth:`next_event`, :meth:`step`, :meth:`until`) or let :meth:`start` handle
    every event in the background — never both at once.
    """

    def __init__(
        self,
        identity: str,
        room: str,
        target: str,
        token: str | Callable[[], str],
        **kw: bool,
    ) -> None:
        self.room = room
        self.client_ds = tp.DeliveryClient(target, token, timeout=EVENT_TIMEOUT)
        super().__init__(identity, self.client_ds, **kw)
        self.events: asyncio.Queue[pb.RoomEvent | BaseException] = asyncio.Queue()
        self.seen: list[pb.RoomEvent] = []
        self.received_at: list[float] = []  # time.monotonic() per event in ``seen``
        self.last_seq = 0
        self.stream_ended: BaseException | None = None  # why the DS ended the stream
        self._reader: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None

    async def join(self) -> pb.JoinResponse:
        """Joins; the first join also subscribes from the cursor it answers."""
        response = await super().join()
        if self._reader is None:
            self.subscribe(response.cursor)
        return response

    def subscribe(self, after: int) -> None:
        if self._reader is not None:
            raise RuntimeError("already subscribed")
        self.last_seq = after
        self._reader = asyncio.create_task(self._read(after), name=f"stream-{self.identity}")

    async def unsubscribe(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self.events = asyncio.Queue()

    async def _read(self, after: int) -> None:
        try:
            async for event in self.client_ds.subscribe(after, self.key_package_ref):
                self.events.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except tp.NotJoined as e:
            # out of the group (after its removal was delivered): a later join subscribes
            self.stream_ended = e
            self._reader = None
        except BaseException as e:
            self.events.put_nowait(e)

    async def next_event(self, timeout: float | None = EVENT_TIMEOUT) -> pb.RoomEvent:
        """The next event of the stream (raises the stream's error if it ended)."""
        item = await asyncio.wait_for(self.events.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        if item.seq <= self.last_seq:
            raise ProtocolViolation(
                f"{self.identity}: seq {item.seq} after {self.last_seq} (duplicate or reorder)"
            )
        self.last_seq = item.seq
        self.seen.append(item)
        self.received_at.append(time.monotonic())
        return item

    async def step(self, timeout: float | None = EVENT_TIMEOUT) -> pb.RoomEvent:
        event = await self.next_event(timeout)
        await self.handle(event)
        return event

    async def until(
        self,
        kind: str,
        where: Callable[[pb.RoomEvent], bool] | None = None,
        *,
        timeout: float = EVENT_TIMEOUT,
    ) -> pb.RoomEvent:
        """Handles events until one of ``kind`` (matching ``where``) was handled."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.step(max(0.001, deadline - time.monotonic()))
            if event.WhichOneof("event") == kind and (where is None or where(event)):
                return event

    def start(self) -> None:
        """Handles every event in the background until :meth:`stop`."""
        if self._pump is None:
            self._pump = asyncio.create_task(self._run(), name=f"pump-{self.identity}")

    async def _run(self) -> None:
        while True:
            await self.step(timeout=None)

    def check(self) -> None:
        """Raises what made the background handler stop, if it did."""
        pump = self._pump
        if pump is not None and pump.done() and not pump.cancelled():
            error = pump.exception()
            if error is not None:
                raise AssertionError(f"member {self.identity} failed: {error!r}") from error

    async def stop(self) -> None:
        pump, self._pump = self._pump, None
        if pump is None:
            return
        if pump.done() and not pump.cancelled():
            pump.result()
            return
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump

    async def close(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        await self.unsubscribe()
        await self.client_ds.close()


def check_all(members: Iterable[GrpcMember]) -> Callable[[], None]:
    members = list(members)

    def check() -> None:
        for member in members:
            member.check()

    return check


def converged(
    members: Iterable[Member], identities: Iterable[str] | None = None, epoch: int | None = None
) -> bool:
    """Every member is in the group at the same executed epoch (``epoch`` if given) with
    the same epoch authenticator, and the roster is exactly ``identities`` (default: the
    members)."""
    members = list(members)
    expected = sorted(identities) if identities is not None else sorted(m.identity for m in members)
    groups = [m.group for m in members]
    if any(g is None for g in groups):
        return False
    present = [g for g in groups if g is not None]
    epochs = {g.epoch for g in present}
    if len(epochs) != 1:
        return False
    current = epochs.pop()
    if epoch is not None and current != epoch:
        return False
    if any(m.executed != current for m in members):
        return False
    if len({g.epoch_authenticator() for g in present}) != 1:
        return False
    return all(sorted(m.identity for m in g.members()) == expected for g in present)
