"""Scenarios: the model, the YAML scenario file format, and scenarios built from rates.

A :class:`Scenario` is a list of :class:`Step` s — joins, leaves, kills, waits and checks —
that :class:`~mls_provider.testing.runner.ScenarioRunner` runs in order on its own stack
(what it measures is described there). This module only describes and validates
scenarios: it needs neither LiveKit nor the delivery service.

Modes:

* ``livekit`` (default): real ``rtc.Room`` participants with livekit-mls keys, each
  publishing a sine tone and decoding everyone else's; the check includes who hears whom.
  A participant that a later step kills runs in its own process (SIGKILL: no goodbye, as
  in a crash); the others run in the runner's process.
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
        timeout: 40          #   code (the DS removes a killed participant after 3 s)
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

import math
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ACTIONS",
    "DEFAULT_CHECK_TIMEOUT",
    "MIN_TONE_GAP_HZ",
    "MODES",
    "TONE_PALETTE",
    "Action",
    "Mode",
    "Scenario",
    "ScenarioError",
    "Step",
    "free_tone",
    "load_scenario",
    "parse_scenario",
    "random_scenario",
]

Mode = Literal["livekit", "headless"]
Action = Literal["join", "leave", "kill", "wait", "check"]
ACTIONS: tuple[Action, ...] = ("join", "leave", "kill", "wait", "check")
MODES: tuple[Mode, ...] = ("livekit", "headless")

# Tones 60 Hz apart: ``hears_tone`` accepts a peak within ±20 Hz, so neighbours never
# pass for each other. 45 tones: enough for any room a 2-core machine can decode.
TONE_PALETTE: tuple[float, ...] = tuple(float(hz) for hz in range(330, 3000, 60))
MIN_TONE_GAP_HZ = 45.0
DEFAULT_CHECK_TIMEOUT = 45.0
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
