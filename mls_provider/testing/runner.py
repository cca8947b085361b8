"""The scenario runner: runs a :class:`~mls_provider.testing.scenario.Scenario` on a real
stack and times every key rotation.

:class:`ScenarioRunner` starts its own livekit-server and delivery service (DS, embedded
SQLite store) in a work dir — only the DS in headless mode — and always tears them down.
It drives :mod:`~mls_provider.testing.members` through the steps and records, per event,
the epoch it produced, the rotation latency (request -> every remaining member executed
that epoch), the exposure window of removals (the DS accepted the removing commit -> every
remaining sender switched; see :mod:`~mls_provider.testing.ds_log`), decrypt failures
between members that should hear each other, and every member's epochs. The result is a
:class:`~mls_provider.testing.report.RunReport`. An :class:`Observer` (the CLI's live table
or plain lines) is told about each step, rotation and check as it happens.
:func:`run_scenario` runs one from a command line, with clean handling of Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mls_provider.authority import IdentityAuthority
from mls_provider.testing.ds_log import DsLog
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.members import (
    FAILURE_STATES,
    TONE_TOLERANCE_HZ,
    EpochRecord,
    HeadlessMember,
    LocalMember,
    Member,
    ProcessMember,
)
from mls_provider.testing.report import (
    CheckResult,
    EventRecord,
    RunReport,
    milliseconds,
    relative,
    summarize,
)
from mls_provider.testing.scenario import Scenario, Step

if TYPE_CHECKING:
    # the LiveKit SDK and the test plugin load lazily: headless runs do not need them
    from mls_provider.testing.livekit_server import LiveKitServer

__all__ = [
    "DEFAULT_STEP_TIMEOUT",
    "HEAR_TIMEOUT",
    "IN_FLIGHT_ALLOWANCE",
    "Interrupted",
    "MemberRow",
    "Observer",
    "ScenarioRunner",
    "run_scenario",
]

DEFAULT_STEP_TIMEOUT = 30.0
HEAR_TIMEOUT = 10.0
# Decrypt failures in the first second after two members start sharing an epoch are not
# counted: frames a speaker sent under its previous key (a joiner never gets that key) may
# still be in flight, and the SDK's events reach Python with some delay.
IN_FLIGHT_ALLOWANCE = 1.0


@dataclass(frozen=True)
class MemberRow:
    """One line of the live table."""

    identity: str
    kind: str
    status: str
    epoch: int | None
    executed: int
    key_index: int | None
    hears: int
    hears_of: int
    decrypt_failures: int
    verification_code: str | None


class Observer(Protocol):
    """What a presentation (live table, plain lines) is told while a scenario runs."""

    def started(self, runner: ScenarioRunner) -> None: ...

    def step(self, index: int, step: Step) -> None: ...

    def rotation(self, event: EventRecord) -> None: ...

    def message(self, text: str) -> None: ...

    def checked(self, result: CheckResult) -> None: ...

    def tick(self) -> None: ...

    def finished(self, report: RunReport) -> None: ...


class _NullObserver:
    def started(self, runner: ScenarioRunner) -> None:
        pass

    def step(self, index: int, step: Step) -> None:
        pass

    def rotation(self, event: EventRecord) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def checked(self, result: CheckResult) -> None:
        pass

    def tick(self) -> None:
        pass

    def finished(self, report: RunReport) -> None:
        pass


class Interrupted(Exception):
    """The run was stopped by a signal (Ctrl-C, SIGTERM); everything was torn down."""

    def __init__(self, signum: int, report: RunReport | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.report = report


class StepFailed(Exception):
    """A step could not be done; the message (the report's ``error``) says which and why."""


class ScenarioRunner:
    """Runs one scenario on its own stack; :meth:`run` returns the :class:`RunReport`.

    ``workdir`` holds the servers' logs and config (default: a temp dir, removed after a
    passing run and kept, for its logs, after a failing one). :meth:`interrupt` (e.g.
    from a signal handler) stops the steps; the stack is torn down either way.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        observer: Observer | None = None,
        workdir: str | os.PathLike[str] | None = None,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        self.scenario = scenario
        self.observer: Observer = observer or _NullObserver()
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.workdir = Path()
        self.step_timeout = step_timeout
        self.room = scenario.room or f"harness-{secrets.token_hex(3)}"
        self.t0 = time.monotonic()
        self.started_at = ""
        self.livekit: LiveKitServer | None = None
        self.ds: DeliveryServiceProcess | None = None
        self.instances: list[Member] = []
        self.current: dict[str, Member] = {}
        self.order: list[str] = []  # identities in order of first join (table rows)
        self.events: list[EventRecord] = []
        self.checks: list[CheckResult] = []
        self.error: str | None = None
        self.interrupted = False
        self.interrupt_signal: int | None = None
        self._steps_task: asyncio.Task[None] | None = None
        self._ds_log: DsLog | None = None
        self._headless_secret = secrets.token_urlsafe(40)
        self._will_be_killed = self._plan_kills()
        self._next_instance: dict[str, int] = {}
        self._stack_pids: dict[str, int | None] = {}
        self.display_errors: list[str] = []

    # ---- planning ---------------------------------------------------------------------

    def _plan_kills(self) -> set[tuple[str, int]]:
        """(identity, n-th join of it) of every participant a later step kills: those run
        in their own process."""
        joins: dict[str, int] = {}
        killed: set[tuple[str, int]] = set()
        for step in self.scenario.steps:
            for name in step.identities:
                if step.action == "join":
                    joins[name] = joins.get(name, 0) + 1
                elif step.action == "kill":
                    killed.add((name, joins.get(name, 0)))
        return killed

    @property
    def headless(self) -> bool:
        return self.scenario.mode == "headless"

    # ---- the run ------------------------------------------------------------------------

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Stops the steps (the run then tears down and reports ``interrupted``)."""
        if self.interrupt_signal is None:
            self.interrupt_signal = signum
        if self._steps_task is not None:
            self._steps_task.cancel()

    async def run(self) -> RunReport:
        self.t0 = time.monotonic()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        owns_workdir = self._workdir_arg is None
        self.workdir = self._workdir_arg or Path(tempfile.mkdtemp(prefix="livekit-mls-harness-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.emergency_cleanup)
        # this run's library and SDK logs (MLS sessions, LiveKit's Rust core) go here
        log_handler = logging.FileHandler(self.workdir / "harness.log")
        log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(log_handler)
        ticker: asyncio.Task[None] | None = None
        try:
            self._start_stack()
            self.observer.started(self)
            ticker = asyncio.create_task(self._tick_loop(), name="harness-ticker")
            self._steps_task = asyncio.create_task(self._run_steps(), name="harness-steps")
            if self.interrupt_signal is not None:  # a signal came during the stack's start
                self._steps_task.cancel()
            try:
                await self._steps_task
            except asyncio.CancelledError:
                if self.interrupt_signal is None:
                    raise  # we were cancelled from outside: propagate
                self.interrupted = True
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}" if not isinstance(e, StepFailed) else str(e)
                self.observer.message(f"error: {self.error}")
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                with contextlib.suppress(Exception):
                    self._resolve_events()
                    self.observer.tick()  # the last view before anything is torn down
            await self._teardown()
            atexit.unregister(self.emergency_cleanup)
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
        self._resolve_events()
        report = self._report()
        if report.passed and owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.observer.finished(report)
        return report

    def _start_stack(self) -> None:
        # started from this (the event loop's) thread: livekit-server is tied to it
        if self.headless:
            self.ds = DeliveryServiceProcess(
                "harness-key",
                self._headless_secret,
                workdir=self.workdir / "ds",
                authority=IdentityAuthority.generate(),
            )
            self.ds.start()
        else:
            from mls_provider.testing.stack import start_stack

            stack = start_stack(str(self.workdir))
            self.livekit, self.ds = stack.livekit, stack.ds
            self._stack_pids["livekit-server"] = self.livekit.pid
        # stop() forgets the pids: the report lists them, to check nothing survived
        self._stack_pids["delivery-service"] = self.ds.pid
        self._ds_log = DsLog(self.ds.log_path, self.room)

    async def _run_steps(self) -> None:
        steps = list(self.scenario.steps)
        if not steps or steps[-1].action != "check":
            steps.append(Step("check"))
        for index, step in enumerate(steps):
            self._resolve_events()  # report finished rotations before the next step
            self.observer.step(index, step)
            if step.action == "join":
                await asyncio.gather(
                    *(self._join(n, t) for n, t in zip(step.identities, step.tones, strict=True))
                )
            elif step.action in ("leave", "kill"):
                await asyncio.gather(*(self._remove(step.action, n) for n in step.identities))
            elif step.action == "wait" and step.converged:
                converged = await self._wait_converged(step.timeout)
                self._resolve_events()
                if not converged:
                    raise StepFailed(
                        f"step {index} ({step.describe()}): members did not converge in "
                        f"{step.timeout:g} s: {self._divergence()}"
                    )
            elif step.action == "wait":
                await asyncio.sleep(step.seconds)
            else:
                result = await self._check(index, step)
                self.checks.append(result)
                self.observer.checked(result)
        # give rotations still in flight a moment to be timed
        deadline = time.monotonic() + 5
        while any(not e.resolved for e in self.events) and time.monotonic() < deadline:
            self._resolve_events()
            await asyncio.sleep(0.05)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                self._resolve_events()
                self.observer.tick()
            except Exception as e:  # a display problem must not stop the run
                self.display_errors.append(f"{type(e).__name__}: {e}")

    # ---- actions ------------------------------------------------------------------------

    def _new_member(self, identity: str, tone_hz: float | None) -> Member:
        instance = self._next_instance.get(identity, 0) + 1
        self._next_instance[identity] = instance
        assert self.ds is not None
        member: Member
        if self.headless:
            member = HeadlessMember(identity, instance, self.ds, self.room)
        elif (identity, instance) in self._will_be_killed:
            assert self.livekit is not None
            member = ProcessMember(
                identity, instance, tone_hz, self.livekit, self.ds, self.room, self.workdir
            )
        else:
            assert self.livekit is not None
            member = LocalMember(identity, instance, tone_hz, self.livekit, self.ds, self.room)
        self.instances.append(member)
        self.current[identity] = member
        if identity not in self.order:
            self.order.append(identity)
        return member

    async def _join(self, identity: str, tone_hz: float | None) -> None:
        member = self._new_member(identity, tone_hz)
        event = EventRecord(len(self.events), "join", identity, member.requested_at, member=member)
        self.events.append(event)
        try:
            await member.start(self.step_timeout)
        except Exception as e:
            member.status = "failed"
            member.ended_at = time.monotonic()
            event.error = f"{type(e).__name__}: {e}"
            raise StepFailed(f"join {identity} failed: {event.error}") from e
        member.status = "in group"
        member.joined_at = event.done_at = time.monotonic()

    async def _remove(self, kind: str, identity: str) -> None:
        member = self.current[identity]
        now = time.monotonic()
        event = EventRecord(
            len(self.events),
            kind,
            identity,
            now,
            epoch_before=self._max_epoch(),
            member=member,
        )
        self.events.append(event)
        member.ended_at = now
        member.status = "leaving" if kind == "leave" else "killed"
        try:
            if kind == "leave":
                await member.leave()
                member.status = "left"
            else:
                await member.kill()
                if isinstance(member, HeadlessMember):
                    # what MlsE2EE does when LiveKit reports a participant gone
                    others = [m for m in self._alive() if isinstance(m, HeadlessMember)]
                    await asyncio.gather(*(m.report_disconnect(identity) for m in others))
        except Exception as e:
            event.error = f"{type(e).__name__}: {e}"
            raise StepFailed(f"{kind} {identity} failed: {event.error}") from e
        event.done_at = time.monotonic()

    def _alive(self) -> list[Member]:
        return [m for m in self.current.values() if m.alive]

    def _max_epoch(self) -> int | None:
        epochs = [m.epoch for m in self._alive() if m.epoch is not None]
        return max(epochs, default=None)

    # ---- convergence and checks ---------------------------------------------------------

    def _converged(self) -> bool:
        alive = self._alive()
        if not alive or any(m.status != "in group" for m in alive):
            return False
        roster = tuple(sorted(m.identity for m in alive))
        epochs = {m.epoch for m in alive}
        return (
            len(epochs) == 1
            and None not in epochs
            and all(m.executed_epoch == m.epoch for m in alive)
            and all(tuple(sorted(m.members)) == roster for m in alive)
            and len({m.code for m in alive}) == 1
        )

    def _divergence(self) -> str:
        return "; ".join(
            f"{m.identity}: {m.status}, epoch {m.epoch} executed {m.executed_epoch} "
            f"members {','.join(sorted(m.members))}"
            for m in self._alive()
        )

    async def _wait_converged(self, timeout: float) -> bool:
        start = time.monotonic()
        announced = False
        while not self._converged():
            if time.monotonic() - start >= timeout:
                return False
            if not announced and time.monotonic() - start > 2:
                announced = True
                killed = [e.identity for e in self.events if e.kind == "kill" and not e.resolved]
                if killed and not self.headless:
                    verb = "is" if len(killed) == 1 else "are"
                    self.observer.message(
                        f"waiting for the DS to notice that {', '.join(killed)} {verb} gone "
                        "(its presence timeout: 3 s without an event stream)"
                    )
            await asyncio.sleep(0.05)
        return True

    async def _check(self, index: int, step: Step) -> CheckResult:
        problems: list[str] = []
        converged = await self._wait_converged(step.timeout)
        self._resolve_events()  # the rotations that led here are reported first
        if not converged:
            problems.append(f"members did not converge in {step.timeout:g} s: {self._divergence()}")
        alive = self._alive()
        roster = tuple(sorted(m.identity for m in alive))
        epoch = alive[0].epoch if converged else None
        code = alive[0].code if converged else None

        keys_agree: bool | None = None
        compared_by: list[str] = []
        if converged and epoch is not None:
            key_index = alive[0].key_index or 0
            for identity in roster:
                held = {}
                for m in alive:
                    material = m.key_material(identity, epoch, key_index)
                    if material is not None:
                        held[m.identity] = material
                compared_by = sorted(held)
                if len(held) < 2 and len(alive) > 1:
                    continue
                if len(set(held.values())) != 1 or len(next(iter(held.values()))) != 32:
                    problems.append(f"members hold different keys for {identity} at epoch {epoch}")
                    keys_agree = False
                elif keys_agree is None:
                    keys_agree = True

        hears: dict[str, dict[str, bool]] = {}
        if step.hear and not self.headless and alive:
            speakers = [m for m in alive if m.tone_hz is not None]
            pairs = [(lis, spk) for lis in alive for spk in speakers if lis is not spk]
            results = await asyncio.gather(
                *(lis.hears(spk.identity, spk.tone_hz or 0.0, HEAR_TIMEOUT) for lis, spk in pairs)
            )
            for (lis, spk), ok in zip(pairs, results, strict=True):
                hears.setdefault(lis.identity, {})[spk.identity] = ok
                if not ok:
                    problems.append(f"{lis.identity} does not hear {spk.identity}")

        for m in self.instances:
            incidents = [n for t, n in m.incidents if t <= (m.ended_at or math.inf)]
            problems += [f"{m.identity}: {n}" for n in incidents[:3]]
            if len(incidents) > 3:
                problems.append(f"{m.identity}: {len(incidents) - 3} more session incidents")
        failures = self.decrypt_failures()
        if failures:
            problems.append(
                f"{failures} decrypt failures between members that should hear each other"
            )
        if step.expect_members is not None and roster != step.expect_members:
            problems.append(
                f"expected members {', '.join(step.expect_members)}, got {', '.join(roster)}"
            )
        if step.expect_epoch is not None and epoch != step.expect_epoch:
            problems.append(f"expected epoch {step.expect_epoch}, got {epoch}")
        return CheckResult(
            step=index,
            at=time.monotonic(),
            passed=not problems,
            converged=converged,
            epoch=epoch,
            members=roster,
            verification_code=code,
            keys_agree=keys_agree,
            keys_compared_by=tuple(compared_by),
            hears=hears,
            decrypt_failures=failures,
            problems=problems,
        )

    # ---- rotations and decrypt failures -------------------------------------------------

    def _resolve_events(self) -> None:
        if self._ds_log is not None:
            self._ds_log.poll()
        for event in self.events:
            if event.resolved:
                continue
            if event.kind != "join" and self._ds_log is not None and event.removal_seen_at is None:
                event.removal_seen_at = self._ds_log.removal_seen(
                    event.identity, event.requested_at
                )
            if self._resolve(event):
                self.observer.rotation(event)

    def _resolve(self, event: EventRecord) -> bool:
        member = event.member
        if member is None:
            return False
        epoch = self._produced_epoch(event, member)
        if epoch is None:
            return False
        record = self._epoch_record(epoch)
        if record is None:
            return False
        event.epoch, event.members, event.verification_code = epoch, record.members, record.code
        times = []
        for identity in record.members:
            m = self.current.get(identity)
            if m is None or not m.alive:
                continue  # gone meanwhile: nothing to wait for
            if not m.epochs:
                return False  # still joining
            if min(m.epochs) > epoch:
                continue  # a later participant with this identity: joined after the epoch
            t = m.first_executed_at(epoch)
            if t is None:
                return False
            times.append(t)
        if not times:
            return False
        event.completed_at = max(times)
        if event.kind != "join" and self._ds_log is not None:
            event.commit_accepted_at = self._ds_log.accepted.get(epoch)
        return True

    def _produced_epoch(self, event: EventRecord, member: Member) -> int | None:
        if event.kind == "join":
            return min(member.epochs, default=None)
        floor = -1 if event.epoch_before is None else event.epoch_before
        candidates = [
            r.epoch
            for m in self.instances
            if m is not member
            for r in m.epochs.values()
            if r.epoch > floor and event.identity not in r.members
        ]
        return min(candidates, default=None)

    def _epoch_record(self, epoch: int) -> EpochRecord | None:
        for m in reversed(self.instances):
            if epoch in m.epochs:
                return m.epochs[epoch]
        return None

    def _instance_at(self, identity: str, t: float) -> Member | None:
        found = None
        for m in self.instances:
            if m.identity == identity and m.requested_at <= t:
                found = m
        return found

    def counted_failures(self, listener: Member) -> list[tuple[float, str, int]]:
        """``listener``'s decrypt failures of speakers it should hear: from
        IN_FLIGHT_ALLOWANCE after both executed an epoch with each other in it, until
        either was asked to leave (or killed). Failures outside (e.g. a joiner's track
        arriving before its Welcome) are expected by design and only counted in total."""
        counted = []
        for t, speaker, state in listener.failures():
            other = self._instance_at(speaker, t)
            if other is None:
                continue
            start_l = listener.first_executed_with(speaker, other.requested_at)
            start_s = other.first_executed_with(listener.identity, listener.requested_at)
            if start_l is None or start_s is None:
                continue
            end = min(listener.ended_at or math.inf, other.ended_at or math.inf)
            if max(start_l, start_s) + IN_FLIGHT_ALLOWANCE <= t <= end:
                counted.append((t, speaker, state))
        return counted

    def decrypt_failures(self) -> int:
        return sum(len(self.counted_failures(m)) for m in self.instances)

    # ---- views ----------------------------------------------------------------------------

    def rows(self) -> list[MemberRow]:
        """The live table: one row per identity (its latest instance)."""
        alive = [m for m in self._alive() if m.status == "in group"]
        rows = []
        for identity in self.order:
            m = self.current[identity]
            speakers = [s for s in alive if s is not m and s.tone_hz is not None]
            heard = 0
            if m.status == "in group" and speakers:
                tones = m.heard_lately()
                heard = sum(
                    1
                    for s in speakers
                    if abs(tones.get(s.identity, 0.0) - (s.tone_hz or 0.0)) <= TONE_TOLERANCE_HZ
                )
            rows.append(
                MemberRow(
                    identity=identity,
                    kind=m.kind,
                    status=m.status,
                    epoch=m.epoch,
                    executed=m.executed_epoch,
                    key_index=m.key_index,
                    hears=heard,
                    hears_of=len(speakers) if m.status == "in group" and not self.headless else 0,
                    decrypt_failures=len(self.counted_failures(m)),
                    verification_code=m.code,
                )
            )
        return rows

    def elapsed(self, t: float | None = None) -> float:
        return (time.monotonic() if t is None else t) - self.t0

    # ---- teardown -----------------------------------------------------------------------

    async def _teardown(self) -> None:
        """Ends every participant, then the DS, then livekit-server; never raises."""

        async def close(member: Member) -> None:
            try:
                await asyncio.wait_for(member.close(), 10)
            except BaseException:  # teardown goes on whatever happened
                member.emergency_kill()

        # statuses stay as they were: the report shows who was in the room at the end
        await asyncio.gather(*(close(m) for m in self.instances), return_exceptions=True)
        if self.ds is not None:
            try:
                self.ds.stop()
            except BaseException:
                self.ds.kill()
        if self.livekit is not None:
            self.livekit.stop()

    def emergency_cleanup(self) -> None:
        """Synchronous: kill every process we started (atexit, a second Ctrl-C)."""
        for m in self.instances:
            with contextlib.suppress(Exception):
                m.emergency_kill()
        if self.ds is not None:
            with contextlib.suppress(Exception):
                self.ds.kill()
        if self.livekit is not None:
            with contextlib.suppress(Exception):
                self.livekit.stop(timeout=2)

    # ---- the report -----------------------------------------------------------------------

    def failures_after_events(self, counted: list[list[tuple[float, str, int]]]) -> list[int]:
        """Counted decrypt failures per event: those after it, before the next event.
        ``counted``: every instance's ``counted_failures``."""
        times = sorted(t for failures in counted for t, _, _ in failures)
        starts = [e.requested_at for e in self.events]
        counts = [0] * len(starts)
        for t in times:
            before = [i for i, start in enumerate(starts) if start <= t]
            if before:
                counts[before[-1]] += 1
        return counts

    def _report(self) -> RunReport:
        t0 = self.t0
        events = []
        counted_by_instance = [self.counted_failures(m) for m in self.instances]
        per_event = self.failures_after_events(counted_by_instance)
        for e, failures_after in zip(self.events, per_event, strict=True):
            events.append(
                {
                    "index": e.index,
                    "kind": e.kind,
                    "identity": e.identity,
                    "at": relative(e.requested_at, t0),
                    "done_at": relative(e.done_at, t0),
                    "epoch": e.epoch,
                    "members": list(e.members),
                    "verification_code": e.verification_code,
                    "rotation_latency_ms": milliseconds(e.latency),
                    "exposure_ms": milliseconds(e.exposure),
                    "detection_ms": milliseconds(e.detection),
                    "commit_accepted_at": relative(e.commit_accepted_at, t0),
                    "completed_at": relative(e.completed_at, t0),
                    "decrypt_failures_after": failures_after,
                    "error": e.error,
                }
            )
        participants = []
        for m, counted in zip(self.instances, counted_by_instance, strict=True):
            participants.append(
                {
                    "identity": m.identity,
                    "instance": m.instance,
                    "kind": m.kind,
                    "pid": m.pid if m.kind == "livekit-process" else None,
                    "tone_hz": m.tone_hz,
                    "status": m.status,
                    "requested_at": relative(m.requested_at, t0),
                    "joined_at": relative(m.joined_at, t0),
                    "ended_at": relative(m.ended_at, t0),
                    "final_epoch": m.epoch,
                    "executed_epoch": m.executed_epoch,
                    "decrypt_failures": len(counted),
                    "failure_events_total": len(m.failures()),
                    "failures": [
                        {"at": relative(t, t0), "speaker": s, "state": FAILURE_STATES[st]}
                        for t, s, st in counted
                    ],
                    "epochs": [
                        {
                            "epoch": r.epoch,
                            "key_index": r.key_index,
                            "members": list(r.members),
                            "verification_code": r.code,
                            "prepared_at": relative(r.prepared_at, t0),
                            "executed_at": relative(r.executed_at, t0),
                        }
                        for r in sorted(m.epochs.values(), key=lambda r: r.epoch)
                    ],
                    "notes": [{"at": relative(t, t0), "note": n} for t, n in m.notes],
                    "incidents": len(m.incidents),
                }
            )
        processes: list[dict[str, Any]] = [
            {"role": role, "pid": pid} for role, pid in self._stack_pids.items()
        ]
        for m in self.instances:
            if m.kind == "livekit-process":
                processes.append({"role": "participant", "identity": m.identity, "pid": m.pid})
        failures = sum(len(c) for c in counted_by_instance)
        checks = [c.to_dict(t0) for c in self.checks]
        passed = (
            not self.interrupted
            and self.error is None
            and bool(self.checks)
            and all(c.passed for c in self.checks)
            and failures == 0
        )
        return RunReport(
            scenario=self.scenario,
            passed=passed,
            interrupted=self.interrupted,
            error=self.error,
            started_at=self.started_at,
            duration=round(time.monotonic() - t0, 3),
            room=self.room,
            workdir=str(self.workdir),
            processes=processes,
            events=events,
            participants=participants,
            checks=checks,
            decrypt_failures=failures,
            summary=summarize(self.events, in_flight_allowance=IN_FLIGHT_ALLOWANCE),
        )


def run_scenario(
    scenario: Scenario,
    *,
    observer: Observer | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> RunReport:
    """Runs ``scenario`` in a fresh event loop. SIGINT/SIGTERM stop it cleanly (the stack
    is torn down, then :class:`Interrupted` is raised with the report); a second signal
    kills every process at once."""
    runner = ScenarioRunner(scenario, observer=observer, workdir=workdir)

    async def main() -> RunReport:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if runner.interrupt_signal is None:
                runner.interrupt(signum)
            else:  # impatient: no more graceful teardown
                runner.emergency_cleanup()
                os._exit(128 + signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await runner.run()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    report = asyncio.run(main())
    if report.interrupted:
        raise Interrupted(runner.interrupt_signal or signal.SIGINT, report)
    return report
