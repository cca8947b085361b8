"""The client side of the delivery service API: one authenticated gRPC channel.

Every call carries the participant's LiveKit access token. Failures are typed
(:class:`DeliveryServiceError` subclasses, each with the gRPC ``code`` and message), so the
session can tell "retry after processing the stream" (:class:`EpochConflict`) from
"join again" (:class:`CursorTooOld`) from "give up" (:class:`Unauthenticated`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import grpc
import jwt

from mls_provider.proto import delivery_pb2 as pb
from mls_provider.proto import delivery_pb2_grpc as pb_grpc

R = TypeVar("R")

EPOCH_METADATA_KEY = "x-mls-epoch"
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
# the channel's reconnect backoff: first retry, longest wait between attempts (ms)
RECONNECT_BACKOFF_MS = (100, 500)


class DeliveryServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class EpochConflict(DeliveryServiceError):
    """FAILED_PRECONDITION: the request does not fit the room's epoch (``epoch``)."""

    def __init__(self, code: grpc.StatusCode, message: str, epoch: int) -> None:
        super().__init__(code, message)
        self.epoch = epoch


class Unauthenticated(DeliveryServiceError):
    """The token is missing, malformed, expired or not signed by the deployment."""


class PermissionDenied(DeliveryServiceError):
    """The token does not allow the request."""


class NotJoined(DeliveryServiceError):
    """NOT_FOUND: the caller has not joined the room (or was removed)."""


class CursorTooOld(DeliveryServiceError):
    """OUT_OF_RANGE: the stream cursor is older than the retained log: join again."""


class InvalidRequest(DeliveryServiceError):
    """INVALID_ARGUMENT: the DS rejected the MLS content."""


class Replaced(DeliveryServiceError):
    """ABORTED: a newer connection of this identity joined the room (another device):
    this one must stop, without joining again."""


class ResourceExhausted(DeliveryServiceError):
    """Too large, too fast, or (on a stream) fell behind: back off and resume."""


class Unavailable(DeliveryServiceError):
    """The DS is unreachable or shutting down: retry (resume streams from the cursor)."""


