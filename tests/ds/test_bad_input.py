"""Randomized bad input on every RPC of a running DS (>= 5,000 requests, fixed seed).

Random and mutated bytes in every MLS field (key_package, group_info, commit, welcome),
wrong epochs, callers that are not members, rooms without a group, oversized fields (above
deliberately small configured limits) and messages (above the gRPC message limit), and
replayed commits. Every answer must be a documented status for its kind of input —
never INTERNAL or UNKNOWN —, rejected requests must leave every room's record and log
exactly as they were (and the manager's cached record equal to the stored one), and
afterwards a valid member must still be served: its pending commit is accepted, the
joiner it adds is welcomed and the room converges.

The seed is ``LIVEKIT_MLS_FUZZ_SEED`` (default fixed) and the request count
``LIVEKIT_MLS_FUZZ_REQUESTS`` (default 6000).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from delivery_service.limits import KIB, Limits
from delivery_service.model import Phase
from delivery_service.ordering import OrderingConfig
from delivery_service.server import DeliveryServer
from mls_provider import mls
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.proto import delivery_pb2_grpc as pb_grpc

from .conftest import (
    OTHER_SECRET,
    WAIT,
    MakeMember,
    StartDs,
    bearer,
    joined_room,
    manager_of,
    mint_token,
    raw_channel,
    room_snapshot,
    target,
    wait_until,
)
from .members import GrpcMember, check_all, converged

pytestmark = pytest.mark.timeout(180)

SEED = int(os.environ.get("LIVEKIT_MLS_FUZZ_SEED", "20251127"))
REQUESTS = int(os.environ.get("LIVEKIT_MLS_FUZZ_REQUESTS", "6000"))
CONCURRENCY = 48
ROOM, CREATING_ROOM = "fuzz-room", "fuzz-creating"
LIMITS = Limits(
    key_package=2 * KIB,
    commit=16 * KIB,
    welcome=32 * KIB,
    group_info=32 * KIB,
    reason=256,
    identity=256,  # the same bound as reason: text_limit() checks both against it
    rate_per_second=1_000_000.0,
    burst=1_000_000,
)
# Nothing may happen on its own while the fuzzer runs: no deadline is ever reached.
ORDERING = OrderingConfig(
    commit_timeout=600.0,
    execute_timeout=600.0,
    create_timeout=600.0,
    batch_quiet=0.0,
    batch_max_wait=0.0,
    update_interval=0.0,  # tests make epochs with update commits; the limit: test_hostile
)
ACCEPTED_COMMITS = 20  # more than the DS keeps for idempotent retries (16)

Code = grpc.StatusCode
OK, INVALID, PRECONDITION, DENIED = (
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED,
)
NOT_FOUND, EXHAUSTED, UNAUTH = Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED
Metadata = tuple[tuple[str, str], ...]


def text_limit(text: str, refusals: set[grpc.StatusCode]) -> frozenset[grpc.StatusCode]:
    """Statuses for a string field under the ``reason`` limit (in UTF-8 bytes):
    RESOURCE_EXHAUSTED above it, else OK or ``refusals``."""
    if len(text.encode()) > LIMITS.reason:
        return frozenset({EXHAUSTED})
    return frozenset(refusals or {OK})


@dataclass
class Probe:
    category: str
    rpc: str
    request: Message
    metadata: Metadata
    allowed: frozenset[grpc.StatusCode]
    # extra check of the answer: (response or None, error or None)
    check: Callable[[Any, grpc.aio.AioRpcError | None], None] | None = None


@dataclass
class Context:
    """What the fuzzer mutates and who it impersonates."""

    epoch: int  # the room's current epoch
    alice: Metadata
    bob: Metadata
    eve: Metadata  # valid token for the room, never joined
    carla: Metadata  # the named creator of CREATING_ROOM
    dan: Metadata  # a participant of CREATING_ROOM that is not the creator
    ghosts: list[Metadata]  # valid tokens for rooms that have no group
    pending: mls.CommitOutput  # alice's valid commit (adds zed), never submitted by fuzzer
    bobs: mls.CommitOutput  # bob's valid commit of the same epoch (bob's leaf)
    stale: mls.CommitOutput  # bob's commit of an older epoch
    history: list[tuple[int, bytes, pb.SubmitCommitResponse]]  # accepted (epoch, commit, resp)
    key_package: bytes  # a valid key package of alice's (never uploaded)
    group_info: bytes  # a valid GroupInfo of carla's new group (never uploaded)
    # the DS's MLS validation of each field (a copy of its own observer / key pair)
    accepts_commit: Callable[[bytes], bool]
    accepts_key_package: Callable[[bytes], bool]
    accepts_group_info: Callable[[bytes], bool]
    members: tuple[str, ...] = ("alice", "bob", "zed", "carla", "dan")
    undetectable: int = 0  # mutations an external observer cannot detect (skipped)
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)


class Fuzzer:
    def __init__(self, rng: random.Random, ctx: Context) -> None:
        self.rng = rng
        self.ctx = ctx

    # ---- byte generators ---------------------------------------------------------------

    def noise(self, low: int = 0, high: int = 1500) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def mls_looking(self) -> bytes:
        """Random bytes behind a valid MLS version and a random wire format."""
        wire = self.rng.choice([1, 2, 3, 4, 5, 6, 0, 0xFFFF])
        return b"\x00\x01" + wire.to_bytes(2, "big") + self.noise(0, 600)

    def mutate(self, data: bytes) -> bytes:
        """A corrupted copy of ``data`` (never equal to it)."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(7)
            if op == 0 and out:  # flip bits
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
            elif op == 1 and len(out) > 1:  # truncate
                del out[rng.randrange(1, len(out)) :]
            elif op == 2:  # trailing garbage
                out += rng.randbytes(rng.randint(1, 64))
            elif op == 3 and out:  # overwrite a slice
                i = rng.randrange(len(out))
                n = rng.randint(1, 32)
                out[i : i + n] = rng.randbytes(n)
            elif op == 4 and out:  # extreme byte
                out[rng.randrange(len(out))] = rng.choice([0, 0xFF, 0x7F, 0x80])
            elif op == 5 and len(out) > 8:  # drop a slice
                i = rng.randrange(len(out) - 4)
                del out[i : i + rng.randint(1, 4)]
            else:  # duplicate a slice
                i = rng.randrange(len(out) or 1)
                out[i:i] = out[i : i + rng.randint(1, 16)]
        if bytes(out) == data:
            out.append(0)
        return bytes(out)

    def bad_bytes(self, valid: bytes, accepts: Callable[[bytes], bool]) -> bytes:
        """Random, MLS-looking or mutated bytes that the DS's own MLS validation (``accepts``)
        refuses. Some corruptions are invisible to an external observer — the membership
        and confirmation tags of a commit are MACs under epoch secrets the DS never has —
        so those are not bad input for the DS and are skipped (members reject them)."""
        for _ in range(100):
            pick = self.rng.randrange(4)
            if pick == 0:
                data = self.noise()
            elif pick == 1:
                data = self.mls_looking()
            else:
                data = self.mutate(valid)
            if not accepts(data):
                return data
            self.ctx.undetectable += 1
        raise AssertionError("no refused mutation found")

    def epoch(self) -> int:
        return self.rng.choice(
            [
                0,
                1,
                self.ctx.epoch - 1,
                self.ctx.epoch + 1,
                2**63,
                2**64 - 1,
                self.rng.randrange(2**32),
            ]
        )

    def identity(self) -> str:
        alphabet = "abcxyz-_.@ü€\u200b漢0123456789 "
        name = "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, 40)))
        return name + "~" if name in self.ctx.members else name

    def ghost(self) -> Metadata:
        return self.rng.choice(self.ctx.ghosts)

    # ---- probes ------------------------------------------------------------------------

    def expect_epoch_trailer(self, response: Any, error: grpc.aio.AioRpcError | None) -> None:
        assert error is not None
        trailer = dict(error.trailing_metadata() or ())
        assert trailer.get("x-mls-epoch") == str(self.ctx.epoch), trailer

    def probe(self) -> Probe:
        ctx, rng = self.ctx, self.rng
        kind = rng.randrange(24)
        p = ctx.pending
        if kind == 0:
            return Probe(
                "join: bad key package",
                "Join",
                pb.JoinRequest(
                    key_package=self.bad_bytes(ctx.key_package, ctx.accepts_key_package)
                ),
                rng.choice([ctx.alice, ctx.bob, ctx.eve]),
                frozenset({INVALID}),
            )
        if kind == 1:
            return Probe(
                "join: key package of another identity",
                "Join",
                pb.JoinRequest(key_package=ctx.key_package),
                rng.choice([ctx.bob, ctx.eve, self.ghost()]),
                frozenset({DENIED}),
            )
        if kind == 2:
            return Probe(
                "join: oversized key package",
                "Join",
                pb.JoinRequest(
                    key_package=rng.randbytes(LIMITS.key_package + rng.randint(1, 4096))
                ),
                rng.choice([ctx.alice, ctx.eve, self.ghost()]),
                frozenset({EXHAUSTED}),
            )
        if kind in (3, 4, 5):
            return Probe(
                "commit: bad commit bytes",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=ctx.epoch,
                    commit=self.bad_bytes(p.commit, ctx.accepts_commit),
                    welcome=p.welcome or b"",
                    group_info=p.group_info or b"",
                ),
                rng.choice([ctx.alice, ctx.alice, ctx.bob, ctx.eve]),
                frozenset({INVALID, PRECONDITION, DENIED}),
            )
        if kind == 6:
            return Probe(
                "commit: bad welcome",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=ctx.epoch,
                    commit=p.commit,
                    # missing, random, or another kind of MLS message
                    welcome=rng.choice(
                        [b"", self.noise(1), p.commit, p.group_info or b"", ctx.key_package]
                    ),
                    group_info=p.group_info or b"",
                ),
                ctx.alice,
                frozenset({INVALID}),
            )
        if kind == 7:
            gi = p.group_info or b""
            return Probe(
                "commit: bad group info",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=ctx.epoch,
                    commit=p.commit,
                    welcome=p.welcome or b"",
                    group_info=rng.choice(
                        [self.noise(1), gi[:4] + b"\x00", p.commit, p.welcome or b""]
                    ),
                ),
                ctx.alice,
                frozenset({INVALID}),
            )
        if kind == 8:
            wrong = self.epoch()
            wrong = wrong if wrong != ctx.epoch else ctx.epoch + 1
            return Probe(
                "commit: wrong epoch",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=wrong, commit=p.commit, welcome=p.welcome or b"", group_info=b""
                ),
                ctx.alice,
                frozenset({PRECONDITION}),
                self.expect_epoch_trailer,
            )
        if kind == 9:
            out = rng.choice([p, ctx.bobs])
            return Probe(
                "commit: a member's commit from a non-member",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=ctx.epoch, commit=out.commit, welcome=out.welcome or b""
                ),
                ctx.eve,
                frozenset({DENIED}),
            )
        if kind == 10:
            return Probe(
                "commit: bob's commit as alice",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=ctx.epoch, commit=ctx.bobs.commit, welcome=ctx.bobs.welcome or b""
                ),
                ctx.alice,
                frozenset({DENIED}),
            )
        if kind == 11:
            epoch, commit, _ = rng.choice(ctx.history[:-16])
            return Probe(
                "commit: replay (forgotten)",
                "SubmitCommit",
                pb.SubmitCommitRequest(epoch=epoch, commit=commit),
                rng.choice([ctx.alice, ctx.bob]),
                frozenset({PRECONDITION}),
                self.expect_epoch_trailer,
            )
        if kind == 12:
            epoch, commit, original = rng.choice(ctx.history[-16:])

            def same(response: Any, error: grpc.aio.AioRpcError | None) -> None:
                assert (response.seq, response.epoch) == (original.seq, original.epoch)

            return Probe(
                "commit: replay (idempotent retry)",
                "SubmitCommit",
                pb.SubmitCommitRequest(epoch=epoch, commit=commit),
                ctx.alice,
                frozenset({OK}),
                same,
            )
        if kind == 13:
            return Probe(
                "commit: stale (older epoch)",
                "SubmitCommit",
                pb.SubmitCommitRequest(
                    epoch=rng.choice([ctx.epoch - 1, ctx.epoch]), commit=ctx.stale.commit
                ),
                ctx.bob,
                frozenset({PRECONDITION}),
                self.expect_epoch_trailer,
            )
        if kind == 14:
            which = rng.choice(["commit", "welcome", "group_info"])
            limit = getattr(LIMITS, which)
            oversized = pb.SubmitCommitRequest(epoch=ctx.epoch, commit=p.commit)
            setattr(oversized, which, rng.randbytes(limit + rng.randint(1, 2048)))
            return Probe(
                f"commit: oversized {which}",
                "SubmitCommit",
                oversized,
                rng.choice([ctx.alice, ctx.eve, self.ghost()]),
                frozenset({EXHAUSTED}),
            )
        if kind == 15:
            caller = rng.choice([ctx.alice, ctx.bob, ctx.eve, self.ghost()])
            joined = caller is ctx.alice or caller is ctx.bob
            return Probe(
                "ready: any epoch",
                "Ready",
                pb.ReadyRequest(epoch=self.epoch()),
                caller,
                frozenset({OK, PRECONDITION} if joined else {NOT_FOUND}),
            )
        if kind == 16:
            caller = rng.choice([ctx.alice, ctx.bob, ctx.eve])
            identity = self.identity()
            if rng.random() < 0.1:
                identity = rng.choice(["x", "漢"]) * (LIMITS.reason + rng.randint(-100, 50))
            return Probe(
                "report disconnect: unknown identity",
                "ReportDisconnect",
                pb.ReportDisconnectRequest(identity=identity),
                caller,
                text_limit(identity, {DENIED} if caller is ctx.eve else set()),
            )
        if kind == 17:
            caller = rng.choice([ctx.eve, self.ghost()])
            if rng.random() < 0.3:
                return Probe(
                    "leave: non-member", "Leave", pb.LeaveRequest(), caller, frozenset({OK})
                )
            reason = self.identity() * rng.randint(0, 12)
            return Probe(
                "report failure: non-member",
                "ReportFailure",
                pb.ReportFailureRequest(epoch=self.epoch(), reason=reason),
                caller,
                text_limit(reason, {NOT_FOUND}),
            )
        if kind == 18:
            return Probe(
                "create group: room already has a group",
                "CreateGroup",
                pb.CreateGroupRequest(generation=rng.choice([0, 1]), group_info=ctx.group_info),
                rng.choice([ctx.alice, ctx.eve]),
                frozenset({PRECONDITION}),
            )
        if kind == 19:
            return Probe(
                "create group: bad group info from the creator",
                "CreateGroup",
                pb.CreateGroupRequest(
                    generation=0, group_info=self.bad_bytes(ctx.group_info, ctx.accepts_group_info)
                ),
                ctx.carla,
                frozenset({INVALID}),
            )
        if kind == 20:
            generation = rng.choice([1, 2, 2**64 - 1])
            caller, allowed = rng.choice(
                [(ctx.dan, DENIED), (ctx.carla, PRECONDITION), (ctx.dan, DENIED)]
            )
            return Probe(
                "create group: wrong creator / generation",
                "CreateGroup",
                pb.CreateGroupRequest(
                    generation=generation if caller is ctx.carla else 0,
                    group_info=ctx.group_info,
                ),
                caller,
                frozenset({allowed}),
            )
        if kind == 21:
            rpc, request, allowed = rng.choice(
                [
                    ("Join", pb.JoinRequest(key_package=self.noise()), INVALID),
                    (
                        "SubmitCommit",
                        pb.SubmitCommitRequest(epoch=0, commit=p.commit),
                        PRECONDITION,
                    ),
                    ("CreateGroup", pb.CreateGroupRequest(group_info=ctx.group_info), PRECONDITION),
                    ("Ready", pb.ReadyRequest(epoch=self.epoch()), NOT_FOUND),
                    ("Leave", pb.LeaveRequest(), OK),
                    ("ReportFailure", pb.ReportFailureRequest(reason="gone"), NOT_FOUND),
                    ("ReportDisconnect", pb.ReportDisconnectRequest(identity="alice"), DENIED),
                    ("Subscribe", pb.SubscribeRequest(after=self.epoch()), NOT_FOUND),
                ]
            )
            return Probe("unknown room", rpc, request, self.ghost(), frozenset({allowed}))
        if kind == 22:
            token = rng.choice(
                [
                    self.noise(1, 80).hex(),
                    mint_token("alice", ROOM, api_secret=OTHER_SECRET),
                    mint_token("alice", ROOM)[:-3] + "AAA",
                ]
            )
            rpc = rng.choice(["Join", "Leave", "ReportFailure", "Subscribe"])
            message: Message = {
                "Join": pb.JoinRequest(key_package=ctx.key_package),
                "Leave": pb.LeaveRequest(),
                "ReportFailure": pb.ReportFailureRequest(),
                "Subscribe": pb.SubscribeRequest(),
            }[rpc]
            return Probe("bad token", rpc, message, bearer(token), frozenset({UNAUTH}))
        return Probe(
            "subscribe: non-member",
            "Subscribe",
            pb.SubscribeRequest(after=self.epoch()),
            ctx.eve,
            frozenset({NOT_FOUND}),
        )


