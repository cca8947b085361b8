"""kill -9 of the delivery service during churn, then restart on the same store.

Twelve real client sessions (headless) churn in one room; the DS process is killed with
SIGKILL in the middle and restarted on the same SQLite file and ports. Every commit the
DS acknowledged must be in its log exactly once, epochs consecutive; every client must
resume from its cursor and all must end on the same epoch and epoch authenticator.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import sqlite3
from pathlib import Path
from typing import ClassVar

import pytest

from mls_provider.proto import delivery_pb2 as pb
from mls_provider.session import MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.transport import DeliveryClient

pytestmark = pytest.mark.timeout(240)

API_KEY = "crash-test"
ROOM = "crash-room"


class AckRecordingClient(DeliveryClient):
    """Remembers every commit the DS acknowledged: (seq, new epoch, sha256 of commit)."""

    acknowledged: ClassVar[list[tuple[int, int, str]]] = []

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse:
        response = await super().submit_commit(epoch, commit, welcome, group_info)
        self.acknowledged.append((response.seq, response.epoch, hashlib.sha256(commit).hexdigest()))
        return response


def logged_commits(db_path: Path) -> list[tuple[int, int, int, str]]:
    """(seq, generation, epoch, sha256) of every commit in the room's log, in seq order."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT seq, event FROM log WHERE room = ? ORDER BY seq", (ROOM,))
        commits = []
        for seq, blob in rows:
            event = pb.RoomEvent.FromString(blob)
            if event.WhichOneof("event") == "commit":
                digest = hashlib.sha256(event.commit.message).hexdigest()
                commits.append((seq, event.generation, event.commit.epoch, digest))
        return commits


async def test_kill_9_during_churn_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(40)
    ds = DeliveryServiceProcess(API_KEY, secret, workdir=tmp_path)
    ds.start()
    AckRecordingClient.acknowledged = []
    sessions: dict[str, MlsSession] = {}

    def token(identity: str) -> str:
        return ds.token(identity, ROOM)

    async def join(identity: str) -> None:
        config = SessionConfig(ds_public_key=ds.public_key, retry_initial=0.05, retry_max=0.5)
        session = MlsSession(
            AckRecordingClient(ds.target, token(identity)), identity, HeadlessKeySink(), config
        )
        sessions[identity] = session
        await session.start()

    async def leave(identity: str) -> None:
        await sessions.pop(identity).stop(leave=True)

    async def converged(timeout: float) -> int:
        async def check() -> int:
            while True:
                states = [
                    (s.epoch, s.executed_epoch, s.verification_code) for s in sessions.values()
                ]
                rosters = {tuple(sorted(s.members)) for s in sessions.values()}
                if (
                    len(set(states)) == 1
                    and states[0][0] is not None
                    and states[0][0] == states[0][1]
                    and rosters == {tuple(sorted(sessions))}
                ):
                    return int(states[0][0])
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(check(), timeout)

    try:
        for i in range(12):
            await join(f"m{i}")
        await converged(30)

        async def churn() -> None:
            for i in range(12, 20):
                await join(f"m{i}")
                await asyncio.sleep(0.15)
                await leave(f"m{i - 12}")
                await asyncio.sleep(0.1)

        churner = asyncio.create_task(churn())
        await asyncio.sleep(0.8)
        acknowledged_before_kill = len(AckRecordingClient.acknowledged)
        ds.kill()  # SIGKILL: no shutdown, no flush
        await asyncio.sleep(1.0)  # clients see the DS gone and retry meanwhile
        ds.start()  # same ports, same SQLite file
        await asyncio.wait_for(churner, 60)
        final_epoch = await converged(60)

        assert acknowledged_before_kill > 0, "the kill must happen mid-churn"
        commits = logged_commits(tmp_path / "ds.db")
        # exactly one commit per epoch, epochs consecutive within each generation
        keys = [(generation, epoch) for _, generation, epoch, _ in commits]
        assert len(keys) == len(set(keys)), "an epoch has two commits in the log"
        for (g1, e1), (g2, e2) in itertools.pairwise(keys):
            assert (g1 == g2 and e2 == e1 + 1) or g2 > g1, f"epoch gap: {(g1, e1)} -> {(g2, e2)}"
        # every acknowledged commit is in the log, at the acknowledged position
        by_seq = {seq: (epoch + 1, digest) for seq, _, epoch, digest in commits}
        for seq, new_epoch, digest in AckRecordingClient.acknowledged:
            assert by_seq.get(seq) == (new_epoch, digest), f"acknowledged commit {seq} lost"
        assert final_epoch == keys[-1][1] + 1
        codes = {s.verification_code for s in sessions.values()}
        assert len(codes) == 1
    finally:
        await asyncio.gather(*(s.stop(leave=False) for s in sessions.values()))
        await asyncio.gather(*(s.ds.close() for s in sessions.values()))
        ds.stop()


async def test_a_leave_lost_in_an_outage_is_caught_by_presence(tmp_path: Path) -> None:
    """carol says goodbye while the DS is down: her leave is never confirmed and her session
    ends. After the DS comes back, her stream never returns, so the DS removes her once the
    presence timeout has passed (counted from its restart): alice and bob converge without
    her. (Before presence, carol stayed in the group for good: a ghost member whose keys
    everyone kept installing.)"""
    secret = secrets.token_urlsafe(40)
    ds = DeliveryServiceProcess(API_KEY, secret, workdir=tmp_path)
    ds.start()
    sessions: dict[str, MlsSession] = {}
    config = SessionConfig(
        ds_public_key=ds.public_key, retry_initial=0.05, retry_max=0.5, leave_timeout=0.5
    )
    try:
        for name in ("alice", "bob", "carol"):
            session = MlsSession(
                DeliveryClient(ds.target, ds.token(name, ROOM)), name, HeadlessKeySink(), config
            )
            await session.start()
            sessions[name] = session

        async def converged(names: set[str]) -> None:
            def done() -> bool:
                states = {(s.epoch, s.executed_epoch, s.verification_code) for s in stayers}
                return (
                    len(states) == 1
                    and all(set(s.members) == names for s in stayers)
                    and stayers[0].epoch == stayers[0].executed_epoch
                )

            for _ in range(10_000):
                if done():
                    return
                await asyncio.sleep(0.05)

        stayers = list(sessions.values())
        await asyncio.wait_for(converged({"alice", "bob", "carol"}), 30)
        ds.kill()
        carol = sessions.pop("carol")
        await carol.stop(leave=True)  # the DS is down: the leave is lost
        await carol.ds.close()
        ds.start()
        stayers = list(sessions.values())
        await asyncio.wait_for(converged({"alice", "bob"}), 30)
        messages = [str(r.get("msg", "")) for r in ds.log_lines()]
        assert any(m.startswith(f"vanished room={ROOM} identity=carol") for m in messages)
        assert not any(m.startswith(f"leave room={ROOM} identity=carol") for m in messages)
    finally:
        await asyncio.gather(*(s.stop(leave=False) for s in sessions.values()))
        await asyncio.gather(*(s.ds.close() for s in sessions.values()))
        ds.stop()
