"""Run the tests that involve concurrency, kills, restarts or timing many times, and print
how often each test passed. A test that fails one run in twenty is a failing test.

    python scripts/soak.py                 # every listed suite, 20 runs each
    python scripts/soak.py -n 5 tests/ds/test_presence.py tests/test_ds_crash.py

Each run is a fresh ``pytest`` process (so no state leaks between runs). Logs of failed runs
are kept in ``.cache/soak/`` and named in the summary. Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "soak"

# what `make soak` loops: every suite with kills, restarts, races or deadlines
SUITES = [
    "tests/test_ds_crash.py",
    "tests/test_chaos.py",
    "tests/ds/test_race.py",
    "tests/ds/test_presence.py",
    "tests/ds/test_hostile.py",
    "tests/test_authority.py",
    "tests/test_session.py",
    "tests/redis/test_redis_cluster.py",
    "tests/redis/test_redis_persistence.py",
    "tests/redis/test_redis_regressions.py",
    "tests/e2e/test_presence.py",
    "tests/e2e/test_authority.py",
]


def run_once(suite: str, index: int) -> tuple[dict[str, bool], float, Path]:
    name = suite.replace("/", "_").replace("::", "-")
    xml = OUT / f"{name}-{index}.xml"
    log = OUT / f"{name}-{index}.log"
    started = time.monotonic()
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite,
             f"--junitxml={xml}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    elapsed = time.monotonic() - started
    results: dict[str, bool] = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("skipped") is not None:
                continue
            results[test] = case.find("failure") is None and case.find("error") is None
        xml.unlink()
    if not results:
        results[suite] = False  # collection failed, or the run crashed
    if all(results.values()):
        log.unlink()
    return results, elapsed, log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=20, help="runs per suite")
    parser.add_argument("suites", nargs="*", help="pytest paths or node ids (default: all)")
    args = parser.parse_args()
    suites = args.suites or [s for s in SUITES if (ROOT / s.split("::")[0]).exists()]
    OUT.mkdir(parents=True, exist_ok=True)
    passes: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    failed_logs: dict[str, list[Path]] = defaultdict(list)
    for suite in suites:
        for i in range(1, args.runs + 1):
            results, elapsed, log = run_once(suite, i)
            bad = [t for t, ok in results.items() if not ok]
            for test, ok in results.items():
                runs[test] += 1
                passes[test] += ok
                if not ok:
                    failed_logs[test].append(log)
            status = "ok" if not bad else f"FAILED {', '.join(t.split('::')[-1] for t in bad)}"
            print(f"{suite} run {i}/{args.runs}: {status} ({elapsed:.0f} s)", flush=True)
    print("\nsoak summary (passed/runs):")
    width = max((len(t) for t in runs), default=10)
    for test in sorted(runs):
        mark = "" if passes[test] == runs[test] else "   <-- FLAKY"
        print(f"  {test:<{width}}  {passes[test]:>3}/{runs[test]}{mark}")
        for log in failed_logs[test]:
            print(f"      log: {log.relative_to(ROOT)}")
    return 0 if passes == runs else 1


if __name__ == "__main__":
    sys.exit(main())