def _accepted(validate: Callable[[], object]) -> bool:
    try:
        validate()
    except mls.MlsError:
        return False
    return True


async def send(
    stub: pb_grpc.DeliveryServiceStub, probe: Probe
) -> tuple[Any, grpc.aio.AioRpcError | None]:
    try:
        if probe.rpc == "Subscribe":
            call = stub.Subscribe(probe.request, metadata=probe.metadata, timeout=WAIT)
            async for _ in call:
                raise AssertionError(f"{probe.category}: a refused subscriber got an event")
            return None, None
        method = getattr(stub, probe.rpc)
        return await method(probe.request, metadata=probe.metadata, timeout=WAIT), None
    except grpc.aio.AioRpcError as e:
        return None, e


async def setup_room(
    ds: DeliveryServer, make_member: MakeMember
) -> tuple[
    list[GrpcMember], GrpcMember, list[tuple[int, bytes, pb.SubmitCommitResponse]], mls.CommitOutput
]:
    """alice + bob with ACCEPTED_COMMITS accepted commits, then zed's pending Add."""
    members = await joined_room(ds, make_member, ROOM, "alice", "bob")
    alice, bob = members
    history: list[tuple[int, bytes, pb.SubmitCommitResponse]] = []
    stale: mls.CommitOutput | None = None
    for _ in range(ACCEPTED_COMMITS):
        epoch = alice.require_group().epoch
        if len(history) == ACCEPTED_COMMITS - 1:
            stale = bob.require_group().commit()  # made now, stale after alice's commit
            bob.require_group().discard_pending_commit()
        out = alice.make_commit()
        response = await alice.submit(out)
        history.append((epoch, out.commit, response))
        await wait_until(
            functools.partial(converged, members, epoch=epoch + 1),
            what="commit applied",
            check=check_all(members),
        )
    for member in members:
        await member.stop()
        member.auto_commit = False  # from now on the test decides who commits
    assert stale is not None
    return members, make_member(ds, "zed", ROOM), history, stale


