"""``livekit-mls-harness``: help, exit codes, plain output when piped, reports, plots,
and a clean teardown on SIGTERM / Ctrl-C."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import PYTHON, ROOT, cli_env, processes_mentioning, survivors

CLI = [PYTHON, "-m", "mls_provider.testing.harness_cli"]


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=cli_env()
    )


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# one epoch per event (the DS may fold a leave and a kill issued together into one commit)
HEADLESS = """\
name: small
mode: headless
steps:
  - join: a
  - join: b
  - join: c
  - leave: b
  - wait: converged
  - kill: c
  - wait: converged
  - check: {expect_members: [a], expect_epoch: EPOCH}
"""


def test_help_documents_every_option() -> None:
    result = run_cli("--help", timeout=30)
    assert result.returncode == 0
    for flag in (
        "--scenario",
        "--participants",
        "--duration",
        "--join-rate",
        "--leave-rate",
        "--kill-rate",
        "--seed",
        "--headless",
        "--report",
        "--plot",
        "--quiet",
        "--workdir",
    ):
        assert flag in result.stdout, flag
    assert "exit status: 0 every check passed; 1 a check failed" in result.stdout
    assert "exposure window" in result.stdout and "kill: bob" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "{bad}", "--participants", "3"], "--scenario cannot be combined with"),
        (["--participants", "40"], "use --headless for large rooms"),
        (["--participants", "three"], "invalid int value: 'three'"),
        (["--scenario", "{missing}"], "missing.yaml: cannot read the file"),
        (["--scenario", "{bad}"], "s.yaml: steps[1].leave: b is not in the room at this point"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    bad = write(tmp_path, "steps: [{join: a}, {leave: b}]\n")
    args = [
        a.replace("{bad}", str(bad)).replace("{missing}", str(tmp_path / "missing.yaml"))
        for a in args
    ]
    result = run_cli(*args, timeout=30)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert result.stdout == ""


def test_a_passing_scenario_exits_0_with_report_and_plot(tmp_path: Path) -> None:
    scenario = write(tmp_path, HEADLESS.replace("EPOCH", "4"))
    report_path, plot_path = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    result = run_cli(
        *("--scenario", str(scenario), "--report", str(report_path), "--plot", str(plot_path)),
        *("--workdir", str(tmp_path / "work")),  # a failing run keeps its logs here
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # not a terminal: plain progress lines, then the verdict
    assert "epoch 0 <- join" in result.stdout
    assert "<- kill c" in result.stdout
    assert "epoch 3 <- leave b: a, c" in result.stdout
    assert "epoch 4 <- kill c: a" in result.stdout
    assert "check: PASS: epoch 4, 1 members" in result.stdout
    assert f"report: {report_path}" in result.stdout and f"plot: {plot_path}" in result.stdout
    assert "\x1b[" not in result.stdout  # no terminal control codes in a pipe
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["scenario"]["name"] == "small"
    assert plot_path.read_bytes()[:4] == b"\x89PNG"
    assert survivors(report) == []


def test_a_failing_check_exits_1(tmp_path: Path) -> None:
    scenario = write(tmp_path, HEADLESS.replace("EPOCH", "9"))
    report_path, workdir = tmp_path / "r.json", tmp_path / "work"
    result = run_cli(
        *("--scenario", str(scenario), "--report", str(report_path), "--quiet"),
        *("--workdir", str(workdir)),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAIL: expected epoch 9, got 4")
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    assert report["checks"][-1]["problems"] == ["expected epoch 9, got 4"]
    # a failing run keeps its servers' logs for a look
    assert f"logs: {workdir}" in result.stdout and report["workdir"] == str(workdir)
    assert (workdir / "ds" / "ds.log").exists() and (workdir / "harness.log").exists()


def test_random_scenario_from_flags(tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    result = run_cli(
        *("--participants", "6", "--duration", "4", "--seed", "1", "--headless", "--quiet"),
        *("--join-rate", "30", "--leave-rate", "15", "--kill-rate", "15"),
        *("--report", str(report_path), "--workdir", str(tmp_path / "work")),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PASS: ") and lines[1] == f"report: {report_path}"
    assert len(lines) == 2  # --quiet: the verdict only
    report = json.loads(report_path.read_text())
    assert report["scenario"]["source"].startswith("random: participants=6")
    assert len(report["events"]) > 6  # the joins at the start and random events after


def read_until(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """Reads the process's stdout until a line contains ``text``."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if text in line:
                return seen
    raise AssertionError(f"never saw {text!r}; output so far:\n{seen}")


@pytest.mark.parametrize(
    ("mode", "signum"),
    [
        pytest.param("headless", signal.SIGTERM, id="headless-SIGTERM"),
        pytest.param("livekit", signal.SIGINT, id="livekit-Ctrl-C", marks=pytest.mark.livekit),
    ],
)
def test_a_signal_tears_everything_down(tmp_path: Path, mode: str, signum: int) -> None:
    """Stopped mid-run: the report says so, and no server or participant process survives
    (the LiveKit run has b in its own process, as it is to be killed later)."""
    scenario = write(
        tmp_path,
        f"mode: {mode}\nsteps: [{{join: a}}, {{join: b}}, {{wait: 120}}, {{kill: b}}]\n",
    )
    workdir, report_path = tmp_path / "work", tmp_path / "r.json"
    args = ["--scenario", str(scenario), "--workdir", str(workdir), "--report", str(report_path)]
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(),
    )
    try:
        read_until(proc, "<- join b", timeout=60)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, out
    assert "INTERRUPTED: everything was torn down" in out
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True and report["passed"] is False
    roles = sorted(p["role"] for p in report["processes"])
    expected = (
        ["delivery-service"]
        if mode == "headless"
        else ["delivery-service", "livekit-server", "participant"]
    )
    assert roles == expected
    assert survivors(report) == []
    assert processes_mentioning(str(workdir)) == []
