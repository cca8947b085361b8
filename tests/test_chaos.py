"""Chaos: one room of headless members joining, leaving and vanishing while the delivery
service (SQLite: its process; Redis: three processes and redis-server) is SIGKILLed and
restarted every few seconds; then the room must go quiet with one epoch, identical keys
equal to the exporter, a roster equal to the live members, every acknowledged commit
logged exactly once, and no failure (see mls_provider/testing/chaos.py).

Seeded: ``LKMLS_CHAOS_SEED`` (default 1) replays a schedule; ``LKMLS_CHAOS_SECONDS``
(default 60) sets its length. ``make soak`` loops it; ``benchmarks/bench_chaos.py`` runs
ten seeds per mode and reports the time to converge after the last disturbance.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mls_provider.testing.chaos import ChaosPlan, run_chaos

SEED = int(os.environ.get("LKMLS_CHAOS_SEED", "1"))
SECONDS = float(os.environ.get("LKMLS_CHAOS_SECONDS", "60"))

pytestmark = pytest.mark.timeout(SECONDS + 240)


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(ChaosPlan("sqlite", SEED, SECONDS), id="sqlite"),
        pytest.param(
            ChaosPlan("redis", SEED, SECONDS, ds_processes=3), id="redis", marks=pytest.mark.redis
        ),
    ],
)
async def test_the_room_goes_quiet_after_a_bad_day(plan: ChaosPlan, tmp_path: Path) -> None:
    report = await run_chaos(plan, tmp_path)
    print(report.summary())
    assert report.faults, "the run must have faults"
    assert report.churn["vanish"] and report.churn["leave"] and report.churn["join"]
    assert report.passed, report.summary()
    assert report.acknowledged > 0 and report.logged >= report.acknowledged
