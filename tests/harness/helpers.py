"""Shared helpers of the harness tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (e.g. a work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def survivors(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The processes a run reported starting that are still alive (a report listing none
    would make "no survivors" prove nothing)."""
    assert report["processes"], "the report lists no processes"
    return [p for p in report["processes"] if p["pid"] is not None and alive(p["pid"])]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault(
        "LIVEKIT_MLS_LIVEKIT_SERVER", str(ROOT / ".cache" / "bin" / "livekit-server-v1.13.5")
    )
    return env