_ERRORS: dict[grpc.StatusCode, type[DeliveryServiceError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotJoined,
    grpc.StatusCode.OUT_OF_RANGE: CursorTooOld,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.ABORTED: Replaced,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def translate(error: grpc.aio.AioRpcError) -> DeliveryServiceError:
    code, message = error.code(), error.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        epoch = -1
        for key, value in error.trailing_metadata() or ():
            if key == EPOCH_METADATA_KEY:
                epoch = int(value)
        return EpochConflict(code, message, epoch)
    return _ERRORS.get(code, DeliveryServiceError)(code, message)


def _call_cancelled() -> bool:
    """True when a CancelledError came from the gRPC call (e.g. its channel was closed),
    not from the cancellation of the task awaiting it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _unavailable_after_cancel() -> Unavailable:
    return Unavailable(grpc.StatusCode.CANCELLED, "the call was cancelled (its channel closed)")


TokenSource = str | Callable[[], str]


class DeliveryClient:
    """Async client of one DS address. ``token`` may be a callable returning a fresh
    token (called per request), for long sessions that outlive one token.

    By default every call waits for the channel to be connected (gRPC ``wait_for_ready``)
    for up to its timeout instead of failing at once while the DS is unreachable: every
    call of this API is idempotent, and a DS that comes back is used the moment it is
    reachable. A status the DS answers (a refusal) is raised at once as a typed error.
    ``wait_for_ready=False`` fails at once instead (for a client that moves between DS
    addresses itself)."""

    def __init__(
        self,
        target: str,
        token: TokenSource,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 30.0,
        wait_for_ready: bool = True,
    ) -> None:
        self.target = target
        self._token = token
        self._credentials = credentials
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.DeliveryServiceStub | None = None

    async def __aenter__(self) -> DeliveryClient:
        self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def connect(self) -> None:
        if self._channel is not None:
            return
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            # A DS that restarts must be used again at once: gRPC's default reconnect
            # backoff (1 s growing to 120 s) kept calls failing for seconds after the DS
            # was back. A refused connection costs nothing, so retry it often.
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ]
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options)
        self._stub = pb_grpc.DeliveryServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    @property
    def stub(self) -> pb_grpc.DeliveryServiceStub:
        if self._stub is None:
            self.connect()
        assert self._stub is not None
        return self._stub

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._current_token()}"),)

    async def join(self, key_package: bytes) -> pb.JoinResponse:
        response: pb.JoinResponse = await self._call(
            self.stub.Join, pb.JoinRequest(key_package=key_package)
        )
        return response

    async def create_group(self, generation: int, group_info: bytes) -> int:
        request = pb.CreateGroupRequest(generation=generation, group_info=group_info)
        response: pb.CreateGroupResponse = await self._call(self.stub.CreateGroup, request)
        return response.seq

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse:
        request = pb.SubmitCommitRequest(
            epoch=epoch, commit=commit, welcome=welcome, group_info=group_info
        )
        response: pb.SubmitCommitResponse = await self._call(self.stub.SubmitCommit, request)
        return response

    async def ready(self, epoch: int) -> None:
        await self._call(self.stub.Ready, pb.ReadyRequest(epoch=epoch))

    async def leave(self, timeout: float | None = None) -> None:
        await self._call(self.stub.Leave, pb.LeaveRequest(), timeout)

    async def report_failure(self, epoch: int, reason: str, seq: int = 0) -> None:
        request = pb.ReportFailureRequest(epoch=epoch, reason=reason[:500], seq=seq)
        await self._call(self.stub.ReportFailure, request)

    async def report_disconnect(self, identity: str) -> None:
        await self._call(self.stub.ReportDisconnect, pb.ReportDisconnectRequest(identity=identity))

    @property
    def room(self) -> str:
        """The LiveKit room our token names (read without verifying: it is our own)."""
        try:
            claims = jwt.decode(self._current_token(), options={"verify_signature": False})
            room = claims["video"]["room"]
        except (jwt.PyJWTError, KeyError, TypeError) as e:
            raise ValueError(f"the access token names no room: {e}") from None
        if not isinstance(room, str) or not room:
            raise ValueError("the access token names no room")
        return room

    def _current_token(self) -> str:
        return self._token() if callable(self._token) else self._token

    def has_fresh_token(self) -> bool:
        """Whether the token source hands out a token that has not expired yet (a
        callable source renews it; a fixed token cannot be renewed once it expired)."""
        if not callable(self._token):
            return False
        try:
            claims = jwt.decode(self._token(), options={"verify_signature": False})
            return float(claims["exp"]) > time.time()
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            return False

    async def subscribe(
        self, after: int, key_package_ref: bytes = b""
    ) -> AsyncIterator[pb.RoomEvent]:
        """The room's events after ``after``; raises a typed error when the stream ends.
        ``key_package_ref`` names this client instance (the newest instance of an
        identity wins: an older one's stream ends with :class:`Replaced`)."""
        call = self.stub.Subscribe(
            pb.SubscribeRequest(after=after, key_package_ref=key_package_ref),
            metadata=self._metadata(),
            wait_for_ready=self.wait_for_ready,
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as e:
            raise translate(e) from None
        except asyncio.CancelledError:
            if not _call_cancelled():
                raise  # our caller is being cancelled
            raise _unavailable_after_cancel() from None
        finally:
            call.cancel()

    async def _call(
        self, method: Callable[..., Awaitable[R]], request: object, timeout: float | None = None
    ) -> R:
        try:
            return await method(
                request,
                metadata=self._metadata(),
                timeout=self.timeout if timeout is None else timeout,
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.aio.AioRpcError as e:
            raise translate(e) from None
        except asyncio.CancelledError:
            if not _call_cancelled():
                raise
            raise _unavailable_after_cancel() from None
