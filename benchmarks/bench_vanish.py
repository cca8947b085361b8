"""A participant that vanishes: SIGKILL of one of five real LiveKit participants, repeated.

    .venv/bin/python benchmarks/bench_vanish.py --kills 12

Real livekit-server, the real DS (SQLite, default presence timeout 3 s), five participants
publishing tones (the scenario runner of ``livekit-mls-harness``). Each round SIGKILLs one
participant's process — no goodbye; LiveKit keeps it in the room until its ping timeout,
~20 s — waits until the others converged without it, then brings it back. Per kill:

* **removal**: SIGKILL -> every remaining member executed the epoch without the victim
  (the victim is out of the group and every remaining sender switched keys);
* **detection**: SIGKILL -> the DS logged the removal (``vanished``: its stream had been
  gone for the presence timeout);
* **exposure**: the DS accepted the removing commit -> every remaining sender switched.

Also counts the decryption failures the remaining members saw over the whole run (target
0) and checks the room ends converged with everyone hearing everyone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, median, percentile, write_result

from mls_provider.testing.runner import run_scenario
from mls_provider.testing.scenario import parse_scenario

NAMES = ["alice", "bob", "carol", "dave", "erin"]
TONES = [440, 554, 659, 880, 1100]


def scenario(kills: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"join": name, "tone": tone} for name, tone in zip(NAMES, TONES, strict=True)
    ]
    steps.append({"wait": "converged"})
    for k in range(kills):
        victim = NAMES[k % len(NAMES)]
        steps += [
            {"wait": 1},
            {"kill": victim},
            {"wait": "converged", "timeout": 30},
            {"join": victim, "tone": TONES[k % len(NAMES)]},
            {"wait": "converged", "timeout": 30},
        ]
    steps.append({"check": {"expect_members": NAMES}})
    return {"name": "vanish", "mode": "livekit", "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--workdir", default="benchmarks/results/vanish")
    args = parser.parse_args()
    report = run_scenario(parse_scenario(scenario(args.kills)), workdir=args.workdir)
    data = report.to_dict()
    kills = [e for e in data["events"] if e["kind"] == "kill"]
    removal = [e["rotation_latency_ms"] for e in kills if e["rotation_latency_ms"] is not None]
    detection = [e["detection_ms"] for e in kills if e["detection_ms"] is not None]
    exposure = [e["exposure_ms"] for e in kills if e["exposure_ms"] is not None]
    rows = []
    for label, samples in (
        ("SIGKILL -> removed, every remaining sender switched", removal),
        ("SIGKILL -> DS noticed (presence timeout)", detection),
        ("commit accepted -> every remaining sender switched", exposure),
    ):
        rows.append(
            {
                "measure": label,
                "samples": len(samples),
                "p50_ms": round(median(samples), 1),
                "p99_ms": round(percentile(samples, 99), 1),
                "max_ms": round(max(samples), 1) if samples else None,
            }
        )
    print(
        markdown_table(
            ["measure", "kills", "p50", "p99", "max"],
            [
                [
                    r["measure"],
                    r["samples"],
                    f"{r['p50_ms']} ms",
                    f"{r['p99_ms']} ms",
                    f"{r['max_ms']} ms",
                ]
                for r in rows
            ],
        )
    )
    result = {
        "participants": len(NAMES),
        "kills": len(kills),
        "rows": rows,
        "decrypt_failures": data["decrypt_failures"],
        "passed": report.passed,
        "checks": data["checks"][-1:],
    }
    print(f"decryption failures: {data['decrypt_failures']}; run passed: {report.passed}")
    print(f"wrote {write_result('vanish', result)}")
    return 0 if report.passed and len(removal) == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
