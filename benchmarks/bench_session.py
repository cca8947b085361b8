"""Join latency and removal exposure window: headless members on a real delivery service.

For each group size N, N headless sessions (``MlsSession`` + ``HeadlessKeySink``: the real
client session, keys recorded instead of installed in LiveKit) join one room on a real DS
process (SQLite store). Then, repeatedly, one more member joins and leaves again:

* **join latency**: the joiner's key package upload -> the joiner holds every member's key
  and every member (joiner included) sends with the new epoch;
* **removal exposure window**: the commit removing the leaver is accepted by the DS (the
  committer's SubmitCommit returns) -> every remaining member sends with the new epoch;
* **removal total**: the leaver's Leave call -> every remaining member sends with the new
  epoch (DS proposal, commit request and commit included).

All N members run in this one process and share its CPU with each other; on real devices
they process in parallel. So two figures are measured:

* **wall clock**: every member a real client session here, their processing serialized on
  this machine's CPU;
* **critical path** of one client: the committer and the guest are real client sessions;
  every other member is an :class:`Acker` — a real group member (in the tree, on the DS,
  with its own stream and ready acks) that does no MLS work. What is left is what one real
  client waits for: the DS's ordering and durable writes, its fan-out to every member and
  the acks of all of them, and a real member's processing at size N.

``bench_authority.py`` compares open and authority mode with the same rooms.

    .venv/bin/python benchmarks/bench_session.py [--sizes 2,10,50,200,1000]
                                                 [--critical-sizes 50,200,1000] [--samples 30]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from dataclasses import dataclass, field

from common import markdown_table, percentile, write_result

from mls_provider import mls
from mls_provider.authority import IdentityAuthority
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.session import MlsSession
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.transport import DeliveryClient

API_KEY = "bench-key"


PROCESSING_MS: dict[str, list[float]] = {"join": [], "leave": []}


def _instrument_processing() -> None:
    """Records how long each member spends applying a commit and installing its keys."""
    original = MlsSession._apply_commit

    def timed(self: MlsSession, group: mls.Group, commit: pb.Commit) -> mls.CommitApplied:
        start = time.perf_counter()
        applied = original(self, group, commit)
        kind = "join" if applied.added else "leave"
        PROCESSING_MS[kind].append((time.perf_counter() - start) * 1000)
        return applied

    MlsSession._apply_commit = timed  # type: ignore[method-assign]


class TimedDeliveryClient(DeliveryClient):
    """Records when each of this member's commits was accepted (monotonic time)."""

    accepted: dict[int, float]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.accepted = {}

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse:
        response = await super().submit_commit(epoch, commit, welcome, group_info)
        self.accepted[response.epoch] = time.monotonic()
        return response


@dataclass
class Member:
    session: MlsSession
    client: TimedDeliveryClient
    sink: HeadlessKeySink = field(repr=False)


class Room:
    def __init__(self, ds: DeliveryServiceProcess, secret: str, name: str) -> None:
        self.ds = ds
        self.secret = secret
        self.name = name
        self.members: dict[str, Member] = {}

    def token(self, identity: str) -> str:
        return self.ds.token(identity, self.name)

    async def add(self, identity: str) -> Member:
        client = TimedDeliveryClient(self.ds.target, self.token(identity))
        sink = HeadlessKeySink()
        config = self.ds.session_config(identity, self.name)
        session = MlsSession(client, identity, sink, config)
        member = Member(session, client, sink)
        self.members[identity] = member
        await session.start()
        return member

    async def converged(self, timeout: float = 60.0, also: frozenset[str] = frozenset()) -> int:
        """Waits until every member has executed the same epoch with the full roster (the
        sessions here plus ``also``: members that are not sessions)."""
        names = set(self.members) | also
        deadline = time.monotonic() + timeout
        while True:
            sessions = [m.session for m in self.members.values()]
            epochs = {s.epoch for s in sessions}
            if (
                len(epochs) == 1
                and None not in epochs
                and all(s.executed_epoch == s.epoch for s in sessions)
                and all(set(s.members) == names for s in sessions)
            ):
                epoch = epochs.pop()
                assert epoch is not None
                return epoch
            if time.monotonic() > deadline:
                raise TimeoutError(f"room did not converge: epochs={epochs}")
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        await asyncio.gather(*(m.session.stop(leave=False) for m in self.members.values()))
        await asyncio.gather(*(m.client.close() for m in self.members.values()))


