"""The times the runner reads from the delivery service's log (``ds_log.DsLog``): when the
DS accepted a removing commit (where the exposure window starts) and when it learned of a
removal. They come from the wording of the DS's log lines; if that changes, these tests
fail instead of the reports' exposure and detection figures silently turning null."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mls_provider.testing.ds_log import DsLog
from mls_provider.testing.runner import ScenarioRunner
from mls_provider.testing.scenario import parse_scenario

DS_LOG_CHANGED = (
    "no {what} for {event}: did the delivery service's log lines change? "
    "mls_provider/testing/ds_log.py parses them"
)


@pytest.mark.timeout(60)
async def test_a_leave_and_a_kill_report_their_exposure_window(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            "mode": "headless",
            "steps": [
                {"join": ["a", "b", "c", "d"]},
                {"wait": "converged", "timeout": 20},
                {"leave": "c"},
                {"wait": "converged", "timeout": 20},
                {"kill": "d"},
                {"check": {"expect_members": ["a", "b"], "timeout": 20}},
            ],
        }
    )
    report = await ScenarioRunner(scenario, workdir=tmp_path / "run").run()
    data = report.to_dict()
    assert report.passed, data["checks"]

    removals = [e for e in data["events"] if e["kind"] != "join"]
    assert [(e["kind"], e["identity"]) for e in removals] == [("leave", "c"), ("kill", "d")]
    for e in removals:
        event = f"{e['kind']} {e['identity']}"
        assert e["commit_accepted_at"] is not None, DS_LOG_CHANGED.format(
            what="'commit accepted' time", event=event
        )
        assert e["exposure_ms"] is not None, DS_LOG_CHANGED.format(
            what="exposure window", event=event
        )
        assert e["detection_ms"] is not None, DS_LOG_CHANGED.format(
            what="time the DS learned of it", event=event
        )
        # the window starts when the DS accepted the commit, within the rotation
        assert 0 <= e["exposure_ms"] <= e["rotation_latency_ms"], e
    assert data["summary"]["exposure"]["count"] == 2


def test_only_this_rooms_lines_count_and_a_partial_line_waits(tmp_path: Path) -> None:
    log = tmp_path / "ds.log"
    reader = DsLog(log, "r1")

    def line(msg: str, ts: str = "2030-01-01T00:00:00.250Z") -> str:
        return json.dumps({"ts": ts, "level": "INFO", "msg": msg}) + "\n"

    log.write_text(
        line("commit accepted room=r1 by=a epoch=3 seq=7")
        + line("commit accepted room=r2 by=a epoch=4 seq=1")
        + line("leave room=r1 identity=c")
        + line("disconnect reported room=r2 identity=x by=a")
        + line("webhook participant_left room=r1 identity=d removed=True")
        + line("webhook participant_left room=r1 identity=e removed=False")
        + line("disconnect reported room=r1 identity=f by=a")[:30]  # still being written
    )
    reader.poll()
    assert set(reader.accepted) == {3}
    assert [who for _, who in reader.removals] == ["c", "d"]
    with log.open("a") as f:
        f.write(line("disconnect reported room=r1 identity=f by=a")[30:])
    reader.poll()
    assert [who for _, who in reader.removals] == ["c", "d", "f"]
    t = reader.accepted[3]
    assert reader.removal_seen("c", after=t) == t  # same millisecond: seen
    assert reader.removal_seen("c", after=t + 1) is None