async def test_random_bad_input_is_refused_and_changes_nothing(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """>= 5,000 random/mutated/oversized/misaddressed requests over all RPCs: documented
    statuses only (per kind of input), no state change, and a valid member is served
    afterwards."""
    started = time.monotonic()
    # presence off: the creator of the second room joins over a raw channel and never
    # subscribes, and its room must stay as it is for the whole run (presence: test_presence)
    ds = await start_ds(limits=LIMITS, ordering=ORDERING, presence_timeout=0)
    (alice, bob), zed, history, stale = await setup_room(ds, make_member)
    await zed.join()  # the DS proposes zed's Add and asks alice to commit it
    await alice.until("commit_request")
    await bob.until("commit_request")
    pending = alice.make_commit()  # valid, adds zed; submitted only at the very end
    bobs = bob.make_commit()
    assert pending.welcome is not None

    # a room whose named creator (carla) never created its group
    carla_client = mls.MlsClient("carla", mls.SignatureKeyPair.generate())
    async with raw_channel(target(ds)) as stub:
        carla_meta = bearer(mint_token("carla", CREATING_ROOM))
        join = await stub.Join(
            pb.JoinRequest(key_package=carla_client.generate_key_package()), metadata=carla_meta
        )
        dan_meta = bearer(mint_token("dan", CREATING_ROOM))
        dan_client = mls.MlsClient("dan", mls.SignatureKeyPair.generate())
        await stub.Join(
            pb.JoinRequest(key_package=dan_client.generate_key_package()), metadata=dan_meta
        )
    creating = await manager_of(ds).room_state(CREATING_ROOM)
    assert (creating.phase, creating.creator) == (Phase.CREATING, "carla")
    carla_group = carla_client.create_group(creating.group_id, [join.config.ds_signing_identity])

    epoch = alice.require_group().epoch
    assert ds.observer is not None
    observer = ds.observer
    room_observer = observer.load((await manager_of(ds).room_state(ROOM)).observer_snapshot)

    def accepts_commit(data: bytes) -> bool:
        return _accepted(lambda: room_observer.copy().process_message(data))

    def accepts_key_package(data: bytes) -> bool:
        return _accepted(lambda: observer.validate_key_package(data))

    def accepts_group_info(data: bytes) -> bool:
        return _accepted(lambda: observer.observe(data))

    assert accepts_commit(pending.commit) and not accepts_commit(pending.commit + b"\x00")
    ctx = Context(
        epoch=epoch,
        alice=bearer(mint_token("alice", ROOM)),
        bob=bearer(mint_token("bob", ROOM)),
        eve=bearer(mint_token("eve", ROOM)),
        carla=carla_meta,
        dan=dan_meta,
        ghosts=[bearer(mint_token(f"user{i}", f"ghost-{i}")) for i in range(16)],
        pending=pending,
        bobs=bobs,
        stale=stale,
        history=history,
        key_package=alice.client.generate_key_package(),
        group_info=carla_group.group_info(),
        accepts_commit=accepts_commit,
        accepts_key_package=accepts_key_package,
        accepts_group_info=accepts_group_info,
    )
    rooms = (ROOM, CREATING_ROOM)
    before = {room: await room_snapshot(ds.store, room) for room in rooms}
    fuzzer = Fuzzer(random.Random(SEED), ctx)
    failures: list[str] = []

    async def run(stub: pb_grpc.DeliveryServiceStub, probe: Probe) -> None:
        response, error = await send(stub, probe)
        code = OK if error is None else error.code()
        ctx.outcomes[(probe.category, code.name)] += 1
        if code in (Code.INTERNAL, Code.UNKNOWN) or code not in probe.allowed:
            details = "" if error is None else error.details()
            failures.append(f"{probe.category}/{probe.rpc}: {code.name} {details}")
            return
        if error is not None and not error.details():
            failures.append(f"{probe.category}/{probe.rpc}: {code.name} without a message")
        if probe.check is not None:
            try:
                probe.check(response, error)
            except AssertionError as e:
                failures.append(f"{probe.category}/{probe.rpc}: {e}")

    quiet = [alice, bob, zed]
    queued = [m.events.qsize() for m in quiet]
    sent = 0
    async with raw_channel(target(ds)) as stub:
        # oversized whole messages: refused by gRPC itself (above grpc_message)
        for rpc, request in (
            ("Join", pb.JoinRequest(key_package=bytes(LIMITS.grpc_message + 1))),
            ("SubmitCommit", pb.SubmitCommitRequest(commit=bytes(LIMITS.grpc_message + 1))),
            ("CreateGroup", pb.CreateGroupRequest(group_info=bytes(LIMITS.grpc_message + 1))),
        ):
            await run(
                stub, Probe("oversized message", rpc, request, ctx.alice, frozenset({EXHAUSTED}))
            )
            sent += 1
        while sent < REQUESTS:
            batch = [fuzzer.probe() for _ in range(min(CONCURRENCY, REQUESTS - sent))]
            await asyncio.wait_for(asyncio.gather(*(run(stub, p) for p in batch)), WAIT * 2)
            sent += len(batch)
            if sent % 1000 < CONCURRENCY:  # localize a state change to ~1000 requests
                for room in rooms:
                    assert await room_snapshot(ds.store, room) == before[room], f"after {sent}"
            assert not failures, "\n".join(failures[:20])

    summary = "\n".join(f"  {n:5d}  {c:20s} {k}" for (k, c), n in sorted(ctx.outcomes.items()))
    print(f"\nseed {SEED}: {sent} requests in {time.monotonic() - started:.1f}s\n{summary}")
    print(f"  ({ctx.undetectable} mutations undetectable by an external observer skipped)")
    assert sent >= 5000 or REQUESTS < 5000
    assert len({k for k, _ in ctx.outcomes}) >= 20, "the fuzzer did not reach every kind"
    for room in rooms:
        assert await room_snapshot(ds.store, room) == before[room]
        assert await manager_of(ds).room_state(room) == before[room][0]
    for ghost in range(16):
        assert await ds.store.load(f"ghost-{ghost}") is None
    await asyncio.sleep(0.1)
    assert [m.events.qsize() for m in quiet] == queued, "rejected requests produced events"

    # the room still works: alice's commit adding zed is accepted and everyone converges
    response = await alice.submit(pending)
    assert response.epoch == epoch + 1
    everyone = [alice, bob, zed]
    for member in everyone:
        member.start()
    await wait_until(
        lambda: converged(everyone, epoch=epoch + 1),
        what="zed welcomed after the fuzzing",
        check=check_all(everyone),
    )