class WallClockBench:
    """One room of real client sessions: built once, then sampled join/leave by join/leave."""

    def __init__(self, members: int, wave: int, workdir: str, authority: bool = False) -> None:
        self.members = members
        self.wave = wave
        secret = secrets.token_urlsafe(40)
        self.ds = DeliveryServiceProcess(
            API_KEY,
            secret,
            workdir=workdir,
            authority=IdentityAuthority.generate() if authority else None,
        )
        self.room = Room(self.ds, secret, f"bench-{members}")
        self.result: dict[str, list[float]] = {
            "join_ms": [],
            "exposure_ms": [],
            "exposure_first_ms": [],
            "removal_total_ms": [],
        }

    async def build(self) -> None:
        """Concurrent joins in waves (the DS batches them into few epochs)."""
        self.ds.start()
        for start in range(0, self.members, self.wave):
            end = min(start + self.wave, self.members)
            await asyncio.gather(*(self.room.add(f"m{i}") for i in range(start, end)))
            await self.room.converged()

    async def sample(self, i: int) -> None:
        """One guest joins, then leaves again."""
        room, result = self.room, self.result
        name = f"guest{i}"
        t0 = time.monotonic()
        joiner = await room.add(name)
        epoch = await room.converged()
        switched = [m.sink.sender_switched_at or 0.0 for m in room.members.values()]
        result["join_ms"].append((max(switched) - t0) * 1000)
        assert joiner.session.epoch == epoch

        t_leave = time.monotonic()
        await joiner.session.stop(leave=True)
        await joiner.client.close()
        del room.members[name]
        new_epoch = await room.converged()
        accepted = [
            m.client.accepted[new_epoch]
            for m in room.members.values()
            if new_epoch in m.client.accepted
        ]
        switched = [m.sink.sender_switched_at or 0.0 for m in room.members.values()]
        assert len(accepted) == 1, f"exactly one accepted commit per epoch: {accepted}"
        result["exposure_ms"].append((max(switched) - accepted[0]) * 1000)
        result["exposure_first_ms"].append((min(switched) - accepted[0]) * 1000)
        result["removal_total_ms"].append((max(switched) - t_leave) * 1000)

    async def stop(self) -> None:
        await self.room.stop()
        self.ds.stop()


async def measure(members: int, samples: int, wave: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        bench = WallClockBench(members, wave, tmp)
        try:
            await bench.build()
            for samples_of_kind in PROCESSING_MS.values():
                samples_of_kind.clear()  # this size's samples only, not the room's build-up
            for i in range(samples):
                await bench.sample(i)
            return {
                **bench.result,
                "processing_join_ms": list(PROCESSING_MS["join"]),
                "processing_leave_ms": list(PROCESSING_MS["leave"]),
            }
        finally:
            await bench.stop()


class Acker:
    """A real group member that acknowledges every epoch without any MLS work of its own.

    It stands for a member on its own device: with the rest of the room made of ackers,
    what one real client waits for is measured — the DS's ordering, its fan-out to every
    member's stream and the acks of all of them, plus the real clients' own processing —
    without N members' processing serialized on this machine's CPU.
    """

    def __init__(self, room: Room, identity: str) -> None:
        self.identity = identity
        self.client = DeliveryClient(room.ds.target, room.token(identity))
        self.epoch = -1
        self.executed_at: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        key_package = mls.MlsClient(
            self.identity, mls.SignatureKeyPair.generate()
        ).generate_key_package()
        response = await self.client.join(key_package)
        self._task = asyncio.create_task(self._follow(response.cursor))

    async def _follow(self, cursor: int) -> None:
        async for event in self.client.subscribe(cursor):
            kind = event.WhichOneof("event")
            if kind == "welcome" and self.identity in event.welcome.recipients:
                self.epoch = event.welcome.epoch
                self.executed_at[self.epoch] = time.monotonic()  # a joiner sends at once
                await self.client.ready(self.epoch)
            elif kind == "commit" and self.epoch >= 0 and event.commit.epoch == self.epoch:
                self.epoch += 1
                await self.client.ready(self.epoch)
            elif kind == "execute":
                self.executed_at.setdefault(event.execute.epoch, time.monotonic())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()


async def measure_critical(members: int, samples: int, wave: int) -> dict[str, list[float]]:
    """Join latency and exposure window of real clients in a room of ``members``, all but
    two of them ackers (see :class:`Acker`)."""
    secret = secrets.token_urlsafe(40)
    with tempfile.TemporaryDirectory() as tmp:
        ds = DeliveryServiceProcess(API_KEY, secret, workdir=tmp)
        ds.start()
        room = Room(ds, secret, f"critical-{members}")
        ackers: list[Acker] = []

        async def executed(epoch: int, timeout: float = 120.0) -> float:
            """When the last member (real or acker) switched to ``epoch``."""
            deadline = time.monotonic() + timeout
            while True:
                real = [m for m in room.members.values()]
                if all(m.session.executed_epoch == epoch for m in real) and all(
                    epoch in a.executed_at for a in ackers
                ):
                    times = [m.sink.sender_switched_at or 0.0 for m in real]
                    return max(times + [a.executed_at[epoch] for a in ackers])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"epoch {epoch} not executed everywhere")
                await asyncio.sleep(0.002)

        try:
            committer = await room.add("m0")
            await room.converged()
            for start in range(0, members - 2, wave):
                batch = [Acker(room, f"a{i}") for i in range(start, min(start + wave, members - 2))]
                await asyncio.gather(*(a.start() for a in batch))
                ackers += batch
                while (  # noqa: ASYNC110 - polling the committer's roster
                    committer.session.group is None
                    or committer.session.group.member_count < 1 + len(ackers)
                ):
                    await asyncio.sleep(0.01)
                epoch = committer.session.epoch
                assert epoch is not None
                await executed(epoch)
            result: dict[str, list[float]] = {"join_ms": [], "exposure_ms": []}
            for i in range(samples):
                t0 = time.monotonic()
                guest = await room.add(f"guest{i}")
                others = frozenset(a.identity for a in ackers)
                await room.converged(also=others)
                epoch = guest.session.epoch
                assert epoch is not None
                result["join_ms"].append((await executed(epoch) - t0) * 1000)
                await guest.session.stop(leave=True)
                await guest.client.close()
                del room.members[guest.session.identity]
                new_epoch = await room.converged(also=others)
                switched = await executed(new_epoch)
                accepted = committer.client.accepted[new_epoch]
                result["exposure_ms"].append((switched - accepted) * 1000)
            return result
        finally:
            await asyncio.gather(*(a.stop() for a in ackers))
            await room.stop()
            ds.stop()


