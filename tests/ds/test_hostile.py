"""One hostile member must not take a room down.

Honest members are real ``MlsSession`` clients; the attacker is a scripted member with a
real MLS client that breaks the protocol on purpose (a commit with a flipped membership
tag or zeroed confirmation tag that the DS cannot tell from a good one, silence, garbage,
false failure reports, floods of update commits, a second device). After each attack the
honest members must converge on one epoch with identical keys, without the attacker when
it was blamed, and no honest member may be removed because of what the attacker said.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from delivery_service.server import DeliveryServer
from mls_provider import mls
from mls_provider.keys import EXPORTER_LABEL, key_index
from mls_provider.session import MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.transport import DeliveryClient, EpochConflict, ResourceExhausted

from .conftest import MakeMember, StartDs, mint_token, target, wait_until
from .members import GrpcMember

ROOM = "hostile-room"
SEED = int(os.environ.get("LIVEKIT_MLS_ATTACK_SEED", "20261204"))
RECOVERY = 20.0  # bound of every wait for the room to recover (the target is <= 5 s)

Mangle = Callable[[bytes], bytes]


def flip_membership_tag(commit: bytes) -> bytes:
    """The last byte of a member's PublicMessage belongs to its membership tag, which only
    members can check (the DS's observer has no membership key)."""
    return commit[:-1] + bytes([commit[-1] ^ 0x01])


def zero_confirmation_tag(commit: bytes) -> bytes:
    """A member's PublicMessage ends with confirmation_tag<V> then membership_tag<V>, 32
    bytes each for suite 1 (1-byte length prefixes): zero the confirmation tag."""
    assert commit[-33] == 32 and commit[-66] == 32, "unexpected framing"
    return commit[:-65] + bytes(32) + commit[-33:]


class Attacker(GrpcMember):
    """A member whose commits (and Welcomes) are mangled before it submits them; it
    follows the stream but may fail on what follows its attack (e.g. its own commit)."""

    def __init__(
        self,
        *args: object,
        mangle: Mangle | None = None,
        mangle_welcome: Mangle | None = None,
        **kw: object,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.mangle = mangle
        self.mangle_welcome = mangle_welcome
        self.attacked = asyncio.Event()

    def make_commit(self, **changes: object) -> mls.CommitOutput:
        output = super().make_commit(**changes)  # type: ignore[arg-type]
        if self.mangle is None and self.mangle_welcome is None:
            return output
        self.attacked.set()
        commit = self.mangle(output.commit) if self.mangle else output.commit
        welcome = output.welcome
        if welcome is not None and self.mangle_welcome is not None:
            welcome = self.mangle_welcome(welcome)
        return _Output(commit, welcome, output.group_info)  # type: ignore[return-value]


class _Output:
    """A CommitOutput with other commit bytes (CommitOutput itself is read-only)."""

    def __init__(self, commit: bytes, welcome: bytes | None, group_info: bytes | None) -> None:
        self.commit = commit
        self.welcome = welcome
        self.group_info = group_info


class Room:
    """Honest sessions of one room on an in-process DS."""

    def __init__(self, ds: DeliveryServer) -> None:
        self.ds = ds
        self.sessions: dict[str, MlsSession] = {}
        self.events: dict[str, list[tuple[str, object]]] = {}

    async def join(self, identity: str) -> MlsSession:
        assert self.ds.observer is not None
        session = MlsSession(
            DeliveryClient(target(self.ds), mint_token(identity, ROOM)),
            identity,
            HeadlessKeySink(),
            SessionConfig(ds_public_key=self.ds.observer.public_key, retry_max=0.5),
        )
        log = self.events[identity] = []
        for name in ("removed", "rejoining", "replaced", "error"):
            session.on(name, lambda value, name=name, log=log: log.append((name, value)))
        await session.start()
        self.sessions[identity] = session
        return session

    def converged(self, expected: set[str] | None = None) -> bool:
        """Every honest session on one executed epoch and authenticator, roster exactly
        ``expected`` (default: the honest sessions), every key equal to the exporter."""
        sessions = list(self.sessions.values())
        names = expected if expected is not None else set(self.sessions)
        states = {(s.generation, s.epoch, s.executed_epoch, s.verification_code) for s in sessions}
        if len(states) != 1:
            return False
        _, epoch, executed, _ = next(iter(states))
        if epoch is None or epoch != executed or any(set(s.members) != names for s in sessions):
            return False
        group = sessions[0].group
        assert group is not None
        index = key_index(epoch, sessions[0].config.ring_size)
        for name in names:
            material = group.export_secret(EXPORTER_LABEL, name.encode(), 32)
            sinks = [s.sink for s in sessions]
            if any(not isinstance(k, HeadlessKeySink) or k.key(name, index) != material
                   for k in sinks):  # fmt: skip
                return False
        return True

    def errors(self) -> list[object]:
        return [v for log in self.events.values() for n, v in log if n == "error"]

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.stop(leave=False)
            await session.ds.close()


@pytest.fixture
async def room(start_ds: StartDs) -> AsyncIterator[Room]:
    r = Room(await start_ds())
    yield r
    await r.close()


async def attacker_creates_room(
    room: Room, make_member: MakeMember, mangle: Mangle | None, honest: list[str]
) -> Attacker:
    """The attacker creates the group (so it is the lowest leaf: the designated committer);
    the honest members join after it; all converge."""
    attacker = Attacker("mallory", ROOM, target(room.ds), mint_token("mallory", ROOM), mangle=None)
    await attacker.join()
    attacker.start()
    await wait_until(lambda: attacker.group is not None, what="mallory created the group")
    for name in honest:
        await room.join(name)
        await wait_until(lambda: room.converged({"mallory", *room.sessions}), what=f"{name} joined")
    attacker.mangle = mangle
    return attacker


@pytest.mark.parametrize("mangle", [flip_membership_tag, zero_confirmation_tag])
async def test_a_commit_only_members_can_tell_is_bad_is_undone_without_its_committer(
    room: Room, make_member: MakeMember, mangle: Mangle
) -> None:
    """mallory, the designated committer, commits erin's Add with a broken tag the DS cannot
    check. bob, carol and dave cannot process it and report it; erin joins from the real
    Welcome (a forked state). Two independent reports blame mallory: the group starts
    again without her, everyone honest converges, and mallory may not join again for a
    while. No honest member is removed for having reported."""
    attacker = await attacker_creates_room(room, make_member, mangle, ["bob", "carol", "dave"])
    try:
        started = time.monotonic()
        await room.join("erin")
        await asyncio.wait_for(attacker.attacked.wait(), RECOVERY)
        await wait_until(lambda: room.converged(), timeout=RECOVERY, what="honest members recover")
        print(f"recovered {time.monotonic() - started:.2f} s after the join")
        assert room.errors() == []
        state = await room.ds.manager.room_state(ROOM)  # type: ignore[union-attr]
        assert "mallory" not in state.participants and "mallory" not in state.members
        assert state.cooldown.get("mallory", 0) > time.time()
        with pytest.raises(Exception, match="may join again"):
            await attacker.client_ds.join(attacker.client.generate_key_package())
        # the reporters were not removed on their word: they are all still here
        assert set(state.members) == {"bob", "carol", "dave", "erin"}
    finally:
        await attacker.close()


async def test_a_lone_false_report_removes_only_the_reporter(
    room: Room, make_member: MakeMember
) -> None:
    """mallory reports that she cannot process bob's honest commit: carol confirmed it, so
    only mallory's own leaf goes; bob (the committer) stays."""
    await room.join("bob")
    await room.join("carol")
    liar = make_member(room.ds, "mallory", ROOM, auto_rejoin=False)
    await liar.join()
    liar.start()
    await wait_until(lambda: room.converged({"bob", "carol", "mallory"}), what="room of three")
    await liar.stop()
    await room.join("dave")  # bob commits dave's Add
    while not (event := await liar.next_event()).HasField("commit"):
        pass  # read, not processed: mallory never acks the new epoch
    await liar.client_ds.report_failure(event.commit.epoch, "lying", event.seq)
    await wait_until(lambda: room.converged(), timeout=RECOVERY, what="bob, carol, dave")
    assert room.errors() == []
    assert [n for n, _ in room.events["bob"]] == []  # bob was never removed
    await liar.close()


async def test_a_silent_or_garbage_designee_is_passed_over(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """mallory (the designee) never commits, then sends only garbage: the DS designates the
    next member after the commit timeout and the room converges without waiting for her."""
    ds = await start_ds()
    room = Room(ds)
    attacker = await attacker_creates_room(
        room, make_member, lambda commit: secrets.token_bytes(len(commit)), ["bob"]
    )
    try:
        await room.join("carol")
        await wait_until(
            lambda: room.converged({"mallory", "bob", "carol"}),
            timeout=RECOVERY,
            what="carol added by the next designee",
        )
        assert attacker.rejected or attacker.attacked.is_set()
        assert room.errors() == []
    finally:
        await attacker.close()
        await room.close()


async def test_update_commits_are_rate_limited(start_ds: StartDs, make_member: MakeMember) -> None:
    """A member may commit without pending proposals (an update) once per update_interval:
    a flood of updates gets RESOURCE_EXHAUSTED with a message, and the room keeps going."""
    from .conftest import TEST_ORDERING

    ordering = type(TEST_ORDERING)(**{**TEST_ORDERING.__dict__, "update_interval": 10.0})
    ds = await start_ds(ordering=ordering)
    room = Room(ds)
    flooder = make_member(ds, "mallory", ROOM)
    await flooder.join()
    flooder.start()
    await room.join("bob")
    await wait_until(
        lambda: (
            room.converged({"mallory", "bob"}) and flooder.executed == flooder.require_group().epoch
        ),
        what="room of two",
    )
    await flooder.stop()
    accepted = 0
    refused: list[Exception] = []
    for _ in range(5):
        try:
            response = await flooder.commit()
        except (ResourceExhausted, EpochConflict) as e:
            refused.append(e)  # (the member discarded its pending commit)
            continue
        accepted += 1
        await flooder.until("execute", lambda e, epoch=response.epoch: e.execute.epoch == epoch)
    assert accepted == 1
    assert any(isinstance(e, ResourceExhausted) and "updates" in e.message for e in refused)
    flooder.start()
    await room.join("carol")
    await wait_until(
        lambda: room.converged({"mallory", "bob", "carol"}), timeout=RECOVERY, what="carol"
    )
    await room.close()


async def test_the_newest_device_of_an_identity_wins(room: Room) -> None:
    """bob joins from a second device: the first one is told it was replaced and stops (it
    does not join again: no ping-pong), the second is in the group."""
    await room.join("alice")
    first = await room.join("bob")
    await wait_until(lambda: room.converged(), what="alice and bob")
    second = MlsSession(
        DeliveryClient(target(room.ds), mint_token("bob", ROOM)),
        "bob",
        HeadlessKeySink(),
        SessionConfig(ds_public_key=first.config.ds_public_key, retry_max=0.5),
    )
    replaced: list[str] = []
    first.on("replaced", replaced.append)
    await second.start()
    room.sessions["bob"] = second
    await wait_until(lambda: room.converged(), timeout=RECOVERY, what="the second bob in")
    await wait_until(lambda: not first.running, what="the first bob stopped")
    assert replaced and "newer connection" in replaced[0]
    await asyncio.sleep(1.0)
    assert room.converged(), "the first device came back"
    await first.ds.close()


def flip_random_bit(rng: random.Random) -> Mangle:
    def mangle(data: bytes) -> bytes:
        i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]

    return mangle


def truncate(rng: random.Random) -> Mangle:
    return lambda data: data[: rng.randrange(1, len(data))]


ATTACKS = [
    "bit flip in the commit",
    "membership tag",
    "confirmation tag",
    "truncated commit",
    "commit without path",
    "corrupted Welcome",
    "update flood",
    "false report",
]
ATTACK_CASES = int(os.environ.get("LIVEKIT_MLS_ATTACK_CASES", "16"))
REPORT_DIR = os.environ.get("LIVEKIT_MLS_REPORT_DIR", "")


async def test_random_member_attacks_leave_the_honest_members_converged(
    start_ds: StartDs, make_member: MakeMember
) -> None:
    """Seeded random attacks by the designated committer of a room of three honest members
    (each attack in a fresh room, every kind at least once): whatever the DS concludes,
    the honest members end on one epoch with identical keys equal to the exporter, with
    no session error, and none of them lost its place for good."""
    rng = random.Random(SEED)
    kinds = ATTACKS + [rng.choice(ATTACKS) for _ in range(max(0, ATTACK_CASES - len(ATTACKS)))]
    from .conftest import TEST_ORDERING

    # the attacker may come back at once (each case is a fresh room anyway), and update
    # commits are limited to one per second
    ordering = type(TEST_ORDERING)(
        **{**TEST_ORDERING.__dict__, "blame_cooldown": 0.0, "update_interval": 1.0}
    )
    outcomes: dict[str, list[float]] = {}
    for case, kind in enumerate(kinds):
        ds = await start_ds(ordering=ordering)
        room = Room(ds)
        mangle: Mangle | None = None
        if kind == "bit flip in the commit":
            mangle = flip_random_bit(rng)
        elif kind == "membership tag":
            mangle = flip_membership_tag
        elif kind == "confirmation tag":
            mangle = zero_confirmation_tag
        elif kind == "truncated commit":
            mangle = truncate(rng)
        attacker = await attacker_creates_room(room, make_member, mangle, ["bob", "carol", "dave"])
        if kind == "corrupted Welcome":
            attacker.mangle_welcome = flip_random_bit(rng)
        elif kind == "commit without path":  # the same member, now with a lax MLS client
            lax = mls.MlsClient("mallory", attacker.client.key_pair, require_update_path=False)
            await attacker.stop()
            attacker.group = lax.load_group(attacker.require_group().to_bytes())
            attacker.client = lax
            attacker.start()
        try:
            started = time.monotonic()
            if kind == "update flood":
                await attacker.stop()
                for _ in range(20):  # as fast as it can, without processing the stream
                    group = attacker.require_group()
                    if group.has_pending_commit:
                        group.discard_pending_commit()
                    with contextlib.suppress(ResourceExhausted, EpochConflict):
                        await attacker.commit()
                attacker.start()
            elif kind == "false report":
                await attacker.stop()
                await room.join("erin")
                while not (event := await attacker.next_event()).HasField("commit"):
                    pass
                with contextlib.suppress(Exception):
                    await attacker.client_ds.report_failure(0, "lying", event.seq)
            if kind != "false report":
                await room.join("erin")
            honest = {"bob", "carol", "dave", "erin"}

            def recovered(room: Room = room, honest: set[str] = honest) -> bool:
                members = set(next(iter(room.sessions.values())).members)
                return room.converged(members) and honest <= members

            await wait_until(recovered, timeout=RECOVERY, what=f"case {case} ({kind}) recovers")
            outcomes.setdefault(kind, []).append(time.monotonic() - started)
            assert room.errors() == [], f"case {case} ({kind}): {room.errors()}"
        finally:
            await attacker.close()
            await room.close()
            await ds.stop()
    print({k: [round(t, 2) for t in v] for k, v in outcomes.items()})
    assert set(outcomes) == set(ATTACKS)
    if REPORT_DIR:  # benchmarks/run_all.py renders this into docs/benchmarks.md
        report = {
            "cases": len(kinds),
            "seed": SEED,
            "commit_timeout_s": ordering.commit_timeout,
            "execute_timeout_s": ordering.execute_timeout,
            "recovery_s": {k: sorted(v) for k, v in outcomes.items()},
            "machine": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        }
        path = Path(REPORT_DIR) / "hostile.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
