"""Domain errors of the delivery service, each with the gRPC status it maps to.

The ordering logic and the stores raise these; the API layer turns them into a gRPC
status with the message (and, for epoch errors, trailing metadata ``x-mls-epoch``).
A raised error always means nothing was changed or stored.
"""

from __future__ import annotations

import grpc

EPOCH_METADATA_KEY = "x-mls-epoch"


class DeliveryError(Exception):
    """Base class; ``status`` is the gRPC status code the API answers with."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(DeliveryError):
    """Malformed or invalid input: bad MLS bytes, a commit that fails validation."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(DeliveryError):
    """No token, or a token that is malformed, expired or not signed by our API key."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DeliveryError):
    """A valid token that does not allow this action (room grant, identity mismatch)."""

    status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(DeliveryError):
    """The caller is not part of the room's group (no Join yet)."""

    status = grpc.StatusCode.NOT_FOUND


class TooLarge(DeliveryError):
    """A message above the configured size limit."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(DeliveryError):
    """Too many requests from one identity."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DeliveryError):
    """Something the answer depends on (LiveKit's RoomService, the store) cannot be asked
    now: retry."""

    status = grpc.StatusCode.UNAVAILABLE


class OutOfRange(DeliveryError):
    """A stream cursor older than the retained log: join again."""

    status = grpc.StatusCode.OUT_OF_RANGE


class EpochConflict(DeliveryError):
    """The request does not fit the room's current epoch. ``epoch`` is the current one.

    Raised for stale commits (another commit won the epoch), commits submitted while the
    transition to the current epoch is still running, and commits that miss a proposal
    issued for the current epoch: in every case, process the stream and retry.
    """

    status = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


class Contention(DeliveryError):
    """Several DS processes kept writing the same room at once: retry."""

    status = grpc.StatusCode.UNAVAILABLE


class VersionConflict(Exception):
    """A store write lost a compare-and-set race (another DS process wrote first)."""
