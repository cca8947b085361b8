"""Rooms of headless members driven directly (MLS engine + DeliveryClient, no session),
for the delivery service load benchmarks (bench_ds_load, bench_redis).

Every member follows its stream (resuming where it was cut off), applies proposals and
commits and acks Ready; the designated member commits. Once formed, ``run`` has the first
member commit in a loop and records the SubmitCommit -> delivered-to-every-other-member
latency of each commit.
"""

from __future__ import annotations

import asyncio
import random
import time

from mls_provider import mls
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.transport import (
    DeliveryClient,
    DeliveryServiceError,
    EpochConflict,
    ResourceExhausted,
    Unavailable,
)

DELIVERY_TIMEOUT = 60.0  # a commit not delivered to every member by then fails the run


class Member:
    def __init__(self, identity: str, target: str, token: str) -> None:
        self.identity = identity
        self.client = DeliveryClient(target, token, timeout=60.0)
        self.mls = mls.MlsClient(identity, mls.SignatureKeyPair.generate())
        self.group: mls.Group | None = None
        self.cursor = 0


class BenchRoom:
    """One room: members join and form the group, then the first member commits in a loop."""

    def __init__(self, name: str, members: list[Member]) -> None:
        self.name = name
        self.members = members
        self.latencies: list[float] = []
        self.accepted = 0
        self.errors: list[str] = []
        self._delivered: dict[int, list[float]] = {}

    async def _follow(self, member: Member) -> None:
        while True:
            try:
                async for event in member.client.subscribe(member.cursor):
                    await self._handle(member, event)
                    member.cursor = event.seq
            except (ResourceExhausted, Unavailable):  # cut off or moved: resume
                await asyncio.sleep(0.05)
            except DeliveryServiceError as e:  # unexpected: note it, resume
                self.errors.append(f"{member.identity}: {e}")
                await asyncio.sleep(0.05)

    async def _handle(self, member: Member, event: pb.RoomEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "create_group" and event.create_group.creator == member.identity:
            member.group = member.mls.create_group(
                event.create_group.group_id, [event.create_group.config.ds_signing_identity]
            )
            await member.client.create_group(event.generation, member.group.group_info())
        elif kind == "welcome" and member.group is None:
            if member.identity in event.welcome.recipients:
                member.group = member.mls.join_group(event.welcome.message)
                await member.client.ready(member.group.epoch)
        elif member.group is None:
            return
        elif kind == "proposal" and event.proposal.epoch == member.group.epoch:
            member.group.process_message(event.proposal.message)
        elif kind == "commit_request" and event.commit_request.committer in (member.identity, ""):
            # with a pending commit ours was accepted (a rejected one is discarded at once):
            # a later "anyone may commit" for the same epoch is for the others
            pending = member.group.has_pending_commit
            if event.commit_request.epoch == member.group.epoch and not pending:
                out = member.group.commit()
                try:
                    await member.client.submit_commit(
                        member.group.epoch, out.commit, out.welcome or b"", out.group_info or b""
                    )
                except EpochConflict:
                    member.group.discard_pending_commit()
        elif kind == "commit" and event.commit.epoch == member.group.epoch:
            member.group.process_message(event.commit.message)
            self._delivered.setdefault(member.group.epoch, []).append(time.monotonic())
            await member.client.ready(member.group.epoch)

    async def start(self) -> list[asyncio.Task[None]]:
        """Joins every member and starts following its stream; returns those tasks."""
        tasks = []
        for member in self.members:
            response = await member.client.join(member.mls.generate_key_package())
            member.cursor = response.cursor
            tasks.append(asyncio.create_task(self._follow(member)))
        return tasks

    async def formed(self, timeout: float = 180.0) -> None:
        """Waits until every member is in the group, all at one epoch."""
        deadline = time.monotonic() + timeout
        while True:
            groups = [m.group for m in self.members]
            formed = all(g is not None and g.member_count == len(self.members) for g in groups)
            if formed and len({g.epoch for g in groups if g is not None}) == 1:
                return
            if time.monotonic() > deadline:
                state = [(m.identity, m.group and m.group.epoch, m.cursor) for m in self.members]
                raise TimeoutError(f"room {self.name} did not form: {state} {self.errors}")
            await asyncio.sleep(0.05)

    async def run(
        self, stop: asyncio.Event, think: float = 0.0, rng: random.Random | None = None
    ) -> None:
        """The first member commits (an empty commit: a key update), waits until every
        member received it, pauses ``think`` (x 0.5..1.5) and repeats until ``stop``."""
        rng = rng or random.Random()
        committer = self.members[0]
        if think:  # spread the rooms' first commits over one think time
            await asyncio.sleep(rng.uniform(0, think))
        while not stop.is_set():
            group = committer.group
            assert group is not None
            epoch = group.epoch
            out = group.commit()
            sent = time.monotonic()
            try:
                await committer.client.submit_commit(epoch, out.commit, b"", out.group_info or b"")
            except EpochConflict:  # the previous transition is still executing
                group.discard_pending_commit()
                await asyncio.sleep(0.005)
                continue
            self.accepted += 1
            new_epoch = epoch + 1
            # polling: no extra task or event on the measured path
            while len(self._delivered.get(new_epoch, [])) < len(self.members):
                if time.monotonic() - sent > DELIVERY_TIMEOUT:
                    raise TimeoutError(f"room {self.name}: epoch {new_epoch} not delivered")
                await asyncio.sleep(0.001)
            others = self._delivered.pop(new_epoch)[1:] or [sent]
            self.latencies.append((max(others) - sent) * 1000)
            if think:
                await asyncio.sleep(rng.uniform(0.5, 1.5) * think)
