"""The scenario runner on real stacks: a LiveKit room with a leave and a kill, and a
headless room of 20 members. Reports must show the epochs and rosters the events produced,
timed rotations, and no decrypt failure; nothing the runner started may survive it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from mls_provider.testing.harness_cli import LiveView
from mls_provider.testing.report import plot_report, write_report
from mls_provider.testing.runner import ScenarioRunner
from mls_provider.testing.scenario import parse_scenario

from .helpers import processes_mentioning, survivors


@pytest.mark.livekit
@pytest.mark.timeout(150)
async def test_livekit_room_with_a_leave_and_a_kill(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            "name": "leave-kill",
            "steps": [
                {"join": "alice", "tone": 440},
                {"join": "bob", "tone": 660},
                {"join": "carol", "tone": 880},
                {"join": "dave", "tone": 1100},
                {"wait": 0.5},
                {"leave": "carol"},
                {"kill": "dave"},
                {"check": {"expect_members": ["alice", "bob"], "expect_epoch": 5}},
            ],
        }
    )
    workdir = tmp_path / "run"
    report = await ScenarioRunner(scenario, workdir=workdir).run()
    data = report.to_dict()
    assert report.passed, data["checks"]
    assert report.error is None and not report.interrupted

    events = {(e["kind"], e["identity"]): e for e in data["events"]}
    expected = {
        ("join", "alice"): (0, ["alice"]),
        ("join", "bob"): (1, ["alice", "bob"]),
        ("join", "carol"): (2, ["alice", "bob", "carol"]),
        ("join", "dave"): (3, ["alice", "bob", "carol", "dave"]),
        ("leave", "carol"): (4, ["alice", "bob", "dave"]),
        ("kill", "dave"): (5, ["alice", "bob"]),
    }
    assert {k: (e["epoch"], sorted(e["members"])) for k, e in events.items()} == expected
    for event in data["events"]:
        assert event["rotation_latency_ms"] > 0, event
        assert event["verification_code"] and len(event["verification_code"].split()) == 6
    for key in (("leave", "carol"), ("kill", "dave")):
        removal = events[key]
        # the window starts when the DS accepted the commit, within the rotation
        assert 0 <= removal["exposure_ms"] <= removal["rotation_latency_ms"], removal
        assert removal["detection_ms"] is not None
    # the DS's presence, not a goodbye, noticed dave: once his stream had been gone for the
    # presence timeout (3 s), long before LiveKit's ping timeout and webhook (~20 s)
    assert 0.95 * 3_000 <= events[("kill", "dave")]["detection_ms"] < 15_000

    check = data["checks"][-1]
    assert check["epoch"] == 5 and check["members"] == ["alice", "bob"]
    assert check["keys_agree"] is True and check["keys_compared_by"] == ["alice", "bob"]
    assert check["hears"] == {"alice": {"bob": True}, "bob": {"alice": True}}
    assert data["decrypt_failures"] == 0
    assert all(p["decrypt_failures"] == 0 for p in data["participants"])

    people = {p["identity"]: p for p in data["participants"]}
    assert people["dave"]["kind"] == "livekit-process" and people["dave"]["status"] == "killed"
    assert people["carol"]["status"] == "left" and people["alice"]["status"] == "in group"
    assert [e["epoch"] for e in people["alice"]["epochs"]] == [0, 1, 2, 3, 4, 5]
    assert all(e["executed_at"] is not None for e in people["alice"]["epochs"])

    # the report and the plot are written; nothing the run started survives it
    written = json.loads(write_report(report, tmp_path / "r.json").read_text())
    assert written == json.loads(json.dumps(data))  # the whole report, JSON-normalized
    assert plot_report(report, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    roles = {p["role"] for p in data["processes"]}
    assert roles == {"livekit-server", "delivery-service", "participant"}
    assert survivors(data) == []
    assert processes_mentioning(str(workdir)) == []


@pytest.mark.timeout(90)
async def test_headless_room_of_twenty(tmp_path: Path) -> None:
    names = [f"m{i:02d}" for i in range(20)]
    scenario = parse_scenario(
        {
            "mode": "headless",
            "steps": [
                {"join": names[:10]},
                {"join": names[10:]},
                {"wait": "converged", "timeout": 30},
                {"leave": "m03"},
                {"wait": "converged", "timeout": 30},
                {"kill": "m07"},
                {"wait": "converged", "timeout": 30},
                {"join": "late"},
                {"check": {"timeout": 30}},
            ],
        }
    )
    out = io.StringIO()
    view = LiveView(Console(file=out, width=120, force_terminal=True, color_system=None))
    report = await ScenarioRunner(scenario, observer=view, workdir=tmp_path / "run").run()
    data = report.to_dict()
    assert report.passed, data["checks"]

    final = sorted([*names, "late"])
    final.remove("m03")
    final.remove("m07")
    check = data["checks"][-1]
    assert check["members"] == final and check["keys_agree"] is True
    assert len(check["keys_compared_by"]) == 19
    assert check["hears"] == {}  # no media in headless mode

    by_kind = {(e["kind"], e["identity"]): e for e in data["events"]}
    leave, kill, late = (
        by_kind[("leave", "m03")],
        by_kind[("kill", "m07")],
        by_kind[("join", "late")],
    )
    assert "m03" not in leave["members"] and len(leave["members"]) == 19
    assert "m07" not in kill["members"] and len(kill["members"]) == 18
    assert late["epoch"] == check["epoch"] and late["epoch"] > kill["epoch"] > leave["epoch"]
    for removal in (leave, kill):
        assert 0 <= removal["exposure_ms"] <= removal["rotation_latency_ms"]
    assert data["summary"]["unresolved_events"] == []
    assert [p["role"] for p in data["processes"]] == ["delivery-service"]
    assert survivors(data) == []

    # the live view showed each rotation and a table of the members
    text = out.getvalue()
    assert "<- join m00" in text
    assert f"epoch {kill['epoch']} <- kill m07" in text
    assert "verification code" in text and "late" in text
