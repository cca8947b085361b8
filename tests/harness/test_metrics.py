"""What the runner computes from what members observed, on synthetic timelines: the epoch
an event produced, rotation latency, exposure window, and which decrypt failures count."""

from __future__ import annotations

from pathlib import Path

from mls_provider.testing.ds_log import DsLog
from mls_provider.testing.members import Member
from mls_provider.testing.report import EventRecord
from mls_provider.testing.runner import IN_FLIGHT_ALLOWANCE, ScenarioRunner
from mls_provider.testing.scenario import Step, parse_scenario


class FakeMember(Member):
    kind = "fake"

    def __init__(self, identity: str, requested_at: float) -> None:
        super().__init__(identity, 1, None)
        self.requested_at = requested_at
        self.status = "in group"
        self.reported: list[tuple[float, str, int]] = []

    def failures(self) -> list[tuple[float, str, int]]:
        return list(self.reported)

    def run_epoch(self, epoch: int, members: str, prepared: float, executed: float | None) -> None:
        names = members.split()
        self.observe("epoch_changed", prepared, epoch, epoch, names, f"c{epoch}", -1)
        if executed is not None:
            self.observe("transition_executed", executed, epoch, epoch, names, f"c{epoch}", epoch)


def runner_with(*members: FakeMember) -> ScenarioRunner:
    runner = ScenarioRunner(parse_scenario({"steps": [{"join": "a"}]}))
    for m in members:
        runner.instances.append(m)
        runner.current[m.identity] = m
        runner.order.append(m.identity)
    runner._ds_log = DsLog(Path("/nonexistent/ds.log"), runner.room)
    return runner


def test_join_latency_waits_for_every_member_of_the_new_epoch() -> None:
    a, b = FakeMember("a", 0.0), FakeMember("b", 2.0)
    a.run_epoch(0, "a", 1.0, 1.1)
    a.run_epoch(1, "a b", 2.3, None)  # prepared, not yet sending with it
    b.run_epoch(1, "a b", 2.4, 2.4)  # a joiner executes at once
    runner = runner_with(a, b)
    join = EventRecord(0, "join", "b", 2.0, member=b)
    runner.events.append(join)
    runner._resolve_events()
    assert join.epoch == 1 and join.completed_at is None  # a has not switched yet
    a.run_epoch(1, "a b", 2.3, 2.5)
    runner._resolve_events()
    assert join.members == ("a", "b") and join.verification_code == "c1"
    assert join.latency is not None and abs(join.latency - 0.5) < 1e-9
    assert join.exposure is None  # a join exposes nothing


def test_removal_latency_and_exposure_window() -> None:
    a, b, c = FakeMember("a", 0.0), FakeMember("b", 0.0), FakeMember("c", 0.0)
    for m in (a, b, c):
        m.run_epoch(2, "a b c", 1.0, 1.1)
    runner = runner_with(a, b, c)
    leave = EventRecord(0, "leave", "c", 3.0, epoch_before=2, member=c)
    runner.events.append(leave)
    c.status, c.ended_at = "left", 3.0
    assert runner._ds_log is not None
    runner._ds_log.accepted[3] = 3.1  # the DS accepted the removing commit
    a.run_epoch(3, "a b", 3.2, 3.4)
    b.run_epoch(3, "a b", 3.25, None)
    runner._resolve_events()
    assert leave.epoch == 3 and leave.completed_at is None
    b.run_epoch(3, "a b", 3.25, 3.6)
    runner._resolve_events()
    assert leave.members == ("a", "b")
    assert leave.latency is not None and abs(leave.latency - 0.6) < 1e-9
    assert leave.exposure is not None and abs(leave.exposure - 0.5) < 1e-9


def test_a_member_gone_meanwhile_is_not_waited_for() -> None:
    a, b, c = FakeMember("a", 0.0), FakeMember("b", 0.0), FakeMember("c", 0.0)
    for m in (a, b, c):
        m.run_epoch(0, "a b c", 1.0, 1.1)
    runner = runner_with(a, b, c)
    kill = EventRecord(0, "kill", "c", 2.0, epoch_before=0, member=c)
    c.status, c.ended_at = "killed", 2.0
    runner.events.append(kill)
    a.run_epoch(1, "a b", 5.0, 5.1)
    b.run_epoch(1, "a b", 5.0, None)
    runner._resolve_events()
    assert kill.completed_at is None
    b.status = "left"  # b left before it switched: only a counts
    runner._resolve_events()
    assert kill.epoch == 1 and kill.completed_at == 5.1


def test_which_decrypt_failures_count() -> None:
    a, b = FakeMember("a", 0.0), FakeMember("b", 2.0)
    a.run_epoch(0, "a", 1.0, 1.0)
    a.run_epoch(1, "a b", 2.2, 2.3)
    b.run_epoch(1, "a b", 2.25, 2.25)
    start = 2.3  # both sending with an epoch that has the other in it
    b.ended_at = 9.0  # b is asked to leave
    a.reported = [
        (2.1, "b", 4),  # before b was in the group: a joiner's track, not a failure
        (start + IN_FLIGHT_ALLOWANCE / 2, "b", 4),  # frames still in flight: allowed
        (start + IN_FLIGHT_ALLOWANCE + 0.5, "b", 3),  # counts
        (8.0, "b", 4),  # counts
        (9.5, "b", 3),  # after b's leave request
    ]
    b.reported = [(5.0, "a", 3)]  # counts, for b
    runner = runner_with(a, b)
    runner.events.append(EventRecord(0, "join", "b", 2.0, member=b))
    runner.events.append(EventRecord(1, "leave", "b", 9.0, member=b))
    assert [t for t, _, _ in runner.counted_failures(a)] == [start + IN_FLIGHT_ALLOWANCE + 0.5, 8.0]
    assert runner.decrypt_failures() == 3
    counted = [runner.counted_failures(m) for m in runner.instances]
    assert runner.failures_after_events(counted) == [3, 0]
    row = {r.identity: r for r in runner.rows()}
    assert row["a"].decrypt_failures == 2 and row["b"].decrypt_failures == 1


async def test_a_check_reports_session_errors_and_rejoins() -> None:
    a, b = FakeMember("a", 0.0), FakeMember("b", 0.0)
    for m in (a, b):
        m.run_epoch(1, "a b", 1.0, 1.1)
    runner = runner_with(a, b)
    check = Step("check", timeout=1, hear=False)
    assert (await runner._check(0, check)).problems == []
    a.lost_group(2.0, "error", "INTERNAL: internal error")
    b.lost_group(2.1, "rejoining", "cannot process commit at seq 9")
    b.run_epoch(2, "a b", 2.2, 2.3)  # b is back: in group again
    a.run_epoch(2, "a b", 2.2, 2.3)
    assert b.status == "in group"
    result = await runner._check(1, check)
    assert result.converged and not result.passed
    assert result.problems == [
        "a: error: INTERNAL: internal error",
        "b: rejoining: cannot process commit at seq 9",
    ]
