"""Chaos runs: one room of headless members churning while the delivery service and its
store are killed and restarted, then the faults stop and the room must go quiet.

A run (:func:`run_chaos`, seeded, so a failing seed replays the same schedule of faults
and churn) starts the DS (SQLite: one process; Redis: several processes on one
``redis-server`` with ``appendonly yes``/``appendfsync always``) and a room of real
``MlsSession`` members without LiveKit. For ``duration`` seconds:

* **faults** every few seconds: SIGKILL of the DS process and a restart (SQLite); SIGKILL
  of one DS process, of every DS process, or of redis-server, each back after a moment
  (Redis);
* **churn**: members join, leave (saying goodbye, which may be lost in an outage), vanish
  (no goodbye: the DS's presence removes them), and departed identities come back as new
  instances.

Then every server is up and the churn stops; the run waits for the room to be quiet and
checks what must hold after any bad day:

(a) every live member is on one epoch (executed) with one epoch authenticator;
(b) every member holds, for every member, the key the MLS exporter gives for that epoch;
(c) the roster is exactly the live members (presence removed everyone who vanished);
(d) every commit the DS acknowledged is in its log exactly once, one commit per epoch;
(e) no session failed (no ``error`` event, none stopped by itself), and no DS process logged
    an error (an unexpected failure: outages of the store are warnings).

The report gives the time from the last disturbance (the end of the last fault, or the last
churn step) to that quiet state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from delivery_service.store import open_store
from mls_provider.keys import EXPORTER_LABEL, key_index
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.session import MlsSession
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.redis_server import RedisServer
from mls_provider.transport import DeliveryClient

__all__ = ["ChaosPlan", "ChaosReport", "run_chaos"]

log = logging.getLogger(__name__)

API_KEY = "chaos"
ROOM = "chaos-room"


@dataclass(frozen=True)
class ChaosPlan:
    """What a run does; the same plan and seed give the same schedule."""

    mode: str = "sqlite"  # "sqlite" or "redis"
    seed: int = 1
    duration: float = 60.0  # seconds of faults and churn
    members: tuple[int, int] = (8, 15)  # live members kept within these bounds
    ds_processes: int = 1  # Redis mode: several processes share the store
    fault_every: tuple[float, float] = (3.5, 8.0)  # seconds between faults
    down_for: tuple[float, float] = (0.2, 2.0)  # seconds a killed server stays down
    churn_every: tuple[float, float] = (0.3, 1.5)  # seconds between membership changes
    quiet_timeout: float = 60.0  # longest wait for the quiet state after the faults

    def __post_init__(self) -> None:
        if self.mode not in ("sqlite", "redis"):
            raise ValueError(f"mode must be 'sqlite' or 'redis', not {self.mode!r}")
        if self.mode == "sqlite" and self.ds_processes != 1:
            raise ValueError("an SQLite store serves one DS process")


@dataclass
class ChaosReport:
    plan: ChaosPlan
    faults: list[tuple[float, str]] = field(default_factory=list)  # (seconds into run, what)
    churn: Counter[str] = field(default_factory=Counter)
    # seconds from the last disturbance (a fault's end or a churn step) to the quiet state
    converged_after: float | None = None
    epoch: int | None = None
    members: list[str] = field(default_factory=list)
    acknowledged: int = 0
    logged: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and self.converged_after is not None

    def summary(self) -> str:
        state = "PASSED" if self.passed else "FAILED"
        converged = "-" if self.converged_after is None else f"{self.converged_after:.2f} s"
        return (
            f"chaos {self.plan.mode} seed={self.plan.seed}: {state}; {len(self.faults)} faults, "
            f"churn {dict(sorted(self.churn.items()))}; converged {converged} after the last "
            f"disturbance at epoch {self.epoch} with {len(self.members)} members; "
            f"{self.acknowledged} acknowledged commits, {self.logged} logged"
            + ("".join(f"\n  problem: {p}" for p in self.problems))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.plan.mode,
            "seed": self.plan.seed,
            "duration_s": self.plan.duration,
            "passed": self.passed,
            "faults": [{"at_s": round(t, 3), "what": w} for t, w in self.faults],
            "churn": dict(self.churn),
            "converged_after_s": self.converged_after,
            "epoch": self.epoch,
            "members": self.members,
            "acknowledged_commits": self.acknowledged,
            "logged_commits": self.logged,
            "problems": self.problems,
        }


class _AckRecordingClient(DeliveryClient):
    """Records every commit the DS acknowledged: (seq, new epoch, sha256 of the commit)."""

    def __init__(self, target: str, token: str, acks: list[tuple[int, int, str]]) -> None:
        super().__init__(target, token)
        self.acks = acks

    async def submit_commit(
        self, epoch: int, commit: bytes, welcome: bytes = b"", group_info: bytes = b""
    ) -> pb.SubmitCommitResponse:
        response = await super().submit_commit(epoch, commit, welcome, group_info)
        self.acks.append((response.seq, response.epoch, hashlib.sha256(commit).hexdigest()))
        return response


@dataclass
class _Member:
    identity: str
    session: MlsSession
    sink: HeadlessKeySink
    errors: list[BaseException] = field(default_factory=list)
    started: asyncio.Task[None] | None = None


class _Chaos:
    def __init__(self, plan: ChaosPlan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.rng = random.Random(plan.seed)
        self.secret = secrets.token_urlsafe(40)
        self.report = ChaosReport(plan)
        self.redis: RedisServer | None = None
        self.ds: list[DeliveryServiceProcess] = []
        self.live: dict[str, _Member] = {}
        self.departed: list[str] = []  # identities that left or vanished, may come back
        self.stopping: set[asyncio.Task[None]] = set()
        self.acks: list[tuple[int, int, str]] = []
        self.names = (f"m{i}" for i in itertools.count())
        self.started_at = time.monotonic()
        self.last_disturbance = 0.0  # the end of the last fault or churn step

    # ---- servers -------------------------------------------------------------------

    async def start_servers(self) -> None:
        store = f"sqlite:///{self.workdir / 'ds.db'}"
        if self.plan.mode == "redis":
            self.redis = RedisServer(
                workdir=self.workdir / "redis", appendonly=True, appendfsync="always"
            )
            await self.redis.astart()
            store = self.redis.url
        self.ds = [
            DeliveryServiceProcess(
                API_KEY, self.secret, workdir=self.workdir / f"ds{i}", store=store
            )
            for i in range(self.plan.ds_processes)
        ]
        # generated by the first process that reads it and kept in the store: one for all
        public_key = await asyncio.to_thread(self.ds[0]._read_public_key)
        for ds in self.ds:
            ds.public_key = public_key
            await ds.astart()

    @property
    def target(self) -> str:
        """One gRPC target naming every DS process (gRPC's pick_first moves to the next
        address when one fails), in a random order per member."""
        addresses = [ds.target for ds in self.ds]
        self.rng.shuffle(addresses)
        return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)

    def fault(self, what: str) -> None:
        self.report.faults.append((time.monotonic() - self.started_at, what))
        log.info("chaos: %s", what)

    async def faults(self, until: float) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(*self.plan.fault_every))
            if time.monotonic() >= until:
                return
            down = self.rng.uniform(*self.plan.down_for)
            if self.plan.mode == "sqlite":
                victims: list[DeliveryServiceProcess | RedisServer] = [self.ds[0]]
                what = "kill -9 the DS"
            else:
                choice = self.rng.random()
                if choice < 0.6:
                    one = self.rng.randrange(len(self.ds))
                    victims, what = [self.ds[one]], f"kill -9 DS process {one}"
                elif choice < 0.8:
                    victims, what = list(self.ds), "kill -9 every DS process"
                else:
                    assert self.redis is not None
                    victims, what = [self.redis], "kill -9 redis-server"
            for victim in victims:
                await victim.akill()
            self.fault(f"{what}, down {down:.1f} s")
            await asyncio.sleep(down)
            for victim in victims:
                await victim.astart()
            self.last_disturbance = time.monotonic()

    # ---- members -------------------------------------------------------------------

    def add_member(self, identity: str) -> _Member:
        sink = HeadlessKeySink()
        ds = self.ds[0]
        client = _AckRecordingClient(self.target, ds.token(identity, ROOM), self.acks)
        config = ds.session_config(identity, ROOM)
        member = _Member(identity, MlsSession(client, identity, sink, config), sink)
        member.session.on("error", member.errors.append)
        member.started = asyncio.ensure_future(member.session.start())
        self.live[identity] = member
        return member

    def _end(self, member: _Member, *, leave: bool) -> None:
        del self.live[member.identity]
        self.departed.append(member.identity)
        if member.errors:
            self.report.problems.append(f"{member.identity} failed: {member.errors[0]!r}")

        async def end() -> None:
            if member.started is not None:
                with contextlib.suppress(Exception):
                    await member.started
            await member.session.stop(leave=leave)
            await member.session.ds.close()

        task = asyncio.ensure_future(end())
        self.stopping.add(task)
        task.add_done_callback(self.stopping.discard)

    async def churn(self, until: float) -> None:
        low, high = self.plan.members
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(*self.plan.churn_every))
            count = len(self.live)
            ops = []
            if count < high:
                ops += ["join", "join"] + (["return"] if self.departed else [])
            if count > low:
                ops += ["leave", "vanish"]
            op = self.rng.choice(ops)
            self.report.churn[op] += 1
            if op == "join":
                self.add_member(next(self.names))
            elif op == "return":
                identity = self.departed.pop(self.rng.randrange(len(self.departed)))
                if identity not in self.live:
                    self.add_member(identity)
            else:
                victim = self.live[self.rng.choice(sorted(self.live))]
                self._end(victim, leave=op == "leave")
            self.last_disturbance = time.monotonic()

    # ---- the quiet state -------------------------------------------------------------

    def quiet_problem(self) -> str | None:
        """None once (a), (b), (c) and (e) hold; else what does not (yet)."""
        members = list(self.live.values())
        for m in members:
            if m.errors:
                return f"(e) {m.identity}: {m.errors[0]!r}"
            if m.started is not None and m.started.done() and not m.session.running:
                return f"(e) {m.identity}'s session stopped"
        sessions = [m.session for m in members]
        states = {(s.epoch, s.executed_epoch, s.verification_code) for s in sessions}
        if len(states) != 1:
            return f"(a) epochs differ: {sorted((m.identity, m.session.epoch) for m in members)}"
        epoch, executed, _ = states.pop()
        if epoch is None or executed != epoch:
            return "(a) not executed"
        expected = sorted(self.live)
        for s in sessions:
            if sorted(s.members) != expected:
                return f"(c) {s.identity} sees {sorted(s.members)}, live are {expected}"
        group = sessions[0].group
        assert group is not None
        index = key_index(epoch, sessions[0].config.ring_size)
        for identity in expected:
            material = group.export_secret(EXPORTER_LABEL, identity.encode(), 32)
            if any(m.sink.key(identity, index) != material for m in members):
                return f"(b) a member does not hold {identity}'s exporter key"
        return None

    async def wait_quiet(self) -> None:
        deadline = time.monotonic() + self.plan.quiet_timeout
        problem = self.quiet_problem()
        while problem is not None:
            if time.monotonic() > deadline:
                self.report.problems.append(
                    f"not quiet {self.plan.quiet_timeout:g} s after the faults: {problem}"
                )
                return
            await asyncio.sleep(0.05)
            problem = self.quiet_problem()
        self.report.converged_after = time.monotonic() - self.last_disturbance
        first = next(iter(self.live.values())).session
        self.report.epoch = first.epoch
        self.report.members = sorted(self.live)

    async def check_log(self) -> None:
        """(d): every acknowledged commit is in the log at its seq, once; epochs of each
        generation consecutive."""
        store = open_store(self.ds[0].store)
        await store.open()
        try:
            commits: dict[int, tuple[int, int, str]] = {}
            after = 0
            while True:
                page = await store.read_log(ROOM, after)
                for entry in page:
                    event = entry.decode()
                    if event.HasField("commit"):
                        digest = hashlib.sha256(event.commit.message).hexdigest()
                        commits[entry.seq] = (event.generation, event.commit.epoch, digest)
                if len(page) < 500:
                    break
                after = page[-1].seq
        finally:
            await store.close()
        self.report.logged = len(commits)
        self.report.acknowledged = len({seq for seq, _, _ in self.acks})
        for seq, new_epoch, digest in self.acks:
            logged = commits.get(seq)
            if logged is None or (logged[1] + 1, logged[2]) != (new_epoch, digest):
                self.report.problems.append(f"(d) acknowledged commit at seq {seq} not logged")
        keys = [(g, e) for g, e, _ in (commits[s] for s in sorted(commits))]
        if len(keys) != len(set(keys)):
            self.report.problems.append("(d) an epoch has two commits in the log")
        for (g1, e1), (g2, e2) in itertools.pairwise(keys):
            if not ((g1 == g2 and e2 == e1 + 1) or g2 > g1):
                self.report.problems.append(f"(d) epoch gap {(g1, e1)} -> {(g2, e2)}")

    # ---- the run ---------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        try:
            await self.start_servers()
            for _ in range(self.plan.members[0]):
                self.add_member(next(self.names))
            await _settle([m.started for m in self.live.values() if m.started], 60)
            self.started_at = time.monotonic()
            until = self.started_at + self.plan.duration
            await asyncio.gather(self.faults(until), self.churn(until))
            log.info("chaos: faults and churn over; waiting for the room to be quiet")
            await _settle([m.started for m in self.live.values() if m.started], 60)
            for member in list(self.live.values()):
                if member.started is not None and member.started.exception() is not None:
                    error = member.started.exception()
                    self.report.problems.append(f"(e) {member.identity} never joined: {error!r}")
                    del self.live[member.identity]
            await self.wait_quiet()
            await _settle(list(self.stopping), 30)
            await self.close(keep_store=True)
            await self.check_log()
            for ds in self.ds:
                for record in ds.log_lines():
                    if record.get("level") in ("error", "critical"):
                        self.report.problems.append(f"(e) DS error: {record.get('msg')}")
        finally:
            await self.close()
        return self.report

    async def close(self, *, keep_store: bool = False) -> None:
        """Stops members and DS processes (and, unless ``keep_store``, redis-server)."""
        for member in list(self.live.values()):
            await member.session.stop(leave=False)
            await member.session.ds.close()
        self.live.clear()
        for ds in self.ds:
            await ds.astop()
        if self.redis is not None and not keep_store:
            await self.redis.astop()


async def _settle(tasks: list[Any], timeout: float) -> None:
    pending: list[Awaitable[Any]] = [t for t in tasks if t is not None]
    if pending:
        await asyncio.wait([asyncio.ensure_future(t) for t in pending], timeout=timeout)


async def run_chaos(plan: ChaosPlan, workdir: Path) -> ChaosReport:
    """Runs ``plan`` with its servers' files under ``workdir``; see the module docstring."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    return await _Chaos(plan, workdir).run()
