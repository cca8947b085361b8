"""Scenarios: participants join, leave and get killed on a real stack; every rotation is timed.

A scenario is a list of steps run in order against its own livekit-server and delivery
service (DS, embedded SQLite store), both started in a temp dir and always torn down.
:class:`ScenarioRunner` records, per event, the epoch it produced, the rotation latency
(request -> every remaining member executed that epoch), the exposure window of removals
(the DS accepted the removing commit -> every remaining sender switched keys), decrypt
failures between members that should hear each other, and every member's epochs. The
result is a :class:`RunReport` (JSON with :func:`write_report`, PNG with :func:`plot_report`).

Modes:

* ``livekit`` (default): real ``rtc.Room`` participants with livekit-mls keys, each
  publishing a sine tone and decoding everyone else's; the check includes who hears whom.
  A participant that a later step kills runs in its own process (SIGKILL: no goodbye, as
  in a crash); the others run in this process.
* ``headless``: ``MlsSession`` + ``HeadlessKeySink`` members on the DS only (no LiveKit,
  no media), for large rooms. A kill stops a member without a word; the remaining ones
  then report its disconnect, as ``MlsE2EE`` does when LiveKit says a participant left.

Scenario file (YAML; ``scenarios/leave-and-kill.yaml`` is a complete example)::

    name: leave-and-kill     # optional (default: the file name)
    mode: livekit            # livekit | headless (optional, default livekit)
    room: my-room            # optional LiveKit room name
    steps:                   # run in order; each step is a mapping with one action key
      - join: alice          # returns once alice is in the group (executed her first epoch)
        tone: 440            # Hz, 20..20000; omitted: a free tone; false: silent (headless
                             #   mode: no tones, no media)
      - join: [bob, carol]   # several identities join concurrently (tones automatic)
      - wait: 2              # seconds
      - leave: carol         # graceful: leaves the MLS group, then the LiveKit room
      - kill: bob            # SIGKILL of bob's process (a name or a list, like leave)
      - wait: converged      # until every member executed the same epoch, same roster and
        timeout: 40          #   code (LiveKit notices a killed participant after ~20 s)
      - check:               # members converge, agree on keys and code, hear each other
          expect_members: [alice]  # optional: the roster the room must end with
          expect_epoch: 4          # optional: the epoch it must end in
          hear: true               # optional: the hears matrix (livekit mode), default true
          timeout: 45              # optional: seconds to converge, default 45

Joins, leaves and kills return as soon as the action is done; the rotation each one causes
is timed in the background. A scenario that does not end with a ``check`` gets one. An
identity may join again after it left or was killed (a new participant, same identity).

:func:`random_scenario` builds a scenario from rates instead (``livekit-mls-harness
--participants N --duration S --join-rate ...``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import yaml

from mls_provider.session import EpochInfo, MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.transport import DeliveryClient, DeliveryServiceError

if TYPE_CHECKING:
    # the LiveKit SDK and the test plugin load lazily: the scenario model and the CLI's
    # --help and usage errors do not need them
    from mls_provider.testing.livekit_server import LiveKitServer

__all__ = [
    "CheckResult",
    "EventRecord",
    "Interrupted",
    "MemberRow",
    "Observer",
    "RunReport",
    "Scenario",
    "ScenarioError",
    "ScenarioRunner",
    "Step",
    "load_scenario",
    "parse_scenario",
    "plot_report",
    "random_scenario",
    "run_scenario",
    "write_report",
]

Mode = Literal["livekit", "headless"]
Action = Literal["join", "leave", "kill", "wait", "check"]
ACTIONS: tuple[Action, ...] = ("join", "leave", "kill", "wait", "check")
MODES: tuple[Mode, ...] = ("livekit", "headless")

# Tones 60 Hz apart: ``hears_tone`` accepts a peak within ±20 Hz, so neighbours never
# pass for each other. 45 tones: enough for any room a 2-core machine can decode.
TONE_PALETTE: tuple[float, ...] = tuple(float(hz) for hz in range(330, 3000, 60))
MIN_TONE_GAP_HZ = 45.0
TONE_TOLERANCE_HZ = 20.0
DEFAULT_CHECK_TIMEOUT = 45.0
DEFAULT_STEP_TIMEOUT = 30.0
HEAR_TIMEOUT = 10.0
# Decrypt failures in the first second after two members start sharing an epoch are not
# counted: frames a speaker sent under its previous key (a joiner never gets that key) may
# still be in flight, and the SDK's events reach Python with some delay.
IN_FLIGHT_ALLOWANCE = 1.0
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# rtc.EncryptionState values of failures (MISSING_KEY, DECRYPTION_FAILED); plain ints
# because the SDK reports the enum's value
FAILURE_STATES = {3: "DECRYPTION_FAILED", 4: "MISSING_KEY"}
SESSION_EVENTS = (
    "joined",
    "epoch_changed",
    "transition_executed",
    "removed",
    "rejoining",
    "error",
)
HEARD_REFRESH = 1.0  # seconds between the live table's "hears" analyses (FFTs) per member


# ---- the scenario model -------------------------------------------------------------


class ScenarioError(ValueError):
    """An invalid scenario: ``str(error)`` says where (file, step, field) and what."""


@dataclass(frozen=True)
class Step:
    """One step. ``identities`` for join/leave/kill (several act concurrently); ``tones``
    one per joining identity (None: silent); ``seconds`` or ``converged`` for wait."""

    action: Action
    identities: tuple[str, ...] = ()
    tones: tuple[float | None, ...] = ()
    seconds: float = 0.0
    converged: bool = False
    timeout: float = DEFAULT_CHECK_TIMEOUT
    hear: bool = True
    expect_members: tuple[str, ...] | None = None
    expect_epoch: int | None = None

    def describe(self, *, tones: bool = True) -> str:
        names = ", ".join(self.identities)
        if self.action == "join":
            if not tones:
                return f"join {names}"
            hz = [f"{t:g} Hz" for t in self.tones if t is not None]
            return f"join {names}" + (f" ({', '.join(hz)})" if hz else "")
        if self.action in ("leave", "kill"):
            return f"{self.action} {names}"
        if self.action == "wait":
            return "wait until converged" if self.converged else f"wait {self.seconds:g} s"
        return "check"

    def to_dict(self) -> dict[str, Any]:
        """The step in the scenario file format (a report's scenario can be run again)."""
        if self.action == "join":
            if len(self.identities) == 1:
                tone = self.tones[0] if self.tones else None
                return {"join": self.identities[0], "tone": False if tone is None else tone}
            return {"join": list(self.identities)}  # tones: automatic, the same again
        if self.action in ("leave", "kill"):
            return {self.action: list(self.identities)}
        if self.action == "wait":
            if self.converged:
                return {"wait": "converged", "timeout": self.timeout}
            return {"wait": self.seconds}
        options: dict[str, Any] = {"timeout": self.timeout}
        if not self.hear:
            options["hear"] = False
        if self.expect_members is not None:
            options["expect_members"] = list(self.expect_members)
        if self.expect_epoch is not None:
            options["expect_epoch"] = self.expect_epoch
        return {"check": options}


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    mode: Mode = "livekit"
    room: str = ""
    source: str = ""  # the file it came from, or how it was built

    def with_mode(self, mode: Mode) -> Scenario:
        return Scenario(self.name, self.steps, mode, self.room, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "room": self.room,
            "source": self.source,
            "steps": [s.to_dict() for s in self.steps],
        }


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Reads and validates a YAML scenario file (raises :class:`ScenarioError`)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ScenarioError(f"{source}: cannot read the file: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        where = ""
        if e.problem_mark is not None:
            where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
        raise ScenarioError(f"{source}: not valid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{source}: not valid YAML: {e}") from None
    return parse_scenario(data, source=source, default_name=Path(path).stem)


def parse_scenario(data: object, *, source: str = "<scenario>", default_name: str = "") -> Scenario:
    """Validates a scenario given as plain data (the YAML document's content)."""
    return _Parser(source).scenario(data, default_name)


class _Parser:
    """Validation with messages that name the file, the step and the field."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.headless = False  # no media: tones are not needed, nor checked

    def fail(self, where: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {where}: {message}")

    def scenario(self, data: object, default_name: str) -> Scenario:
        if not isinstance(data, dict):
            kind = "empty" if data is None else f"a {type(data).__name__}"
            raise ScenarioError(
                f"{self.source}: the document must be a mapping with a 'steps' list, "
                f"but it is {kind}"
            )
        unknown = sorted(set(map(str, data)) - {"name", "mode", "room", "steps"})
        if unknown:
            raise self.fail(unknown[0], "unknown field (allowed: name, mode, room, steps)")
        name = data.get("name", default_name or "scenario")
        if not isinstance(name, str) or not name.strip():
            raise self.fail("name", f"must be a non-empty string, got {name!r}")
        mode = data.get("mode", "livekit")
        if mode not in MODES:
            raise self.fail("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        room = data.get("room", "")
        if not isinstance(room, str) or (room and not _IDENTITY.match(room)):
            raise self.fail("room", f"must be a room name like 'my-room', got {room!r}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise self.fail("steps", "must be a non-empty list of steps")
        self.headless = mode == "headless"
        steps = self.steps(raw_steps)
        return Scenario(name.strip(), steps, mode, room, self.source)

    def steps(self, raw_steps: list[object]) -> tuple[Step, ...]:
        present: dict[str, float | None] = {}  # who is in the room at this point: tone
        steps: list[Step] = []
        for i, raw in enumerate(raw_steps):
            where = f"steps[{i}]"
            if not isinstance(raw, dict):
                raise self.fail(where, f"must be a mapping like {{join: alice}}, got {raw!r}")
            actions = [k for k in raw if k in ACTIONS]
            if len(actions) != 1:
                found = f"found {', '.join(map(str, actions))}" if actions else "found none"
                raise self.fail(
                    where, f"needs exactly one action of {', '.join(ACTIONS)} ({found})"
                )
            action: Action = actions[0]
            step = getattr(self, f"_{action}")(raw, f"{where}.{action}", where, present)
            steps.append(step)
        return tuple(steps)

    def _keys(self, raw: dict[str, object], where: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for key in raw:
            if key not in allowed:
                raise self.fail(
                    f"{where}.{key}",
                    f"unknown field for this step (allowed: {', '.join(sorted(allowed))})",
                )

    def _names(self, value: object, where: str) -> tuple[str, ...]:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise self.fail(where, f"must be an identity or a list of them, got {value!r}")
        for name in names:
            if not isinstance(name, str) or not _IDENTITY.match(name):
                raise self.fail(
                    where,
                    f"{name!r} is not a valid identity (letters, digits, '_', '.', '-'; "
                    "at most 64 characters)",
                )
        if len(set(names)) != len(names):
            raise self.fail(where, "lists an identity twice")
        return tuple(names)

    def _number(self, value: object, where: str, *, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(where, f"must be a number, got {value!r}")
        if not low <= value <= high:
            raise self.fail(where, f"must be between {low:g} and {high:g}, got {value!r}")
        return float(value)

    def _join(
        self, raw: dict[str, object], where: str, step: str, present: dict[str, float | None]
    ) -> Step:
        self._keys(raw, step, ("join", "tone"))
        names = self._names(raw["join"], where)
        for name in names:
            if name in present:
                raise self.fail(where, f"{name} is already in the room at this point")
        tones: list[float | None] = []
        if "tone" in raw:
            if len(names) != 1:
                raise self.fail(f"{step}.tone", "only for a single identity (lists get tones)")
            tone = raw["tone"]
            if tone is False:
                tones.append(None)
            else:
                hz = self._number(tone, f"{step}.tone", low=20, high=20_000)
                for other, other_hz in present.items():
                    if self.headless:
                        break
                    if other_hz is not None and abs(other_hz - hz) < MIN_TONE_GAP_HZ:
                        raise self.fail(
                            f"{step}.tone",
                            f"{hz:g} Hz is within {MIN_TONE_GAP_HZ:g} Hz of {other}'s "
                            f"{other_hz:g} Hz: who hears whom would be ambiguous",
                        )
                tones.append(hz)
            present[names[0]] = tones[0]
        else:
            for name in names:
                try:
                    auto = None if self.headless else free_tone(present.values())
                except ScenarioError as e:
                    raise self.fail(where, str(e)) from None
                tones.append(auto)
                present[name] = auto
        return Step("join", names, tuple(tones))

    def _leave(
        self, raw: dict[str, object], where: str, step: str, present: dict[str, float | None]
    ) -> Step:
        return self._remove("leave", raw, where, step, present)

    def _kill(
        self, raw: dict[str, object], where: str, step: str, present: dict[str, float | None]
    ) -> Step:
        return self._remove("kill", raw, where, step, present)

    def _remove(
        self,
        action: Action,
        raw: dict[str, object],
        where: str,
        step: str,
        present: dict[str, float | None],
    ) -> Step:
        self._keys(raw, step, (action,))
        names = self._names(raw[action], where)
        for name in names:
            if name not in present:
                raise self.fail(where, f"{name} is not in the room at this point")
            del present[name]
        return Step(action, names)

    def _wait(
        self, raw: dict[str, object], where: str, step: str, present: dict[str, float | None]
    ) -> Step:
        value = raw["wait"]
        if value == "converged":
            self._keys(raw, step, ("wait", "timeout"))
            timeout = DEFAULT_CHECK_TIMEOUT
            if "timeout" in raw:
                timeout = self._number(raw["timeout"], f"{step}.timeout", low=0.1, high=3600)
            return Step("wait", converged=True, timeout=timeout)
        self._keys(raw, step, ("wait",))
        if isinstance(value, str):
            raise self.fail(where, f"must be seconds or 'converged', got {value!r}")
        return Step("wait", seconds=self._number(value, where, low=0, high=3600))

    def _check(
        self, raw: dict[str, object], where: str, step: str, present: dict[str, float | None]
    ) -> Step:
        self._keys(raw, step, ("check",))
        options = raw["check"]
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise self.fail(where, f"must be empty or a mapping of options, got {options!r}")
        self._keys(options, where, ("hear", "timeout", "expect_members", "expect_epoch"))
        if not present:
            raise self.fail(where, "nobody is in the room at this point")
        hear = options.get("hear", True)
        if not isinstance(hear, bool):
            raise self.fail(f"{where}.hear", f"must be true or false, got {hear!r}")
        timeout = DEFAULT_CHECK_TIMEOUT
        if "timeout" in options:
            timeout = self._number(options["timeout"], f"{where}.timeout", low=0.1, high=3600)
        members = None
        if "expect_members" in options:
            members = tuple(
                sorted(self._names(options["expect_members"], f"{where}.expect_members"))
            )
        epoch = options.get("expect_epoch")
        if epoch is not None and (
            isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0
        ):
            raise self.fail(f"{where}.expect_epoch", f"must be an epoch number >= 0, got {epoch!r}")
        return Step("check", timeout=timeout, hear=hear, expect_members=members, expect_epoch=epoch)


def free_tone(taken: Iterable[float | None]) -> float:
    """The first palette tone at least MIN_TONE_GAP_HZ away from every ``taken`` tone."""
    used = [t for t in taken if t is not None]
    for hz in TONE_PALETTE:
        if all(abs(hz - t) >= MIN_TONE_GAP_HZ for t in used):
            return hz
    raise ScenarioError(
        f"more than {len(TONE_PALETTE)} participants with tones at once: use headless mode"
    )


def random_scenario(
    *,
    participants: int = 4,
    duration: float = 30.0,
    join_rate: float = 0.0,
    leave_rate: float = 0.0,
    kill_rate: float = 0.0,
    seed: int = 0,
    mode: Mode = "livekit",
    min_members: int = 2,
) -> Scenario:
    """``participants`` join one by one (in waves of 10 in headless mode), then for
    ``duration`` seconds joins, leaves and kills happen at random (exponential gaps; rates
    per minute, nominal: an action's own time adds to the gaps), then a check. Leaves and
    kills never shrink the room below ``min_members``. Same seed, same scenario."""
    if participants < 1:
        raise ScenarioError("--participants must be at least 1")
    if duration < 0 or min(join_rate, leave_rate, kill_rate) < 0:
        raise ScenarioError("--duration and the rates must not be negative")
    rng = random.Random(seed)
    present: dict[str, float | None] = {}
    steps: list[Step] = []
    names = [f"p{i}" for i in range(1, participants + 1)]
    wave = 10 if mode == "headless" else 1
    for start in range(0, len(names), wave):
        batch = tuple(names[start : start + wave])
        tones = []
        for name in batch:
            present[name] = None if mode == "headless" else free_tone(present.values())
            tones.append(present[name])
        steps.append(Step("join", batch, tuple(tones)))
    next_id = participants + 1
    total = join_rate + leave_rate + kill_rate
    elapsed = 0.0
    while total > 0:
        gap = rng.expovariate(total / 60.0)
        if elapsed + gap > duration:
            break
        elapsed += gap
        steps.append(Step("wait", seconds=round(gap, 2)))
        kinds: tuple[Action, ...] = ("join", "leave", "kill")
        kind = rng.choices(kinds, (join_rate, leave_rate, kill_rate))[0]
        if kind == "join":
            name = f"p{next_id}"
            next_id += 1
            present[name] = None if mode == "headless" else free_tone(present.values())
            steps.append(Step("join", (name,), (present[name],)))
        elif len(present) > min_members:
            victim = rng.choice(sorted(present))
            del present[victim]
            steps.append(Step(kind, (victim,)))
    if duration - elapsed > 0:
        steps.append(Step("wait", seconds=round(duration - elapsed, 2)))
    steps.append(Step("check"))
    source = (
        f"random: participants={participants} duration={duration:g} join_rate={join_rate:g} "
        f"leave_rate={leave_rate:g} kill_rate={kill_rate:g} seed={seed}"
    )
    return Scenario(f"random-{seed}", tuple(steps), mode, "", source)


# ---- members: the participants the runner drives ------------------------------------


@dataclass
class EpochRecord:
    """One epoch as one member saw it."""

    epoch: int
    key_index: int
    members: tuple[str, ...]
    code: str
    prepared_at: float
    executed_at: float | None = None


class Member:
    """One participant instance (an identity that joins again is a new instance)."""

    kind = "member"

    def __init__(self, identity: str, instance: int, tone_hz: float | None) -> None:
        self.identity = identity
        self.instance = instance
        self.tone_hz = tone_hz
        self.status = "joining"
        self.requested_at = time.monotonic()
        self.joined_at: float | None = None
        self.ended_at: float | None = None  # when its leave/kill was requested
        self.epochs: dict[int, EpochRecord] = {}
        self.epoch: int | None = None
        self.executed_epoch = -1
        self.key_index: int | None = None
        self.members: tuple[str, ...] = ()
        self.code: str | None = None
        self.notes: list[tuple[float, str]] = []
        self.incidents: list[tuple[float, str]] = []  # session errors and re-joins
        self.pid: int | None = None
        self._heard_cache: tuple[float, dict[str, float]] | None = None

    @property
    def alive(self) -> bool:
        return self.status in ("joining", "in group", "rejoining")

    def observe(
        self,
        name: str,
        t: float,
        epoch: int,
        key_index: int,
        members: Sequence[str],
        code: str,
        executed: int,
    ) -> None:
        """Records a session event (``joined``/``epoch_changed``/``transition_executed``)."""
        record = self.epochs.get(epoch)
        if record is None or (name != "transition_executed" and record.members != tuple(members)):
            record = EpochRecord(epoch, key_index, tuple(members), code, t)
            self.epochs[epoch] = record
        if executed >= epoch and record.executed_at is None:
            record.executed_at = t
        self.epoch, self.executed_epoch = epoch, executed
        self.key_index, self.members, self.code = key_index, tuple(members), code
        if self.status == "rejoining" and executed >= 0:
            self.status = "in group"

    def lost_group(self, t: float, name: str, reason: str) -> None:
        """Records ``removed``/``rejoining`` (the group is gone) or ``error`` (noted)."""
        self.notes.append((t, f"{name}: {reason}"))
        if name in ("error", "rejoining"):
            # no scenario step asks for either: a check reports them as problems
            self.incidents.append((t, f"{name}: {reason}"))
        if name == "error":
            return
        if self.alive and self.status != "joining":
            self.status = "rejoining"
        self.epoch, self.executed_epoch, self.members = None, -1, ()

    def first_executed_at(self, epoch: int) -> float | None:
        """When this member first sent with ``epoch`` or a later one."""
        times = [r.executed_at for r in self.epochs.values() if r.epoch >= epoch]
        return min((t for t in times if t is not None), default=None)

    def first_executed_with(self, identity: str, after: float) -> float | None:
        """When this member first executed an epoch that has ``identity`` in it (epochs
        prepared after ``after``: an earlier instance of that identity does not count)."""
        times = [
            r.executed_at
            for r in self.epochs.values()
            if identity in r.members and r.prepared_at >= after
        ]
        return min((t for t in times if t is not None), default=None)

    # what each kind of member implements

    async def start(self, timeout: float) -> None:
        raise NotImplementedError

    async def leave(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def emergency_kill(self) -> None:
        """Synchronous last resort (atexit, second Ctrl-C): end any process of ours."""

    def failures(self) -> list[tuple[float, str, int]]:
        """(time, speaker, state) of every decrypt failure this member's SDK reported."""
        return []

    def heard(self) -> dict[str, float]:
        """Speaker -> frequency of the tone this member decodes right now."""
        return {}

    def heard_lately(self) -> dict[str, float]:
        """:meth:`heard`, analysed at most every HEARD_REFRESH seconds (live views)."""
        now = time.monotonic()
        cached = self._heard_cache
        if cached is None or now - cached[0] >= HEARD_REFRESH:
            cached = (now, self.heard())
            self._heard_cache = cached
        return cached[1]

    async def hears(self, speaker: str, tone_hz: float, timeout: float) -> bool:
        return False

    def key_material(self, identity: str, epoch: int, key_index: int) -> bytes | None:
        """The key this member holds for ``identity`` at ``epoch``, or None if it cannot
        be read from here (a member in another process). Compared, never shown."""
        return None


class LocalMember(Member):
    """A real LiveKit participant in this process."""

    kind = "livekit"

    def __init__(
        self,
        identity: str,
        instance: int,
        tone_hz: float | None,
        livekit: LiveKitServer,
        ds: DeliveryServiceProcess,
        room: str,
    ) -> None:
        from mls_provider.testing.participant import Participant

        super().__init__(identity, instance, tone_hz)
        self.participant = Participant(
            identity,
            livekit_url=livekit.url,
            token=livekit.token(identity, room),
            ds_target=ds.target,
            ds_public_key=ds.public_key,
            tone_hz=tone_hz,
        )
        assert self.participant.e2ee is not None
        for name in SESSION_EVENTS:
            self.participant.e2ee.on(name, partial(self._session_event, name))
        self.pid = os.getpid()

    def _session_event(self, name: str, arg: object) -> None:
        t = time.monotonic()
        if isinstance(arg, EpochInfo):
            executed = self.participant.executed_epoch
            self.observe(
                name, t, arg.epoch, arg.key_index, arg.members, arg.verification_code, executed
            )
        else:
            self.lost_group(t, name, str(arg))

    async def start(self, timeout: float) -> None:
        await asyncio.wait_for(self.participant.join(timeout), timeout)

    async def leave(self) -> None:
        await asyncio.wait_for(self.participant.leave(), 20)

    async def kill(self) -> None:
        raise RuntimeError(f"{self.identity} runs in this process and cannot be killed")

    async def close(self) -> None:
        await self.participant.close()

    def failures(self) -> list[tuple[float, str, int]]:
        return [
            (e.at, e.identity, int(e.state))
            for e in self.participant.state_events
            if int(e.state) in FAILURE_STATES
        ]

    def heard(self) -> dict[str, float]:
        return self.participant.current_tones()

    async def hears(self, speaker: str, tone_hz: float, timeout: float) -> bool:
        from mls_provider.testing.audio import wait_for_tone

        deadline = time.monotonic() + timeout
        try:
            recorder = await self.participant.recorder(speaker, timeout)
        except TimeoutError:
            return False
        return await wait_for_tone(recorder, tone_hz, max(deadline - time.monotonic(), 0.5))

    def key_material(self, identity: str, epoch: int, key_index: int) -> bytes | None:
        return self.participant.installed_key(identity, epoch)


def _pdeathsig() -> list[str]:
    """``setpriv --pdeathsig KILL`` (Linux): the child dies with us, even if we are killed."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class ProcessMember(Member):
    """A real LiveKit participant in its own process (``python -m
    mls_provider.testing.participant --events``), so that it can be SIGKILLed."""

    kind = "livekit-process"

    def __init__(
        self,
        identity: str,
        instance: int,
        tone_hz: float | None,
        livekit: LiveKitServer,
        ds: DeliveryServiceProcess,
        room: str,
        log_dir: Path,
    ) -> None:
        super().__init__(identity, instance, tone_hz)
        self.args = [
            *_pdeathsig(),
            sys.executable, "-m", "mls_provider.testing.participant",
            "--identity", identity,
            "--livekit-url", livekit.url,
            "--token", livekit.token(identity, room),
            "--ds", ds.target,
            "--ds-public-key", ds.public_key.hex(),
            "--events",
        ]  # fmt: skip
        if tone_hz is not None:
            self.args += ["--tone", str(tone_hz)]
        self.log_path = log_dir / f"participant-{identity}-{instance}.log"
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._failures: list[tuple[float, str, int]] = []
        self._heard: dict[str, float] = {}
        self._heard_at = 0.0

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> subprocess.Popen[str]:
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self.args,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                # a Ctrl-C in the terminal is ours to handle: the runner ends it
                start_new_session=True,
            )
        self._reader = threading.Thread(
            target=self._read, args=(loop, proc), name=f"reader-{self.identity}", daemon=True
        )
        self._reader.start()
        return proc

    async def start(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.proc = self._spawn(loop)
        self.pid = self.proc.pid
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.identity}'s process did not join in {timeout:g} s (log: {self.log_path})"
            ) from None

    def _read(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                loop.call_soon_threadsafe(self._on_line, line.rstrip("\n"))
            except RuntimeError:  # the loop is closed: nobody listens any more
                return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit)

    def _on_exit(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                RuntimeError(f"{self.identity}'s process exited (log: {self.log_path})")
            )
        if self.status in ("joining", "in group", "rejoining"):
            self.status = "exited"
            self.ended_at = self.ended_at or time.monotonic()

    def _on_line(self, line: str) -> None:
        if line.startswith("READY"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if not line.startswith("EVENT "):
            return
        try:
            event = json.loads(line[6:])
            name, t = str(event["event"]), float(event["t"])
            if name in ("joined", "epoch_changed", "transition_executed"):
                self.observe(
                    name,
                    t,
                    int(event["epoch"]),
                    int(event["key_index"]),
                    [str(m) for m in event["members"]],
                    str(event["code"]),
                    int(event["executed"]),
                )
            elif name in ("removed", "rejoining"):
                self.lost_group(t, name, str(event.get("reason", "")))
            elif name == "e2ee_state" and int(event["state"]) in FAILURE_STATES:
                self._failures.append((t, str(event["identity"]), int(event["state"])))
            elif name == "status":
                self._heard = {str(k): float(v) for k, v in event["heard"].items()}
                self._heard_at = t
        except (ValueError, KeyError, TypeError, AttributeError):
            self.notes.append((time.monotonic(), f"unreadable line: {line[:80]}"))

    async def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)

    async def leave(self) -> None:
        # SIGINT: the participant's main leaves the group and the room on the way out
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                await self.kill()

    async def close(self) -> None:
        if self.proc is None:
            return
        await self.kill()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def emergency_kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def failures(self) -> list[tuple[float, str, int]]:
        return list(self._failures)

    def heard(self) -> dict[str, float]:
        return dict(self._heard) if time.monotonic() - self._heard_at < 1.0 else {}

    async def hears(self, speaker: str, tone_hz: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abs(self.heard().get(speaker, 0.0) - tone_hz) <= TONE_TOLERANCE_HZ:
                return True
            await asyncio.sleep(0.1)
        return False


class HeadlessMember(Member):
    """An ``MlsSession`` with a ``HeadlessKeySink``: the real client session, keys
    recorded instead of installed in LiveKit. No media."""

    kind = "headless"

    def __init__(
        self, identity: str, instance: int, ds: DeliveryServiceProcess, token: str
    ) -> None:
        super().__init__(identity, instance, None)
        self.client = DeliveryClient(ds.target, token)
        self.sink = HeadlessKeySink()
        self.session = MlsSession(
            self.client, identity, self.sink, SessionConfig(ds_public_key=ds.public_key)
        )
        for name in SESSION_EVENTS:
            self.session.on(name, partial(self._session_event, name))
        self.pid = os.getpid()
        self._closed = False

    def _session_event(self, name: str, arg: object) -> None:
        t = time.monotonic()
        if isinstance(arg, EpochInfo):
            executed = self.session.executed_epoch
            self.observe(
                name, t, arg.epoch, arg.key_index, arg.members, arg.verification_code, executed
            )
        else:
            self.lost_group(t, name, str(arg))

    async def start(self, timeout: float) -> None:
        await asyncio.wait_for(self.session.start(), timeout)
        await self.session.wait_until(lambda s: s.executed_epoch >= 0, timeout)

    async def _stop(self, leave: bool) -> None:
        if self._closed:
            return
        self._closed = True
        await self.session.stop(leave=leave)
        await self.client.close()

    async def leave(self) -> None:
        await self._stop(leave=True)

    async def kill(self) -> None:
        await self._stop(leave=False)

    async def close(self) -> None:
        await self._stop(leave=False)

    def key_material(self, identity: str, epoch: int, key_index: int) -> bytes | None:
        return self.sink.key(identity, key_index)

    async def report_disconnect(self, identity: str) -> None:
        with contextlib.suppress(DeliveryServiceError):
            await self.client.report_disconnect(identity)


# ---- what the runner records ----------------------------------------------------------


@dataclass
class EventRecord:
    """One join/leave/kill and the rotation it caused (times: monotonic seconds)."""

    index: int
    kind: str
    identity: str
    requested_at: float
    done_at: float | None = None
    epoch_before: int | None = None
    epoch: int | None = None
    members: tuple[str, ...] = ()
    verification_code: str | None = None
    completed_at: float | None = None  # every remaining member executed ``epoch``
    commit_accepted_at: float | None = None
    removal_seen_at: float | None = None  # the DS learned of the leave/kill
    error: str | None = None
    member: Member | None = field(default=None, repr=False)

    @property
    def resolved(self) -> bool:
        return self.completed_at is not None or self.error is not None

    @property
    def latency(self) -> float | None:
        """Rotation latency: request -> every remaining member executed the epoch."""
        return None if self.completed_at is None else self.completed_at - self.requested_at

    @property
    def exposure(self) -> float | None:
        """Removals: the DS accepted the commit -> every remaining sender switched."""
        if self.kind == "join" or self.completed_at is None or self.commit_accepted_at is None:
            return None
        return max(self.completed_at - self.commit_accepted_at, 0.0)

    @property
    def detection(self) -> float | None:
        """Removals: request -> the DS learned of it (a webhook, for a kill)."""
        if self.removal_seen_at is None:
            return None
        return max(self.removal_seen_at - self.requested_at, 0.0)


@dataclass
class CheckResult:
    step: int
    at: float
    passed: bool
    converged: bool
    epoch: int | None
    members: tuple[str, ...]
    verification_code: str | None
    keys_agree: bool | None  # None: no key could be compared
    keys_compared_by: tuple[str, ...]
    hears: dict[str, dict[str, bool]]  # listener -> speaker -> heard
    decrypt_failures: int
    problems: list[str]

    @property
    def hears_count(self) -> tuple[int, int]:
        pairs = [ok for row in self.hears.values() for ok in row.values()]
        return sum(pairs), len(pairs)

    def to_dict(self, t0: float) -> dict[str, Any]:
        heard, pairs = self.hears_count
        return {
            "step": self.step,
            "at": _rel(self.at, t0),
            "passed": self.passed,
            "converged": self.converged,
            "epoch": self.epoch,
            "members": list(self.members),
            "verification_code": self.verification_code,
            "keys_agree": self.keys_agree,
            "keys_compared_by": list(self.keys_compared_by),
            "hears": self.hears,
            "hears_pairs": {"heard": heard, "total": pairs},
            "everyone_hears_everyone": heard == pairs if pairs else None,
            "decrypt_failures": self.decrypt_failures,
            "problems": self.problems,
        }


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


@dataclass
class RunReport:
    scenario: Scenario
    passed: bool
    interrupted: bool
    error: str | None
    started_at: str
    duration: float
    room: str
    workdir: str
    processes: list[dict[str, Any]]
    events: list[dict[str, Any]]
    participants: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    decrypt_failures: int
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scenario"] = self.scenario.to_dict()
        return data


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
    pass


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class _DsLog:
    """Follows the DS's JSON log: when commits were accepted, when removals arrived."""

    _COMMIT = re.compile(r"^commit accepted room=(\S+) by=\S+ epoch=(\d+)")
    _REMOVAL = re.compile(
        r"^(?:webhook \S+ room=(\S+) identity=(\S+) removed=True"
        r"|disconnect reported room=(\S+) identity=(\S+)"
        r"|leave room=(\S+) identity=(\S+))"
    )

    def __init__(self, path: Path, room: str) -> None:
        self.path = path
        self.room = room
        self.offset = 0
        self.accepted: dict[int, float] = {}
        self.removals: list[tuple[float, str]] = []
        # the DS logs wall-clock time; everything else here is monotonic
        self.wall_offset = time.time() - time.monotonic()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a partly written last line waits for the next poll
        self.offset += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
                message, ts = str(record["msg"]), str(record["ts"])
            except (ValueError, KeyError, TypeError):
                continue
            if "accepted" not in message and "room=" not in message:
                continue
            wall = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            t = wall.timestamp() - self.wall_offset
            if m := self._COMMIT.match(message):
                if m.group(1) == self.room:
                    self.accepted.setdefault(int(m.group(2)), t)
            elif m := self._REMOVAL.match(message):
                groups = [g for g in m.groups() if g is not None]
                if groups[0] == self.room:
                    self.removals.append((t, groups[1]))

    def removal_seen(self, identity: str, after: float) -> float | None:
        # the log has millisecond resolution: allow for rounding down
        return min(
            (t for t, who in self.removals if who == identity and t >= after - 0.002), default=None
        )


# ---- the runner -------------------------------------------------------------------------


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
        self._ds_log: _DsLog | None = None
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
                "harness-key", self._headless_secret, workdir=self.workdir / "ds"
            )
            self.ds.start()
        else:
            from mls_provider.testing.plugin import start_stack

            stack = start_stack(str(self.workdir))
            self.livekit, self.ds = stack.livekit, stack.ds
            self._stack_pids["livekit-server"] = self.livekit.pid
        # stop() forgets the pids: the report lists them, to check nothing survived
        self._stack_pids["delivery-service"] = self.ds.pid
        self._ds_log = _DsLog(self.ds.log_path, self.room)

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
            member = HeadlessMember(identity, instance, self.ds, self._token(identity))
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

    def _token(self, identity: str) -> str:
        from livekit import api

        grants = api.VideoGrants(room_join=True, room=self.room)
        return (
            api.AccessToken("harness-key", self._headless_secret)
            .with_identity(identity)
            .with_grants(grants)
            .to_jwt()
        )

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
                        f"waiting for LiveKit to notice that {', '.join(killed)} {verb} gone "
                        "(it gives a silent participant ~20 s)"
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

    def failures_after_events(self) -> list[int]:
        """Counted decrypt failures per event: those after it, before the next event."""
        times = sorted(t for m in self.instances for t, _, _ in self.counted_failures(m))
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
        per_event = self.failures_after_events()
        for e, failures_after in zip(self.events, per_event, strict=True):
            events.append(
                {
                    "index": e.index,
                    "kind": e.kind,
                    "identity": e.identity,
                    "at": _rel(e.requested_at, t0),
                    "done_at": _rel(e.done_at, t0),
                    "epoch": e.epoch,
                    "members": list(e.members),
                    "verification_code": e.verification_code,
                    "rotation_latency_ms": _ms(e.latency),
                    "exposure_ms": _ms(e.exposure),
                    "detection_ms": _ms(e.detection),
                    "commit_accepted_at": _rel(e.commit_accepted_at, t0),
                    "completed_at": _rel(e.completed_at, t0),
                    "decrypt_failures_after": failures_after,
                    "error": e.error,
                }
            )
        participants = []
        for m in self.instances:
            counted = self.counted_failures(m)
            participants.append(
                {
                    "identity": m.identity,
                    "instance": m.instance,
                    "kind": m.kind,
                    "pid": m.pid if m.kind == "livekit-process" else None,
                    "tone_hz": m.tone_hz,
                    "status": m.status,
                    "requested_at": _rel(m.requested_at, t0),
                    "joined_at": _rel(m.joined_at, t0),
                    "ended_at": _rel(m.ended_at, t0),
                    "final_epoch": m.epoch,
                    "executed_epoch": m.executed_epoch,
                    "decrypt_failures": len(counted),
                    "failure_events_total": len(m.failures()),
                    "failures": [
                        {"at": _rel(t, t0), "speaker": s, "state": FAILURE_STATES[st]}
                        for t, s, st in counted
                    ],
                    "epochs": [
                        {
                            "epoch": r.epoch,
                            "key_index": r.key_index,
                            "members": list(r.members),
                            "verification_code": r.code,
                            "prepared_at": _rel(r.prepared_at, t0),
                            "executed_at": _rel(r.executed_at, t0),
                        }
                        for r in sorted(m.epochs.values(), key=lambda r: r.epoch)
                    ],
                    "notes": [{"at": _rel(t, t0), "note": n} for t, n in m.notes],
                    "incidents": len(m.incidents),
                }
            )
        processes: list[dict[str, Any]] = [
            {"role": role, "pid": pid} for role, pid in self._stack_pids.items()
        ]
        for m in self.instances:
            if m.kind == "livekit-process":
                processes.append({"role": "participant", "identity": m.identity, "pid": m.pid})
        failures = self.decrypt_failures()
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
            summary=_summary(self.events),
        )


def _summary(events: Sequence[EventRecord]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"count": 0, "p50_ms": None, "max_ms": None}
        ordered = sorted(values)
        return {
            "count": len(values),
            "p50_ms": _ms(ordered[len(ordered) // 2]),
            "max_ms": _ms(ordered[-1]),
        }

    return {
        "rotations": len({e.epoch for e in events if e.epoch is not None}),
        "rotation_latency": stats([e.latency for e in events if e.latency is not None]),
        "exposure": stats([e.exposure for e in events if e.exposure is not None]),
        "unresolved_events": [f"{e.kind} {e.identity}" for e in events if not e.resolved],
        # decrypt failures are counted from this long after two members share an epoch
        "in_flight_allowance_s": IN_FLIGHT_ALLOWANCE,
    }


# ---- running from a command line ----------------------------------------------------------


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


def write_report(report: RunReport, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return out


def default_report_path(scenario: Scenario) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", scenario.name)
    return Path("reports") / f"harness-{safe}-{stamp}.json"


def plot_report(report: RunReport | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG timeline: each participant's executed epoch over time (top) and each event's
    rotation, request -> every remaining member executed, with the exposure window of
    removals (commit accepted -> all switched) in black (bottom). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.to_dict() if isinstance(report, RunReport) else dict(report)
    end = float(data["duration"])
    events = data["events"]
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(11, 4 + 0.22 * max(len(events), 8)),
        sharex=True,
        gridspec_kw={"height_ratios": [3, max(len(events), 4) / 4]},
    )
    colours = {"join": "tab:green", "leave": "tab:orange", "kill": "tab:red"}
    people = data["participants"]
    for i, p in enumerate(people):
        points = sorted((e["executed_at"], e["epoch"]) for e in p["epochs"] if e["executed_at"])
        if not points:
            continue
        # members in the same epoch would hide each other: a small offset per participant
        offset = (i - len(people) / 2) * min(0.3 / max(len(people), 1), 0.06)
        xs = [x for x, _ in points]
        ys = [y + offset for _, y in points]
        stop = p["ended_at"] if p["ended_at"] is not None else end
        xs.append(max(stop, xs[-1]))
        ys.append(ys[-1])
        label = p["identity"] + (f" #{p['instance']}" if p["instance"] > 1 else "")
        top.step(xs, ys, where="post", label=label if len(people) <= 12 else None, lw=1.6)
    for e in events:
        top.axvline(e["at"], color=colours.get(e["kind"], "grey"), linestyle=":", linewidth=1)
    top.set_ylabel("executed epoch")
    top.set_title(f"{data['scenario']['name']}: epoch per participant")
    if len(people) <= 12:
        top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    labels = []
    for row, e in enumerate(events):
        y = len(events) - 1 - row
        start, done = e["at"], e["completed_at"]
        latency = e["rotation_latency_ms"]
        text = f"{e['kind']} {e['identity']}"
        if e["epoch"] is not None:
            text += f" -> epoch {e['epoch']}"
        if latency is not None:
            text += f" ({latency / 1000:.2f} s)" if latency >= 1000 else f" ({latency:.0f} ms)"
        labels.append((y, text))
        if done is None:
            bottom.plot([start], [y], marker="o", color=colours.get(e["kind"], "grey"))
            continue
        bottom.barh(
            y,
            max(done - start, end / 500),
            left=start,
            height=0.6,
            color=colours.get(e["kind"], "grey"),
        )
        if e["exposure_ms"] is not None and e["commit_accepted_at"] is not None:
            bottom.barh(
                y,
                max(e["exposure_ms"] / 1000, end / 500),
                left=e["commit_accepted_at"],
                height=0.6,
                color="black",
            )
    bottom.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=7)
    bottom.set_xlabel("seconds since start (black: exposure window of a removal)")
    bottom.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
