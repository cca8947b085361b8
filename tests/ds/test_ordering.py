"""The ordering rules (CommitOrdering run by RoomManager) on a MemoryStore with a fake clock.

Members are real MLS clients talking to the RoomManager in process (``ManagerTransport``);
the tests read the room log from the store and feed it to the members explicitly, and move
the fake clock to cross deadlines. Every rejected request is also checked to have stored
nothing (record and log identical) and to leave the manager's cached record equal to the
stored one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from delivery_service.errors import (
    DeliveryError,
    EpochConflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from delivery_service.fanout import Hub
from delivery_service.metrics import Metrics
from delivery_service.model import Phase, RoomState, group_id_for
from delivery_service.ordering import CommitOrdering, OrderingConfig
from delivery_service.rooms import RoomManager
from delivery_service.settings import DS_IDENTITY
from delivery_service.store import MemoryStore
from mls_provider import mls
from mls_provider.proto import delivery_pb2 as pb

from .conftest import room_snapshot, wait_until
from .members import ManagerTransport, Member

ROOM = "unit-room"
# Fake-clock deadlines; the real timers the manager arms for them fire long after a test.
CONFIG = OrderingConfig(
    commit_timeout=300.0,
    execute_timeout=300.0,
    create_timeout=300.0,
    batch_quiet=0.0,  # request a commit as soon as a proposal is issued
    batch_max_wait=0.0,
    update_interval=0.0,  # tests make epochs with update commits; the limit: test_hostile
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    store: MemoryStore
    manager: RoomManager
    clock: FakeClock
    observer: mls.ExternalObserver
    members: dict[str, Member] = field(default_factory=dict)
    cursors: dict[str, int] = field(default_factory=dict)

    def member(self, identity: str) -> Member:
        """A new member object (a new MLS client) for ``identity``; replaces an older one."""
        transport = ManagerTransport(self.manager, ROOM, identity)
        member = Member(identity, transport, auto_commit=False, auto_rejoin=False)
        self.members[identity] = member
        return member

    async def join(self, identity: str, *, new_client: bool = True) -> Member:
        member = self.member(identity) if new_client else self.members[identity]
        response = await member.join()
        if new_client:
            self.cursors[identity] = response.cursor
        return member

    async def events(self, after: int = 0) -> list[pb.RoomEvent]:
        return [e.decode() for e in await self.store.read_log(ROOM, after, 10_000)]

    async def kinds(self, after: int = 0) -> list[str]:
        return [str(e.WhichOneof("event")) for e in await self.events(after)]

    async def head(self) -> int:
        state = await self.store.load(ROOM)
        return 0 if state is None else state.head

    async def state(self) -> RoomState:
        state = await self.store.load(ROOM)
        assert state is not None
        return state

    async def deliver(self, names: Iterable[str] | None = None) -> None:
        """Feeds every member the log entries it may see, in order, until nothing new comes
        (handling an event may write more: group creation, ready acks, executes)."""
        chosen = list(self.members) if names is None else list(names)
        while True:
            progressed = False
            for name in chosen:
                for entry in await self.store.read_log(ROOM, self.cursors[name], 10_000):
                    self.cursors[name] = entry.seq
                    progressed = True
                    if entry.visible_to(name):
                        await self.members[name].handle(entry.decode())
            if not progressed:
                return

    async def settle(self) -> None:
        """Delivers events and lets the requested committer commit until the room is quiet
        (no pending proposal, no open transition)."""
        for _ in range(20):
            await self.deliver()
            state = await self.state()
            if state.phase is Phase.ACTIVE and not state.pending and not state.transition_open:
                return
            request = state.commit_request
            if request is not None and not state.transition_open and state.pending:
                committer = self.members[request.committer or sorted(state.members)[0]]
                await committer.commit()
        raise AssertionError(f"room did not settle: {await self.state()}")

    async def grow(self, *names: str) -> list[Member]:
        """A settled group of ``names`` (the first creates it)."""
        for name in names:
            await self.join(name)
            await self.settle()
        return [self.members[n] for n in names]

    async def tick(self, seconds: float) -> None:
        """Moves the fake clock and acts on every deadline that passed."""
        self.clock.now += seconds
        await self.manager.transact(ROOM, self.manager.ordering.tick)

    async def assert_rejected(
        self, error: type[DeliveryError], call: Awaitable[object]
    ) -> DeliveryError:
        """Awaits ``call``, expects ``error``, and proves nothing was stored or cached."""
        before = await room_snapshot(self.store, ROOM)
        with pytest.raises(error) as info:
            await call
        assert await room_snapshot(self.store, ROOM) == before, "a rejected request stored"
        cached = await self.manager.room_state(ROOM)
        assert cached == before[0] or (before[0] is None and cached.version == 0)
        assert info.value.message
        return info.value


@contextlib.asynccontextmanager
async def make_env(config: OrderingConfig) -> AsyncIterator[Env]:
    store = MemoryStore()
    await store.open()
    observer = mls.ExternalObserver(DS_IDENTITY, mls.SignatureKeyPair.generate())
    clock = FakeClock()
    manager = RoomManager(store, CommitOrdering(observer, config), Hub(), Metrics(), clock=clock)
    await manager.start()
    try:
        yield Env(store, manager, clock, observer)
    finally:
        await manager.stop()
        await store.close()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with make_env(CONFIG) as env:
        yield env


async def executes(env: Env) -> list[tuple[str, int]]:
    return [("execute", e.execute.epoch) for e in await env.events() if e.HasField("execute")]


def leaf_of(member: Member) -> int:
    return member.require_group().own_leaf_index


# ---- creation ------------------------------------------------------------------------


async def test_simultaneous_joins_into_empty_room_name_exactly_one_creator(env: Env) -> None:
    """Six concurrent joins into an empty room: one CreateGroup naming one of them; after
    it creates the group, the other five are added by DS proposals in a single commit."""
    names = [f"p{i}" for i in range(6)]
    for name in names:
        env.member(name)
    responses = await asyncio.gather(*(env.members[n].join() for n in names))
    for name, response in zip(names, responses, strict=True):
        env.cursors[name] = response.cursor
    events = await env.events()
    creates = [e for e in events if e.WhichOneof("event") == "create_group"]
    assert len(creates) == 1
    creator = creates[0].create_group.creator
    assert creator in names
    state = await env.state()
    assert (state.phase, state.creator, state.generation) == (Phase.CREATING, creator, 0)
    assert creates[0].create_group.group_id == group_id_for(ROOM, 0) == state.group_id
    assert creates[0].create_group.config.ds_public_key == env.observer.public_key

    await env.deliver()  # the creator creates
    events = await env.events()
    adds = [e.proposal for e in events if e.WhichOneof("event") == "proposal"]
    assert sorted(p.target_identity for p in adds) == sorted(n for n in names if n != creator)
    assert {p.kind for p in adds} == {"add"}
    assert {p.epoch for p in adds} == {0}
    await env.settle()
    commits = [e.commit for e in await env.events() if e.WhichOneof("event") == "commit"]
    assert len(commits) == 1
    assert commits[0].committer == creator
    assert sorted(commits[0].added) == sorted(n for n in names if n != creator)
    rosters = {tuple(m.roster()) for m in env.members.values()}
    assert rosters == {tuple(sorted(names))}


async def test_silent_creator_is_replaced_after_create_timeout(env: Env) -> None:
    """A named creator that does not create within create_timeout is dropped, and the
    next waiting joiner is asked to create a new generation."""
    await env.join("alice")
    await env.join("bob")
    state = await env.state()
    assert state.creator == "alice"
    await env.tick(CONFIG.create_timeout - 1)
    assert (await env.state()).creator == "alice"
    await env.tick(2)
    state = await env.state()
    assert (state.phase, state.creator, state.generation) == (Phase.CREATING, "bob", 1)
    assert "alice" not in state.participants
    tail = (await env.events())[-2:]
    assert tail[0].WhichOneof("event") == "reset" and tail[0].reset.generation == 1
    assert tail[1].create_group.creator == "bob"
    assert tail[1].create_group.group_id == group_id_for(ROOM, 1)


def _bad_group_infos(env: Env) -> dict[str, tuple[str, int, bytes, type[DeliveryError]]]:
    """(caller, generation, group_info, expected error) for every invalid creation."""
    alice = env.members["alice"].client
    gid = group_id_for(ROOM, 0)
    ds_sender = env.observer.signing_identity()
    good = alice.create_group(gid, [ds_sender]).group_info()
    other_observer = mls.ExternalObserver(DS_IDENTITY, mls.SignatureKeyPair.generate())
    two = alice.create_group(gid, [ds_sender])
    two.commit(add=[mls.MlsClient("x", mls.SignatureKeyPair.generate()).generate_key_package()])
    two.apply_pending_commit()
    later = alice.create_group(gid, [ds_sender])
    later.commit()
    later.apply_pending_commit()
    return {
        "wrong creator": ("bob", 0, good, PermissionDenied),
        "wrong generation": ("alice", 1, good, EpochConflict),
        "wrong group id": (
            "alice",
            0,
            alice.create_group(b"x" * 32, [ds_sender]).group_info(),
            InvalidRequest,
        ),
        "no external sender": ("alice", 0, alice.create_group(gid).group_info(), InvalidRequest),
        "another external sender": (
            "alice",
            0,
            alice.create_group(gid, [other_observer.signing_identity()]).group_info(),
            InvalidRequest,
        ),
        "two members": ("alice", 0, two.group_info(), InvalidRequest),
        "not epoch 0": ("alice", 0, later.group_info(), InvalidRequest),
        "garbage": ("alice", 0, b"\x00\x01\x00\x04garbage", InvalidRequest),
        "empty": ("alice", 0, b"", InvalidRequest),
        "key package": ("alice", 0, alice.generate_key_package(), InvalidRequest),
    }


async def test_create_group_validation_rejects_and_stores_nothing(env: Env) -> None:
    """CreateGroup from another identity, for another generation or group id, without the
    DS as (only) external sender, with other members or not at epoch 0 is rejected with
    the right error, stores nothing, and the real creator can still create afterwards."""
    await env.join("alice")
    await env.join("bob")
    cases = _bad_group_infos(env)
    for name, (caller, generation, group_info, error) in cases.items():
        call = env.manager.create_group(ROOM, caller, generation, group_info)
        try:
            await env.assert_rejected(error, call)
        except BaseException as e:
            raise AssertionError(f"case {name!r}") from e
        state = await env.state()
        assert (state.phase, state.creator) == (Phase.CREATING, "alice"), name
    await env.settle()  # alice creates for real; bob is added
    assert env.members["alice"].roster() == ["alice", "bob"]
    assert (await env.state()).phase is Phase.ACTIVE


# ---- committing ----------------------------------------------------------------------


async def test_designated_committer_is_lowest_leaf_that_stays(env: Env) -> None:
    """The CommitRequest names the lowest leaf among members that stay: not one with a
    pending Remove, not one whose leaf is stale (it re-joined with a new key package)."""
    alice, bob, carol, dave = await env.grow("alice", "bob", "carol", "dave")
    assert [leaf_of(m) for m in (alice, bob, carol, dave)] == [0, 1, 2, 3]

    await env.join("eve")
    assert (await env.state()).commit_request.committer == "alice"  # type: ignore[union-attr]
    await env.settle()

    await alice.leave()  # alice's leaf 0 gets a Remove: bob (leaf 1) commits
    request = (await env.state()).commit_request
    assert request is not None and request.committer == "bob"
    await env.settle()
    assert bob.roster() == ["bob", "carol", "dave", "eve"]

    await env.join("bob", new_client=False)  # bob's leaf 1 is stale now: carol (leaf 2)
    state = await env.state()
    assert {(p.kind, p.identity) for p in state.pending} == {("remove", "bob"), ("add", "bob")}
    assert state.commit_request is not None and state.commit_request.committer == "carol"
    leaves = {m.identity: m.leaf_index for m in carol.require_group().members()}
    staying = {n: i for n, i in leaves.items() if n != "bob"}
    assert min(staying, key=staying.__getitem__) == "carol"


async def test_commit_missing_a_pending_proposal_is_epoch_conflict(env: Env) -> None:
    """A commit that leaves out a pending DS proposal (here a Remove issued after the commit
    request) is rejected with EpochConflict at the current epoch and stores nothing; once it
    covers every proposal it is accepted."""
    alice, _bob, _carol = await env.grow("alice", "bob", "carol")
    epoch = alice.require_group().epoch
    await env.join("dave")
    await env.manager.leave(ROOM, "carol")
    proposals = [e.proposal for e in await env.events() if e.WhichOneof("event") == "proposal"]
    dave_add, carol_remove = proposals[-2:]
    assert (dave_add.kind, carol_remove.kind) == ("add", "remove")

    alice.require_group().process_message(dave_add.message)  # only one of the two
    error = await env.assert_rejected(EpochConflict, alice.submit(alice.make_commit()))
    assert isinstance(error, EpochConflict) and error.epoch == epoch
    assert not alice.require_group().has_pending_commit

    alice.require_group().process_message(carol_remove.message)
    response = await alice.commit()
    assert response.epoch == epoch + 1
    commit = [e.commit for e in await env.events() if e.WhichOneof("event") == "commit"][-1]
    assert (commit.epoch, commit.added, commit.removed) == (epoch, ["dave"], ["carol"])


async def test_adds_wait_while_a_commit_is_requested(env: Env) -> None:
    """While a commit is requested, a new join's Add is held back (so the requested commit
    cannot be outrun by a stream of joins) and proposed for the next epoch."""
    alice, _bob = await env.grow("alice", "bob")
    head = await env.head()
    await env.join("dave")
    requests = [e.commit_request for e in await env.events(head) if e.HasField("commit_request")]
    assert [r.committer for r in requests] == ["alice"], "dave's Add must lead to one request"
    await env.join("erin")  # arrives while the request is outstanding
    adds = [e.proposal.target_identity for e in await env.events() if e.HasField("proposal")]
    assert "erin" not in adds, "erin's Add must wait for the next epoch"
    await env.settle()
    commits = [e.commit for e in await env.events() if e.HasField("commit")]
    assert [c.added for c in commits[-2:]] == [["dave"], ["erin"]]
    assert sorted(alice.roster()) == ["alice", "bob", "dave", "erin"]


async def test_a_burst_of_joins_is_batched_with_the_longer_quiet_window() -> None:
    """A lone join's Add is committed after ``batch_quiet``; Adds that were held back while
    a commit ran (a burst under way) wait ``burst_quiet`` after the latest of them, so a
    short gap in a burst of joins does not cost an epoch."""
    config = replace(CONFIG, batch_quiet=0.035, burst_quiet=0.15, batch_max_wait=0.5)
    async with make_env(config) as env:
        await env.grow("alice")
        await env.join("bob")
        await env.tick(0.05)
        await env.settle()

        def requested(events: list[pb.RoomEvent]) -> bool:
            return any(e.HasField("commit_request") for e in events)

        head = await env.head()
        await env.join("dave")  # a lone join
        await env.tick(0.03)
        assert not requested(await env.events(head))
        await env.tick(0.01)
        assert requested(await env.events(head))

        await env.join("erin")  # held: alice's commit for dave is requested
        await env.tick(0.01)
        await env.deliver()
        await env.members["alice"].commit()
        await env.deliver()  # dave's epoch executes; erin's held Add is proposed now
        head = await env.head()
        await env.tick(0.1)
        assert not requested(await env.events(head)), "batch_quiet must not apply in a burst"
        await env.tick(0.06)
        assert requested(await env.events(head))
        await env.settle()
        assert sorted(env.members["alice"].roster()) == ["alice", "bob", "dave", "erin"]


async def test_stale_commit_is_epoch_conflict_with_current_epoch(env: Env) -> None:
    """Two commits for the same epoch: the first wins; the second gets EpochConflict whose
    epoch is the new one — during the transition and after it executed — and a commit
    claiming the new epoch in its request is rejected too."""
    alice, bob = await env.grow("alice", "bob")
    epoch = alice.require_group().epoch
    alice_out, bob_out = alice.make_commit(), bob.make_commit()
    response = await alice.submit(alice_out)
    assert (response.epoch, (await env.state()).epoch) == (epoch + 1, epoch + 1)

    for claimed in (epoch, epoch + 1):  # during the transition
        error = await env.assert_rejected(EpochConflict, bob.submit(bob_out, epoch=claimed))
        assert isinstance(error, EpochConflict) and error.epoch == epoch + 1
    await env.deliver()  # both apply alice's commit and ack: the transition executes
    assert (await env.state()).executed_epoch == epoch + 1
    error = await env.assert_rejected(
        EpochConflict, env.manager.submit_commit(ROOM, "bob", _request(epoch, bob_out))
    )
    assert isinstance(error, EpochConflict) and error.epoch == epoch + 1


async def test_no_commit_for_the_next_epoch_before_the_transition_executes(env: Env) -> None:
    """A valid commit made at the new epoch (by the member that already applied the last
    commit) is refused while the transition to that epoch is open, and accepted once it
    executed."""
    alice, _ = await env.grow("alice", "bob")
    epoch = (await alice.commit()).epoch
    await env.deliver(["alice"])  # alice is at the new epoch; bob has not acked yet
    assert alice.require_group().epoch == epoch and (await env.state()).transition_open
    early = alice.make_commit()
    error = await env.assert_rejected(EpochConflict, alice.submit(early))
    assert isinstance(error, EpochConflict) and error.epoch == epoch
    assert "still running" in error.message
    await env.deliver(["bob"])
    assert not (await env.state()).transition_open
    assert (await alice.submit(alice.make_commit())).epoch == epoch + 1


def _request(epoch: int, out: mls.CommitOutput) -> pb.SubmitCommitRequest:
    return pb.SubmitCommitRequest(
        epoch=epoch, commit=out.commit, welcome=out.welcome or b"", group_info=out.group_info or b""
    )


async def test_by_value_membership_changes_are_rejected(env: Env) -> None:
    """Members may not add or remove by value (only the DS's proposals change membership):
    PermissionDenied, nothing stored."""
    alice, bob = await env.grow("alice", "bob")
    outsider = mls.MlsClient("mallory", mls.SignatureKeyPair.generate())
    for changes in (
        {"add": [outsider.generate_key_package()]},
        {"remove": [leaf_of(bob)]},
        {"remove_identities": ["bob"]},
    ):
        out = alice.make_commit(**changes)
        error = await env.assert_rejected(PermissionDenied, alice.submit(out))
        assert "by value" in error.message
    assert (await alice.commit()).epoch == alice.require_group().epoch + 1


async def test_commit_from_another_identitys_leaf_is_permission_denied(env: Env) -> None:
    """A valid commit sent by bob's leaf but submitted with alice's identity is rejected
    (PermissionDenied, nothing stored); bob himself may submit it."""
    alice, bob = await env.grow("alice", "bob")
    out = bob.make_commit()
    epoch = bob.require_group().epoch
    await env.assert_rejected(
        PermissionDenied, env.manager.submit_commit(ROOM, "alice", _request(epoch, out))
    )
    await env.assert_rejected(
        PermissionDenied, env.manager.submit_commit(ROOM, "nobody", _request(epoch, out))
    )
    assert (await bob.submit(out)).epoch == epoch + 1
    assert alice.require_group().epoch == epoch


async def test_idempotent_retry_of_an_accepted_commit(env: Env) -> None:
    """Re-submitting the accepted commit answers the same seq and epoch and writes nothing."""
    alice, _ = await env.grow("alice", "bob")
    epoch = alice.require_group().epoch
    out = alice.make_commit()
    first = await alice.submit(out)
    before = await room_snapshot(env.store, ROOM)
    again = await env.manager.submit_commit(ROOM, "alice", _request(epoch, out))
    assert (again.seq, again.epoch) == (first.seq, first.epoch)
    assert await room_snapshot(env.store, ROOM) == before


# ---- transitions and deadlines ---------------------------------------------------------


async def test_transition_executes_when_every_member_is_ready(env: Env) -> None:
    """After a commit the transition stays open until the last member acks Ready; then one
    TransitionExecute for the new epoch is logged."""
    alice, bob, carol = await env.grow("alice", "bob", "carol")
    epoch = (await alice.commit()).epoch
    await env.deliver(["alice", "bob"])
    state = await env.state()
    assert state.transition_open and state.executed_epoch == epoch - 1
    assert ("execute", epoch) not in await executes(env)

    with pytest.raises(EpochConflict):  # a ready ack from the future
        await env.manager.ready(ROOM, "carol", epoch + 1)
    with pytest.raises(NotFound):  # an ack from an identity that is not a member
        await env.manager.ready(ROOM, "zed", epoch)

    await env.deliver(["carol"])
    state = await env.state()
    assert not state.transition_open and state.executed_epoch == epoch
    assert [e for e in await executes(env) if e == ("execute", epoch)] == [("execute", epoch)]
    assert {m.require_group().epoch for m in (alice, bob, carol)} == {epoch}


async def test_transition_executes_at_the_execute_deadline(env: Env) -> None:
    """With a member that never acks, the transition executes at execute_timeout — not
    before."""
    alice, _, _ = await env.grow("alice", "bob", "carol")
    epoch = (await alice.commit()).epoch
    await env.deliver(["alice", "bob"])  # carol stays silent
    await env.tick(CONFIG.execute_timeout - 1)
    assert (await env.state()).transition_open
    await env.tick(2)
    state = await env.state()
    assert not state.transition_open and state.executed_epoch == epoch
    assert (await env.events())[-1].execute.epoch == epoch


async def test_silent_designees_are_passed_over_then_anyone_may_commit(env: Env) -> None:
    """A designated committer silent for commit_timeout is passed over: the next member is
    designated (so a big room does not commit all at once); once every member was passed
    over, a CommitRequest with an empty committer lets anyone commit, and nothing follows.
    Any member's commit is accepted throughout."""
    _, bob = await env.grow("alice", "bob")
    await env.join("carol")
    state = await env.state()
    assert state.commit_request is not None and state.commit_request.committer == "alice"
    await env.tick(CONFIG.commit_timeout - 1)
    assert (await env.state()).commit_request.committer == "alice"  # type: ignore[union-attr]
    await env.tick(2)
    await env.tick(CONFIG.commit_timeout + 1)
    await env.tick(CONFIG.commit_timeout + 1)  # no escalation after "anyone"
    requests = [
        e.commit_request for e in await env.events() if e.WhichOneof("event") == "commit_request"
    ]
    assert [(r.epoch, r.committer) for r in requests[-3:]] == [(1, "alice"), (1, "bob"), (1, "")]
    await env.deliver(["bob"])
    response = await bob.commit()
    assert response.epoch == 2
    await env.settle()
    assert bob.roster() == ["alice", "bob", "carol"]


async def test_new_proposals_keep_passed_designees_passed(env: Env) -> None:
    """A designee that let its deadline pass stays passed over for the epoch: when a new
    proposal renews the commit request, the request names the next member again, not the
    lowest leaf (each silent designee would cost another commit timeout)."""
    await env.grow("alice", "bob", "carol", "dave")
    await env.join("erin")
    assert (await env.state()).commit_request.committer == "alice"  # type: ignore[union-attr]
    await env.tick(CONFIG.commit_timeout + 1)
    assert (await env.state()).commit_request.committer == "bob"  # type: ignore[union-attr]
    await env.manager.leave(ROOM, "dave")  # a Remove: the request is renewed
    request = (await env.state()).commit_request
    assert request is not None and request.committer == "bob" and request.passed == ["alice"]
    await env.settle()
    assert env.members["bob"].roster() == ["alice", "bob", "carol", "erin"]


async def test_a_commit_without_update_path_is_refused(env: Env) -> None:
    """An add-only commit without an UpdatePath (RFC 9420 allows it; livekit-mls requires a
    path on every commit) is INVALID_ARGUMENT with a message naming the rule, stores
    nothing; the same change committed with a path is accepted."""
    alice = env.member("alice")
    lax = mls.MlsClient("alice", mls.SignatureKeyPair.generate(), require_update_path=False)
    alice.client = lax
    await env.join("alice", new_client=False)
    env.cursors["alice"] = 0
    await env.settle()
    await env.join("bob")
    await env.deliver(["alice"])
    pathless = alice.make_commit()
    error = await env.assert_rejected(InvalidRequest, alice.submit(pathless))
    assert "UpdatePath" in error.message
    group = alice.require_group()
    strict = mls.MlsClient("alice", lax.key_pair).load_group(group.to_bytes())
    alice.group = strict
    response = await alice.commit()
    assert response.epoch == 1
    welcome = [e.welcome for e in await env.events() if e.HasField("welcome")][-1]
    assert list(welcome.key_package_refs) == [env.members["bob"].key_package_ref]


# ---- generations and re-joins ----------------------------------------------------------


async def test_last_member_leaving_retires_the_generation(env: Env) -> None:
    """When the last member that stays leaves, the DS logs GroupReset (generation + 1) and
    forgets the group; the next joiner is asked to create a new group with a new id, and
    a GroupInfo of the old group id is refused."""
    alice, bob = await env.grow("alice", "bob")
    old_id = alice.require_group().group_id
    await alice.leave()
    await bob.leave()
    state = await env.state()
    assert (state.phase, state.generation, state.group_id) == (Phase.EMPTY, 1, b"")
    assert state.members == {} and state.observer_snapshot == b"" and state.participants == {}
    last = (await env.events())[-1]
    assert last.WhichOneof("event") == "reset" and last.reset.generation == 1

    carol = await env.join("carol")
    create = (await env.events())[-1]
    assert create.create_group.creator == "carol" and create.generation == 1
    assert create.create_group.group_id == group_id_for(ROOM, 1) != old_id
    stale = carol.client.create_group(old_id, [env.observer.signing_identity()]).group_info()
    await env.assert_rejected(InvalidRequest, env.manager.create_group(ROOM, "carol", 1, stale))
    await env.deliver()
    assert carol.require_group().group_id == group_id_for(ROOM, 1)
    state = await env.state()
    assert (state.phase, state.epoch, state.executed_epoch) == (Phase.ACTIVE, 0, 0)


async def test_rejoin_with_new_key_package_replaces_the_stale_leaf(env: Env) -> None:
    """A member that joins again with a new key package (lost state) gets its old leaf
    removed and the new one added in one commit; the roster has it exactly once."""
    alice, old_bob = await env.grow("alice", "bob")
    epoch = alice.require_group().epoch
    old_cursor = env.cursors["bob"]
    new_bob = await env.join("bob")  # a new MLS client for the same identity
    env.cursors["bob"] = await env.head()
    state = await env.state()
    assert sorted((p.kind, p.identity) for p in state.pending) == [
        ("add", "bob"),
        ("remove", "bob"),
    ]
    await env.settle()
    commits = [e.commit for e in await env.events() if e.WhichOneof("event") == "commit"]
    last = commits[-1]
    assert (last.epoch, list(last.added), list(last.removed)) == (epoch, ["bob"], ["bob"])
    assert len([c for c in commits if c.epoch == epoch]) == 1
    assert new_bob.group is not None and new_bob.group is not old_bob.group
    assert alice.roster() == new_bob.roster() == ["alice", "bob"]
    assert alice.require_group().epoch_authenticator() == new_bob.group.epoch_authenticator()
    # the old client, processing the same proposals and commit, finds its leaf removed
    for event in await env.events(old_cursor):
        if event.HasField("proposal") or event.HasField("commit"):
            await old_bob.handle(event)
        if event.HasField("commit"):
            break
    assert old_bob.group is None and old_bob.applied[-1].self_removed


async def test_a_tick_with_nothing_due_changes_nothing(env: Env) -> None:
    """Deadline handling is idempotent: a tick before any deadline writes nothing."""
    await env.grow("alice", "bob")
    before = await room_snapshot(env.store, ROOM)
    await env.tick(1.0)
    assert await room_snapshot(env.store, ROOM) == before


async def test_a_welcome_not_addressed_to_the_added_key_packages_is_rejected(env: Env) -> None:
    """The Welcome must name exactly the key packages the commit adds: a Welcome from
    another commit (here: one adding a stranger), or the genuine one with bytes appended,
    is INVALID_ARGUMENT, nothing stored; the genuine one is accepted."""
    alice, _bob = await env.grow("alice", "bob")
    epoch = alice.require_group().epoch
    await env.join("carol")
    proposal = [e.proposal for e in await env.events() if e.HasField("proposal")][-1]
    group = alice.require_group()
    group.process_message(proposal.message)
    genuine = group.commit()
    group.discard_pending_commit()
    stranger = mls.MlsClient("stranger", mls.SignatureKeyPair.generate())
    foreign = group.commit(add=[stranger.generate_key_package()])
    group.discard_pending_commit()
    assert foreign.welcome is not None and genuine.welcome is not None
    for welcome in (foreign.welcome, genuine.welcome + b"\x00"):  # trailing bytes: unusable
        forged = pb.SubmitCommitRequest(
            epoch=epoch, commit=genuine.commit, welcome=welcome,
            group_info=genuine.group_info or b"",
        )  # fmt: skip
        await env.assert_rejected(InvalidRequest, env.manager.submit_commit(ROOM, "alice", forged))
    response = await env.manager.submit_commit(ROOM, "alice", _request(epoch, genuine))
    assert response.epoch == epoch + 1


async def test_a_group_info_of_another_epoch_or_commit_is_rejected(env: Env) -> None:
    """The GroupInfo stored next to a commit must describe the epoch that commit creates:
    one of the previous epoch, or of a rival commit for the same epoch (same epoch number,
    different tree and transcript), trailing bytes, or not a GroupInfo at all is
    INVALID_ARGUMENT and stores nothing."""
    alice, _bob = await env.grow("alice", "bob")
    epoch = alice.require_group().epoch
    group = alice.require_group()
    previous = group.group_info()
    genuine = group.commit()
    group.discard_pending_commit()
    rival = group.commit()
    group.discard_pending_commit()
    assert genuine.group_info is not None and rival.group_info is not None
    for wrong in (previous, rival.group_info, genuine.group_info + b"\x00", genuine.commit):
        forged = pb.SubmitCommitRequest(epoch=epoch, commit=genuine.commit, group_info=wrong)
        await env.assert_rejected(InvalidRequest, env.manager.submit_commit(ROOM, "alice", forged))
    response = await env.manager.submit_commit(ROOM, "alice", _request(epoch, genuine))
    assert response.epoch == epoch + 1
    assert (await env.state()).group_info == genuine.group_info


async def test_a_deadline_tick_that_fails_is_tried_again() -> None:
    """A store failure during a deadline tick (here: requesting the batched commit for a
    join) does not leave the room waiting for the next client request: the tick is tried
    again and the commit is requested."""
    config = replace(CONFIG, batch_quiet=0.035, batch_max_wait=0.5)
    async with make_env(config) as env:
        await env.grow("alice")
        env.manager.tick_retry = 0.2
        failures = 1
        save = env.store.save

        async def failing_save(*args: Any, **kwargs: Any) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise OSError("disk unavailable")
            await save(*args, **kwargs)

        head = await env.head()
        await env.join("bob")  # the commit for bob's Add is due 35 ms from now
        env.store.save = failing_save  # type: ignore[method-assign]
        env.clock.now += 0.05  # the timer fires in real time; by then the batch is due
        await wait_until(lambda: failures == 0, timeout=5, what="the tick's save fails")
        assert not any(e.HasField("commit_request") for e in await env.events(head))
        await asyncio.sleep(0.5)
        requests = [
            e.commit_request for e in await env.events(head) if e.HasField("commit_request")
        ]
        assert [r.committer for r in requests] == ["alice"]


async def test_a_transaction_whose_caller_gave_up_reports_its_failure_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client gives up (its call is cancelled) while its transaction waits on a store that
    then fails: the failure is logged once with the room's name, not left as an
    unretrieved task exception (seen with Redis down for seconds)."""
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    async with make_env(CONFIG) as env:
        await env.grow("alice")
        release = asyncio.Event()
        save = env.store.save

        async def slow_failing_save(*args: Any, **kwargs: Any) -> None:
            await release.wait()
            raise ConnectionError("store unreachable")

        env.store.save = slow_failing_save  # type: ignore[method-assign]
        call = asyncio.ensure_future(env.manager.leave(ROOM, "alice"))
        await asyncio.sleep(0.05)
        call.cancel()  # the client's deadline
        with contextlib.suppress(asyncio.CancelledError):
            await call
        release.set()
        await wait_until(
            lambda: any("caller had gone" in r.getMessage() for r in caplog.records),
            timeout=5,
            what="the orphaned failure logged",
        )
        env.store.save = save  # type: ignore[method-assign]
    gc.collect()
    await asyncio.sleep(0)
    orphaned = [r.getMessage() for r in caplog.records if "caller had gone" in r.getMessage()]
    assert orphaned == [
        "room 'unit-room': a transaction failed after its caller had gone: "
        "ConnectionError: store unreachable"
    ]
    assert not [c for c in unhandled if "never retrieved" in str(c.get("message"))]
