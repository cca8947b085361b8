"""The scenario model: the YAML loader (every kind of mistake gets a precise message) and
the scenario built from rates."""

from __future__ import annotations

from pathlib import Path

import pytest

from mls_provider.testing.runner import ScenarioRunner
from mls_provider.testing.scenario import (
    TONE_PALETTE,
    ScenarioError,
    Step,
    load_scenario,
    parse_scenario,
    random_scenario,
)

from .helpers import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_the_example_file_loads() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "leave-and-kill.yaml")
    assert scenario.name == "leave-and-kill"
    assert scenario.mode == "livekit"
    actions = [(s.action, s.identities) for s in scenario.steps]
    assert actions[:4] == [("join", (n,)) for n in ("alice", "bob", "carol", "dave")]
    assert ("leave", ("carol",)) in actions and ("kill", ("dave",)) in actions
    assert scenario.steps[-1].expect_members == ("alice", "bob", "dave")
    assert scenario.steps[-1].expect_epoch == 6
    # carol's tone was left out: she gets a free one, away from everyone else's
    tones = [s.tones[0] for s in scenario.steps[:4]]
    assert tones[0] == 440 and tones[1] == 660 and tones[3] == 1100
    assert tones[2] in TONE_PALETTE and all(abs(tones[2] - t) >= 45 for t in (440, 660, 1100))


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_file_is_valid(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.steps and scenario.name == path.stem


def test_headless_scenarios_need_no_tones() -> None:
    names = [f"m{i}" for i in range(60)]  # more than the tone palette has
    headless = parse_scenario({"mode": "headless", "steps": [{"join": names}]})
    assert headless.steps[0].tones == (None,) * 60
    with pytest.raises(ScenarioError, match=r"steps\[0\]\.join: more than 45 participants"):
        parse_scenario({"steps": [{"join": names}]})
    tones = parse_scenario({"steps": [{"join": ["a", "b", "c"]}]}).steps[0].tones
    assert len(set(tones)) == 3 and None not in tones  # livekit: a tone each, apart
    big = random_scenario(participants=60, duration=0, mode="headless")
    assert all(t is None for s in big.steps for t in s.tones)


def test_a_complete_file_with_every_kind_of_step(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
mode: headless
room: my-room
steps:
  - join: [a, b, c]
  - join: d
    tone: false
  - wait: 1.5
  - leave: [a, b]
  - kill: c
  - wait: converged
    timeout: 12
  - join: a
  - check:
      expect_members: [d, a]
      expect_epoch: 3
      hear: false
      timeout: 7
""",
    )
    scenario = load_scenario(path)
    assert scenario.name == "scenario"  # the file name
    assert scenario.mode == "headless" and scenario.room == "my-room"
    join, silent, wait, leave, kill, converge, rejoin, check = scenario.steps
    assert join == Step("join", ("a", "b", "c"), join.tones)
    assert join.tones == (None, None, None)  # headless: no media, no tones
    assert silent.tones == (None,)
    assert wait == Step("wait", seconds=1.5)
    assert leave.identities == ("a", "b") and kill.identities == ("c",)
    assert converge.converged and converge.timeout == 12
    assert rejoin.identities == ("a",)
    assert check == Step("check", timeout=7, hear=False, expect_members=("a", "d"), expect_epoch=3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [join: a\n", "not valid YAML at line 2, column 1"),
        ("", "the document must be a mapping with a 'steps' list, but it is empty"),
        ("- join: a\n", "the document must be a mapping with a 'steps' list, but it is a list"),
        (
            "steps: [{join: a}]\nspeed: 3\n",
            "speed: unknown field (allowed: name, mode, room, steps)",
        ),
        ("mode: fast\nsteps: [{join: a}]\n", "mode: must be one of livekit, headless, got 'fast'"),
        ("name: 3\nsteps: [{join: a}]\n", "name: must be a non-empty string, got 3"),
        ("room: a b\nsteps: [{join: a}]\n", "room: must be a room name"),
        ("steps: []\n", "steps: must be a non-empty list of steps"),
        ("steps: [join]\n", "steps[0]: must be a mapping like {join: alice}, got 'join'"),
        (
            "steps: [{sing: a}]\n",
            "steps[0]: needs exactly one action of join, leave, kill, wait, check (found none)",
        ),
        (
            "steps: [{join: a, leave: a}]\n",
            "steps[0]: needs exactly one action of join, leave, "
            "kill, wait, check (found join, leave)",
        ),
        (
            "steps: [{join: a, volume: 3}]\n",
            "steps[0].volume: unknown field for this step (allowed: join, tone)",
        ),
        ("steps: [{join: 'a b'}]\n", "steps[0].join: 'a b' is not a valid identity"),
        ("steps: [{join: []}]\n", "steps[0].join: must be an identity or a list of them"),
        ("steps: [{join: [a, a]}]\n", "steps[0].join: lists an identity twice"),
        ("steps: [{join: a}, {join: a}]\n", "steps[1].join: a is already in the room"),
        ("steps: [{join: a}, {leave: b}]\n", "steps[1].leave: b is not in the room at this point"),
        ("steps: [{join: a}, {kill: a}, {kill: a}]\n", "steps[2].kill: a is not in the room"),
        ("steps: [{join: a, tone: high}]\n", "steps[0].tone: must be a number, got 'high'"),
        ("steps: [{join: a, tone: 5}]\n", "steps[0].tone: must be between 20 and 20000, got 5"),
        ("steps: [{join: [a, b], tone: 440}]\n", "steps[0].tone: only for a single identity"),
        (
            "steps: [{join: a, tone: 440}, {join: b, tone: 450}]\n",
            "steps[1].tone: 450 Hz is within 45 Hz of a's 440 Hz",
        ),
        ("steps: [{join: a}, {wait: -1}]\n", "steps[1].wait: must be between 0 and 3600, got -1"),
        (
            "steps: [{join: a}, {wait: soon}]\n",
            "steps[1].wait: must be seconds or 'converged', got 'soon'",
        ),
        ("steps: [{join: a}, {wait: 1, timeout: 3}]\n", "steps[1].timeout: unknown field"),
        ("steps: [{check: }]\n", "steps[0].check: nobody is in the room at this point"),
        ("steps: [{join: a}, {check: [1]}]\n", "steps[1].check: must be empty or a mapping"),
        (
            "steps: [{join: a}, {check: {hear: maybe}}]\n",
            "steps[1].check.hear: must be true or false, got 'maybe'",
        ),
        (
            "steps: [{join: a}, {check: {expect_epoch: -2}}]\n",
            "steps[1].check.expect_epoch: must be an epoch number >= 0, got -2",
        ),
        ("steps: [{join: a}, {check: {expect: 2}}]\n", "steps[1].check.expect: unknown field"),
    ],
)
def test_an_invalid_file_says_where_and_what(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"nope\.yaml: cannot read the file"):
        load_scenario(tmp_path / "nope.yaml")


def test_parse_scenario_names_its_source() -> None:
    with pytest.raises(ScenarioError, match=r"^<flags>: steps: must be a non-empty list"):
        parse_scenario({"steps": None}, source="<flags>")


def test_random_scenarios_are_reproducible_and_keep_the_room_populated() -> None:
    kwargs = dict(participants=3, duration=120.0, join_rate=10, leave_rate=10, kill_rate=10)
    one = random_scenario(seed=5, **kwargs)  # type: ignore[arg-type]
    assert one == random_scenario(seed=5, **kwargs)  # type: ignore[arg-type]
    assert one != random_scenario(seed=6, **kwargs)  # type: ignore[arg-type]
    assert [s.identities for s in one.steps[:3]] == [("p1",), ("p2",), ("p3",)]
    assert one.steps[-1].action == "check"
    present: set[str] = set()
    kinds = set()
    waited = 0.0
    for step in one.steps:
        kinds.add(step.action)
        if step.action == "join":
            assert not present & set(step.identities)
            present |= set(step.identities)
        elif step.action in ("leave", "kill"):
            present -= set(step.identities)
            assert len(present) >= 2
        elif step.action == "wait":
            waited += step.seconds
    assert kinds == {"join", "leave", "kill", "wait", "check"}
    assert waited == pytest.approx(120.0, abs=0.1)
    # the report's form of the scenario is a scenario file: the same scenario again
    again = parse_scenario({"steps": [s.to_dict() for s in one.steps]})
    assert again.steps == one.steps


def test_random_headless_scenarios_join_in_waves() -> None:
    scenario = random_scenario(participants=25, duration=0, mode="headless")
    joins = [s.identities for s in scenario.steps if s.action == "join"]
    assert [len(j) for j in joins] == [10, 10, 5]
    assert scenario.steps[-1].action == "check" and scenario.mode == "headless"
    again = parse_scenario({"mode": "headless", "steps": [s.to_dict() for s in scenario.steps]})
    assert again.steps == scenario.steps


def test_only_participants_that_will_be_killed_get_their_own_process() -> None:
    scenario = parse_scenario(
        {
            "steps": [
                {"join": "a"},
                {"join": "b"},
                {"kill": "b"},
                {"join": "b"},
                {"leave": "a"},
                {"join": "a"},
                {"kill": "a"},
            ]
        }
    )
    runner = ScenarioRunner(scenario)
    assert runner._plan_kills() == {("b", 1), ("a", 2)}


def test_rates_must_make_sense() -> None:
    with pytest.raises(ScenarioError, match="at least 1"):
        random_scenario(participants=0)
    with pytest.raises(ScenarioError, match="must not be negative"):
        random_scenario(join_rate=-1)
