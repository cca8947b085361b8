"""What a scenario run produces: its records, the :class:`RunReport`, JSON and PNG.

:class:`EventRecord` (one join/leave/kill and the rotation it caused) and
:class:`CheckResult` (one check) are what :class:`~mls_provider.testing.runner.ScenarioRunner`
records while it runs; :class:`RunReport` is its result. :func:`write_report` writes a
report as JSON, :func:`plot_report` draws it as a PNG timeline, :func:`summarize` computes
its latency and exposure figures. Times in records are ``time.monotonic()`` seconds; in a
report, seconds since the run started (:func:`relative`) and milliseconds
(:func:`milliseconds`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mls_provider.testing.scenario import Scenario

if TYPE_CHECKING:
    from mls_provider.testing.members import Member

__all__ = [
    "CheckResult",
    "EventRecord",
    "RunReport",
    "default_report_path",
    "format_ms",
    "milliseconds",
    "plot_report",
    "relative",
    "summarize",
    "write_report",
]


def relative(t: float | None, t0: float) -> float | None:
    """A monotonic time as seconds since ``t0`` (a report's times), to the millisecond."""
    return None if t is None else round(t - t0, 3)


def milliseconds(seconds: float | None) -> float | None:
    """A duration in milliseconds (a report's durations), to a tenth."""
    return None if seconds is None else round(seconds * 1000, 1)


def format_ms(ms: float | None) -> str:
    """A duration for people: ``1.23 s`` from a second up, ``456 ms`` below, ``-`` if none."""
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


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
        """Removals: request -> the DS learned of it (presence or a webhook, for a kill)."""
        if self.removal_seen_at is None:
            return None
        return max(self.removal_seen_at - self.requested_at, 0.0)


@dataclass
class CheckResult:
    """One check: did the members converge, agree on keys and code, hear each other."""

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
            "at": relative(self.at, t0),
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


@dataclass
class RunReport:
    """The result of a run; :meth:`to_dict` is the JSON report."""

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


def summarize(events: Sequence[EventRecord], *, in_flight_allowance: float) -> dict[str, Any]:
    """A report's ``summary``: rotations, latency and exposure (p50, max), unresolved
    events, and the in-flight allowance the decrypt failures were counted with."""

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"count": 0, "p50_ms": None, "max_ms": None}
        ordered = sorted(values)
        return {
            "count": len(values),
            "p50_ms": milliseconds(ordered[len(ordered) // 2]),
            "max_ms": milliseconds(ordered[-1]),
        }

    return {
        "rotations": len({e.epoch for e in events if e.epoch is not None}),
        "rotation_latency": stats([e.latency for e in events if e.latency is not None]),
        "exposure": stats([e.exposure for e in events if e.exposure is not None]),
        "unresolved_events": [f"{e.kind} {e.identity}" for e in events if not e.resolved],
        # decrypt failures are counted from this long after two members share an epoch
        "in_flight_allowance_s": in_flight_allowance,
    }


def write_report(report: RunReport, path: str | os.PathLike[str]) -> Path:
    """Writes ``report`` as indented JSON (creating directories); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return out


def default_report_path(scenario: Scenario) -> Path:
    """``reports/harness-<name>-<UTC time>.json``."""
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
            text += f" ({format_ms(latency)})"
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
