"""The delivery service's persisted state of one room and its log entries.

A room's state is one record written atomically with the log entries it produced
(compare-and-set on ``version``), so the record and the log never disagree, whatever
the store backend.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mls_provider.proto import delivery_pb2 as pb


class Phase(enum.StrEnum):
    EMPTY = "empty"  # no group; the next joiner is asked to create one
    CREATING = "creating"  # waiting for `creator` to upload the new group's GroupInfo
    ACTIVE = "active"  # the group exists; the observer follows it


def group_id_for(room: str, generation: int) -> bytes:
    """The MLS group id of a room's generation (docs/protocol.md, "Group id")."""
    return hashlib.sha256(
        b"livekit-mls v1 group id\x00" + room.encode() + b"\x00" + generation.to_bytes(8, "big")
    ).digest()


@dataclass
class Participant:
    """An identity that wants to be in the group, with the key package it uploaded."""

    identity: str
    kp_ref: bytes  # the key package itself is stored beside the room record, by ref
    joined_at: float


@dataclass
class PendingProposal:
    """A DS-issued proposal of the current epoch, awaiting a commit."""

    ref: bytes
    kind: str  # "add" | "remove"
    identity: str
    kp_ref: bytes  # for "add": which key package it adds
    issued_at: float


@dataclass
class CommitRequestState:
    epoch: int
    committer: str  # "" = anyone
    refs: list[bytes]  # the pending proposals the request covers
    at: float
    passed: list[str] = field(default_factory=list)  # designees that missed their deadline


@dataclass
class CommitRecord:
    """The room's latest accepted commit, kept to weigh reports from members that could
    not process it (docs/protocol.md, "Bad commits")."""

    epoch: int  # the epoch it started
    seq: int  # its log position
    committer: str
    # members that had to process it: in the group before and after it, not its committer
    judges: list[str]
    accepted_at: float
    welcome_seq: int = 0  # log position of its Welcome (0: none)
    added: list[str] = field(default_factory=list)
    reporters: list[str] = field(default_factory=list)  # judges that could not process it


@dataclass
class RoomState:
    room: str
    version: int = 0
    generation: int = 0
    phase: Phase = Phase.EMPTY
    group_id: bytes = b""
    creator: str = ""
    phase_since: float = 0.0
    observer_snapshot: bytes = b""
    group_info: bytes = b""
    epoch: int = 0
    executed_epoch: int = -1
    participants: dict[str, Participant] = field(default_factory=dict)
    # identity -> ref of the key package its current leaf was added with
    members: dict[str, bytes] = field(default_factory=dict)
    pending: list[PendingProposal] = field(default_factory=list)
    commit_request: CommitRequestState | None = None
    head: int = 0  # seq of the last log entry
    # sha256(commit) -> [seq, new epoch], for idempotent retries of an accepted commit
    accepted: dict[str, list[int]] = field(default_factory=dict)
    last_commit: CommitRecord | None = None
    reset_seq: int = 0  # log position of the latest reset (reports before it are stale)
    # members not to designate for the next commit request (their Welcome failed)
    avoid: list[str] = field(default_factory=list)
    # identity -> until when it may not join (it committed what others could not process)
    cooldown: dict[str, float] = field(default_factory=dict)
    # identity -> when it last committed without pending proposals (an update)
    updates: dict[str, float] = field(default_factory=dict)
    # identity -> when the credential of its leaf expires (authority credentials only)
    expiries: dict[str, float] = field(default_factory=dict)

    @property
    def transition_open(self) -> bool:
        """A commit was accepted and its epoch is not executed yet."""
        return self.phase is Phase.ACTIVE and self.executed_epoch < self.epoch

    @property
    def disputed(self) -> bool:
        """Members reported that they cannot process the open transition's commit."""
        c = self.last_commit
        return (
            self.transition_open and c is not None and c.epoch == self.epoch and bool(c.reporters)
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), default=_encode, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RoomState:
        raw = json.loads(data, object_hook=_decode)
        raw["phase"] = Phase(raw["phase"])
        raw["participants"] = {k: Participant(**v) for k, v in raw["participants"].items()}
        raw["pending"] = [PendingProposal(**p) for p in raw["pending"]]
        if raw["commit_request"] is not None:
            raw["commit_request"] = CommitRequestState(**raw["commit_request"])
        if raw.get("last_commit") is not None:
            raw["last_commit"] = CommitRecord(**raw["last_commit"])
        return cls(**raw)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$b": base64.b64encode(value).decode()}
    raise TypeError(f"cannot encode {type(value)}")


def _decode(obj: dict[str, Any]) -> Any:
    if obj.keys() == {"$b"}:
        return base64.b64decode(obj["$b"])
    return obj


@dataclass(frozen=True)
class LogEntry:
    """One entry of a room's log: a serialized RoomEvent and who may see it."""

    seq: int
    event: bytes  # RoomEvent, serialized, with seq and generation set
    recipients: tuple[str, ...] | None = None  # None: every subscriber of the room

    def visible_to(self, identity: str) -> bool:
        return self.recipients is None or identity in self.recipients

    def decode(self) -> pb.RoomEvent:
        event = pb.RoomEvent()
        event.ParseFromString(self.event)
        return event
