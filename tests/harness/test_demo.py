"""``python -m mls_provider.demo`` in its fast mode: it must end by itself, say that
everyone heard everyone, and leave no livekit-server, DS or participant process behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .helpers import PYTHON, ROOT, cli_env, processes_mentioning, survivors


@pytest.mark.livekit
@pytest.mark.timeout(150)
def test_demo_runs_to_a_happy_end(tmp_path: Path) -> None:
    workdir, report_path = tmp_path / "work", tmp_path / "demo.json"
    env = cli_env() | {"LIVEKIT_MLS_DEMO_FAST": "1"}
    args = ["--workdir", str(workdir), "--report", str(report_path)]
    result = subprocess.run(
        [PYTHON, "-m", "mls_provider.demo", *args],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=ROOT,
        env=env,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # the story as it unfolded: joins, a leave, a kill, a re-join, each with its rotation
    for line in (
        "join alice (440 Hz)",
        "epoch 3 <- join dave: alice, bob, carol, dave",
        "epoch 4 <- leave carol: alice, bob, dave",
        "kill dave (SIGKILL, no goodbye)",
        "epoch 5 <- kill dave: alice, bob",
        "epoch 6 <- join dave: alice, bob, dave",
    ):
        assert line in out, line
    assert "check: PASS: epoch 3, 4 members" in out
    # the summary
    assert "everyone heard everyone: alice, bob, dave (6/6 pairs)" in out
    assert "all 3 agree on epoch 6, the same keys and verification code" in out
    assert "0 decrypt failures" in out
    assert out.rstrip().splitlines()[-2] == "demo passed"
    # nothing survives the demo
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert {p["role"] for p in report["processes"]} == {
        "livekit-server",
        "delivery-service",
        "participant",
    }
    assert survivors(report) == []
    assert processes_mentioning(str(workdir)) == []
