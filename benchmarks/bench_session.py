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
they process in parallel. So two figures are reported per size:

* **wall clock**: as measured here, every member's processing serialized on one CPU;
* **critical path** of one client: the DS, transport and ack round trips as measured at
  N = 2 (where members' processing is negligible) plus one member's own processing of a
  commit at size N (measured per member here: applying the commit and installing keys).

    .venv/bin/python benchmarks/bench_session.py [--sizes 2,10,50,200,1000] [--samples 30]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from dataclasses import dataclass, field

from common import markdown_table, percentile, write_result
from livekit import api

from delivery_service.proto import delivery_pb2 as pb
from mls_provider import mls
from mls_provider.session import MlsSession, SessionConfig
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
        grants = api.VideoGrants(room_join=True, room=self.name)
        return (
            api.AccessToken(API_KEY, self.secret)
            .with_identity(identity)
            .with_grants(grants)
            .to_jwt()
        )

    async def add(self, identity: str) -> Member:
        client = TimedDeliveryClient(self.ds.target, self.token(identity))
        sink = HeadlessKeySink()
        config = SessionConfig(ds_public_key=self.ds.public_key)
        session = MlsSession(client, identity, sink, config)
        member = Member(session, client, sink)
        self.members[identity] = member
        await session.start()
        return member

    async def converged(self, timeout: float = 60.0) -> int:
        """Waits until every member has executed the same epoch with the full roster."""
        names = set(self.members)
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


async def measure(members: int, samples: int, wave: int) -> dict[str, list[float]]:
    secret = secrets.token_urlsafe(40)
    with tempfile.TemporaryDirectory() as tmp:
        ds = DeliveryServiceProcess(API_KEY, secret, workdir=tmp)
        ds.start()
        room = Room(ds, secret, f"bench-{members}")
        try:
            # build the room: concurrent joins in waves (the DS batches them into few epochs)
            for start in range(0, members, wave):
                await asyncio.gather(
                    *(room.add(f"m{i}") for i in range(start, min(start + wave, members)))
                )
                await room.converged()
            result: dict[str, list[float]] = {
                "join_ms": [],
                "exposure_ms": [],
                "exposure_first_ms": [],
                "removal_total_ms": [],
            }
            for i in range(samples):
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
            result["processing_join_ms"] = list(PROCESSING_MS["join"])
            result["processing_leave_ms"] = list(PROCESSING_MS["leave"])
            return result
        finally:
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
    parser.add_argument("--sizes", default="2,10,50,200,1000")
    parser.add_argument("--samples", type=int, default=30, help="join/leave pairs (N <= 50)")
    args = parser.parse_args()
    _instrument_processing()
    rows, results = [], []
    base: dict[str, float] | None = None  # DS + transport, from the smallest size
    for members in [int(s) for s in args.sizes.split(",")]:
        samples, wave = plan(members, args.samples)
        print(f"N = {members}: building the room, then {samples} join/leave pairs", flush=True)
        data = await measure(members, samples, wave)
        processing = {
            "join": percentile(data["processing_join_ms"], 50),
            "exposure": percentile(data["processing_leave_ms"], 50),
        }
        if base is None:  # the smallest size: DS, transport and acks without member load
            base = {
                "join": percentile(data["join_ms"], 50) - processing["join"],
                "exposure": percentile(data["exposure_ms"], 50) - processing["exposure"],
            }
        critical = {k: base[k] + processing[k] for k in base}
        rows.append(
            [
                members, samples,
                f"{percentile(data['join_ms'], 50):.0f}", f"{percentile(data['join_ms'], 99):.0f}",
                f"{percentile(data['exposure_ms'], 50):.0f}",
                f"{percentile(data['exposure_ms'], 99):.0f}",
                f"{percentile(data['removal_total_ms'], 50):.0f}",
                f"{processing['join']:.1f} / {processing['exposure']:.1f}",
                f"{critical['join']:.0f}", f"{critical['exposure']:.0f}",
            ]
        )  # fmt: skip
        results.append(
            {"members": members, "samples": samples, "critical_path_ms": critical, **data}
        )
    table = markdown_table(
        [
            "members", "samples", "join p50 (ms)", "join p99 (ms)", "exposure p50 (ms)",
            "exposure p99 (ms)", "leave->switched p50 (ms)",
            "one member's processing, join / leave (ms)",
            "critical path: join (ms)", "critical path: exposure (ms)",
        ],
        rows,
    )  # fmt: skip
    print(table)
    path = write_result("session", {"results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