def plan(members: int, samples: int) -> tuple[int, int]:
    """(samples, join wave size) for a group size: fewer samples for big groups."""
    if members <= 50:
        return samples, 25
    if members <= 200:
        return max(5, samples // 3), 50
    return max(3, samples // 6), 100


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,10,50,200,1000", help="wall-clock sizes")
    parser.add_argument(
        "--critical-sizes", default="50,200,1000", help="sizes of the critical-path runs"
    )
    parser.add_argument("--samples", type=int, default=30, help="join/leave pairs (N <= 50)")
    args = parser.parse_args()
    _instrument_processing()
    wall_rows, wall = [], []
    for members in [int(s) for s in args.sizes.split(",") if s]:
        samples, wave = plan(members, args.samples)
        print(f"N = {members}: wall clock, {samples} join/leave pairs", flush=True)
        data = await measure(members, samples, wave)
        wall_rows.append(
            [
                members, samples,
                f"{percentile(data['join_ms'], 50):.0f}", f"{percentile(data['join_ms'], 99):.0f}",
                f"{percentile(data['exposure_ms'], 50):.0f}",
                f"{percentile(data['exposure_ms'], 99):.0f}",
                f"{percentile(data['removal_total_ms'], 50):.0f}",
                f"{percentile(data['processing_join_ms'], 50):.1f} / "
                f"{percentile(data['processing_leave_ms'], 50):.1f}",
            ]
        )  # fmt: skip
        wall.append({"members": members, "samples": samples, **data})
    critical_rows, critical = [], []
    for members in [int(s) for s in args.critical_sizes.split(",") if s]:
        samples, wave = plan(members, args.samples)
        print(f"N = {members}: critical path, {samples} join/leave pairs", flush=True)
        data = await measure_critical(members, samples, wave)
        critical_rows.append(
            [
                members, samples,
                f"{percentile(data['join_ms'], 50):.0f}", f"{percentile(data['join_ms'], 99):.0f}",
                f"{percentile(data['exposure_ms'], 50):.0f}",
                f"{percentile(data['exposure_ms'], 99):.0f}",
            ]
        )  # fmt: skip
        critical.append({"members": members, "samples": samples, **data})
    print("wall clock (every member in this process):")
    print(
        markdown_table(
            [
                "members", "samples", "join p50 (ms)", "join p99 (ms)", "exposure p50 (ms)",
                "exposure p99 (ms)", "leave->switched p50 (ms)",
                "one member's processing, join / leave (ms)",
            ],
            wall_rows,
        )
    )  # fmt: skip
    print("\ncritical path (two real clients, every other member an acker):")
    print(
        markdown_table(
            ["members", "samples", "join p50 (ms)", "join p99 (ms)", "exposure p50 (ms)",
             "exposure p99 (ms)"],
            critical_rows,
        )
    )  # fmt: skip
    path = write_result("session", {"results": wall, "critical": critical})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
