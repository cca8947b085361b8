"""The gRPC API (livekit.mls.v1.DeliveryService): authentication, limits, status codes.

Every handler authenticates the caller from its LiveKit token, checks sizes and the
per-identity rate, calls the :class:`RoomManager`, and maps domain errors to a gRPC status
with a precise message. Unexpected failures become INTERNAL without details leaking out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from delivery_service.auth import Authenticator, Caller, KeyHolderPolicy
from delivery_service.errors import (
    EPOCH_METADATA_KEY,
    DeliveryError,
    EpochConflict,
    InvalidRequest,
    PermissionDenied,
    Unavailable,
)
from delivery_service.fanout import (
    Removed,
    Replaced,
    SlowSubscriber,
    StreamClosed,
    TokenExpired,
)
from delivery_service.limits import Limits, RateLimiter
from delivery_service.metrics import Metrics
from delivery_service.presence import LiveKitPresence
from delivery_service.rooms import RoomManager
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.proto import delivery_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


class Undecodable:
    """A request whose bytes are not the method's protobuf message."""

    def __init__(self, message_type: str, error: str) -> None:
        self.message_type = message_type
        self.error = error


def _tolerant(message_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Undecodable(message_type.__name__, str(e))

    return parse


def register(server: grpc.aio.Server, servicer: DeliveryServicer) -> None:
    """Adds the service to ``server`` like the generated ``add_..._to_server``, except that

    * a call whose metadata does not authenticate is answered before its body is decoded
      (six unauthenticated 20 MiB requests used to cost the DS 300 MiB of memory first);
    * a request that is not valid protobuf reaches the handler (as :class:`Undecodable`)
      and is answered INVALID_ARGUMENT, not grpcio's UNKNOWN."""
    service = pb.DESCRIPTOR.services_by_name["DeliveryService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[f"/{service.full_name}/{method.name}"] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request_type),
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers((_AuthenticatedService(handlers, servicer),))


class _AuthenticatedService(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The service's handlers behind a gate on the call's metadata."""

    def __init__(
        self, handlers: dict[str, grpc.RpcMethodHandler], servicer: DeliveryServicer
    ) -> None:
        self._handlers = handlers
        self._servicer = servicer

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(details.method)
        if handler is None:
            return None
        try:
            self._servicer.auth.authenticate(details.invocation_metadata)
        except DeliveryError as e:
            return self._refusal(details.method.rsplit("/", 1)[-1], handler, e)
        return handler

    def _refusal(
        self, method: str, handler: grpc.RpcMethodHandler, error: DeliveryError
    ) -> grpc.RpcMethodHandler:
        metrics = self._servicer.metrics

        async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
            metrics.requests.labels(method, error.status.name).inc()
            await context.abort(error.status, error.message)

        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        # the body is never decoded: the deserializer drops it
        return make(refuse, request_deserializer=lambda _: None)


def _serialize(message: Message | bytes) -> bytes:
    # Subscribe writes the log's stored RoomEvent bytes as they are (one serialization per
    # event, not per subscriber); every other response is a message
    return message if isinstance(message, bytes) else message.SerializeToString()


def _check_decoded(request: object) -> None:
    if isinstance(request, Undecodable):
        raise InvalidRequest(f"the request is not a valid {request.message_type}: {request.error}")


class DeliveryServicer(pb_grpc.DeliveryServiceServicer):
    def __init__(
        self,
        manager: RoomManager,
        authenticator: Authenticator,
        limits: Limits,
        metrics: Metrics,
        presence: LiveKitPresence | None = None,
        key_holders: KeyHolderPolicy = KeyHolderPolicy.SUBSCRIBERS,
    ) -> None:
        self.presence = presence
        self.key_holders = key_holders
        self.manager = manager
        self.auth = authenticator
        self.limits = limits
        self.metrics = metrics
        self.rate = RateLimiter(limits.rate_per_second, limits.burst)

    async def _unary(
        self,
        method: str,
        request: object,
        context: grpc.aio.ServicerContext,
        handler: Callable[[Caller], Awaitable[T]],
    ) -> T:
        code = grpc.StatusCode.OK
        try:
            caller = self.auth.authenticate(context.invocation_metadata())
            self.rate.check((caller.room, caller.identity))
            _check_decoded(request)
            return await handler(caller)
        except DeliveryError as e:
            code = e.status
            if isinstance(e, EpochConflict):
                context.set_trailing_metadata(((EPOCH_METADATA_KEY, str(e.epoch)),))
            await context.abort(code, e.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except ConnectionError as e:  # the store is unreachable: a retry may succeed
            code = grpc.StatusCode.UNAVAILABLE
            log.warning("%s: store unavailable: %s", method, e)
            await context.abort(code, "the store is unavailable; retry")
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, "internal error")
        finally:
            self.metrics.requests.labels(method, code.name).inc()
        raise AssertionError("unreachable")  # abort() raises

    async def _require_in_livekit(self, room: str, identity: str) -> None:
        """With a LiveKit URL, only participants LiveKit has in the room may join the group
        (fails closed: if LiveKit cannot be asked, the join is retried later)."""
        assert self.presence is not None
        present = await self.presence.is_present(room, identity)
        if present is None:
            raise Unavailable("LiveKit cannot be asked whether you are in the room now; retry")
        if not present:
            raise PermissionDenied(
                f"LiveKit does not have {identity!r} in room {room!r}: connect to the LiveKit "
                "room before joining its MLS group"
            )

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinResponse:
        async def handle(caller: Caller) -> pb.JoinResponse:
            self.limits.check_size("key_package", request.key_package)
            refusal = caller.may_hold_keys(self.key_holders)
            if refusal is not None:
                raise PermissionDenied(
                    f"{refusal}: such participants do not hold media keys in this "
                    f"deployment (--key-holders {self.key_holders.value})"
                )
            if self.presence is not None:
                await self._require_in_livekit(caller.room, caller.identity)
            response = await self.manager.join(caller.room, caller.identity, request.key_package)
            log.info("join room=%s identity=%s", caller.room, caller.identity)
            return response

        return await self._unary("Join", request, context, handle)

    async def CreateGroup(
        self, request: pb.CreateGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateGroupResponse:
        async def handle(caller: Caller) -> pb.CreateGroupResponse:
            self.limits.check_size("group_info", request.group_info)
            response = await self.manager.create_group(
                caller.room, caller.identity, request.generation, request.group_info
            )
            log.info("group created room=%s by=%s", caller.room, caller.identity)
            return response

        return await self._unary("CreateGroup", request, context, handle)

    async def SubmitCommit(
        self, request: pb.SubmitCommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitCommitResponse:
        async def handle(caller: Caller) -> pb.SubmitCommitResponse:
            self.limits.check_size("commit", request.commit)
            self.limits.check_size("welcome", request.welcome)
            self.limits.check_size("group_info", request.group_info)
            start = time.perf_counter()
            try:
                response = await self.manager.submit_commit(caller.room, caller.identity, request)
            except EpochConflict:
                self.metrics.commits_rejected.labels("epoch").inc()
                raise
            except DeliveryError:
                self.metrics.commits_rejected.labels("invalid").inc()
                raise
            self.metrics.commit_latency.observe(time.perf_counter() - start)
            log.info(
                "commit accepted room=%s by=%s epoch=%d seq=%d",
                caller.room,
                caller.identity,
                response.epoch,
                response.seq,
            )
            return response

        return await self._unary("SubmitCommit", request, context, handle)

    async def Ready(
        self, request: pb.ReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReadyResponse:
        async def handle(caller: Caller) -> pb.ReadyResponse:
            await self.manager.ready(caller.room, caller.identity, request.epoch)
            return pb.ReadyResponse()

        return await self._unary("Ready", request, context, handle)

    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaveResponse:
        async def handle(caller: Caller) -> pb.LeaveResponse:
            if await self.manager.leave(caller.room, caller.identity):
                log.info("leave room=%s identity=%s", caller.room, caller.identity)
            return pb.LeaveResponse()

        return await self._unary("Leave", request, context, handle)

    async def ReportFailure(
        self, request: pb.ReportFailureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportFailureResponse:
        async def handle(caller: Caller) -> pb.ReportFailureResponse:
            self.limits.check_size("reason", request.reason)
            outcome = await self.manager.report_failure(
                caller.room, caller.identity, request.seq, request.reason
            )
            log.warning(
                "member failure room=%s identity=%s epoch=%d seq=%d outcome=%s reason=%r",
                caller.room,
                caller.identity,
                request.epoch,
                request.seq,
                outcome,
                request.reason,
            )
            return pb.ReportFailureResponse()

        return await self._unary("ReportFailure", request, context, handle)

    async def ReportDisconnect(
        self, request: pb.ReportDisconnectRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportDisconnectResponse:
        async def handle(caller: Caller) -> pb.ReportDisconnectResponse:
            self.limits.check_size("identity", request.identity)
            if not await self.manager.is_participant(caller.room, caller.identity):
                raise PermissionDenied("only a participant of the room may report disconnects")
            if self.presence is not None:
                present = await self.presence.is_present(caller.room, request.identity)
                if present is None:  # fail closed: one member must not remove another
                    raise Unavailable("LiveKit cannot be asked about this participant now; retry")
                if present:
                    log.info(
                        "disconnect report ignored: LiveKit still has room=%s identity=%s",
                        caller.room,
                        request.identity,
                    )
                    return pb.ReportDisconnectResponse()
            if await self.manager.leave(caller.room, request.identity):
                log.info(
                    "disconnect reported room=%s identity=%s by=%s",
                    caller.room,
                    request.identity,
                    caller.identity,
                )
            return pb.ReportDisconnectResponse()

        return await self._unary("ReportDisconnect", request, context, handle)

    async def Subscribe(  # type: ignore[override]
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write (not yield) of the stored, already serialized events
        # (see register()): no per-subscriber parsing. A subscriber whose queue overflows
        # may be stuck in a write to a client that stopped reading: it is cut off by
        # cancelling this handler, then answered RESOURCE_EXHAUSTED.
        code = grpc.StatusCode.OK
        handler = asyncio.current_task()
        cut_off = False

        def on_fail(error: BaseException) -> None:
            nonlocal cut_off
            if isinstance(error, SlowSubscriber) and handler is not None:
                log.warning("cutting off a stream that fell behind: %s", error)
                cut_off = True
                handler.cancel()

        try:
            caller = self.auth.authenticate(context.invocation_metadata())
            self.rate.check((caller.room, caller.identity))
            _check_decoded(request)
            stream = self.manager.stream(
                caller.room,
                caller.identity,
                request.after,
                on_fail,
                key_package_ref=request.key_package_ref,
                expires_at=caller.expires_at,
            )
            async for entry in stream:
                await context.write(entry.event)
                self.metrics.events_delivered.inc()
        except asyncio.CancelledError:
            if not cut_off:
                code = grpc.StatusCode.CANCELLED
                raise
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.metrics.subscribers_cut.inc()
            await context.abort(
                code, "the stream fell behind; resume from your last sequence number"
            )
        except SlowSubscriber as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.metrics.subscribers_cut.inc()
            await context.abort(code, f"{e}; resume from your last sequence number")
        except StreamClosed as e:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"{e}; resume from your last sequence number")
        except Replaced as e:
            code = grpc.StatusCode.ABORTED
            await context.abort(code, str(e))
        except Removed as e:
            code = grpc.StatusCode.NOT_FOUND
            await context.abort(code, str(e))
        except TokenExpired as e:
            code = grpc.StatusCode.UNAUTHENTICATED
            await context.abort(code, str(e))
        except DeliveryError as e:
            code = e.status
            await context.abort(code, e.message)
        except ConnectionError as e:
            code = grpc.StatusCode.UNAVAILABLE
            log.warning("Subscribe: store unavailable: %s", e)
            await context.abort(code, "the store is unavailable; resume from your last sequence")
        except Exception:
            if context.cancelled():  # the client went away mid-write: nothing went wrong here
                code = grpc.StatusCode.CANCELLED
                return
            code = grpc.StatusCode.INTERNAL
            log.exception("Subscribe failed")
            await context.abort(code, "internal error")
        finally:
            self.metrics.requests.labels("Subscribe", code.name).inc()
