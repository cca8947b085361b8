"""Binding overhead: the MLS engine driven from Python vs the same calls in plain Rust.

Runs ``mls-bench`` (the engine crate's Rust binary) and the identical scenario through
``mls_provider.mls`` in the same process run, for each group size, and reports the median
of each operation and the Python/Rust ratio (target: <= 1.15 at N = 1000).

    .venv/bin/python benchmarks/bench_native.py [--sizes 10,100,1000] [--iterations 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from common import ROOT, markdown_table, median, write_result

from mls_provider import mls

OPS = ("commit_add", "commit_remove", "process_commit", "join_welcome")


def rust_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / ".cache" / "target"))
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--locked", "-p", "livekit-mls-engine"],
        cwd=ROOT / "native",
        check=True,
        env={**os.environ, "CARGO_TARGET_DIR": str(target)},
    )
    return target / "release" / "mls-bench"


def run_rust(binary: Path, members: int, iterations: int) -> dict[str, list[float]]:
    out = subprocess.run(
        [str(binary), str(members), str(iterations)], capture_output=True, text=True, check=True
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return {row["op"]: row["samples_us"] for row in rows}


def client(name: str) -> mls.MlsClient:
    return mls.MlsClient(name, mls.SignatureKeyPair.generate())


def run_python(members: int, iterations: int) -> dict[str, list[float]]:
    """The scenario of native/engine/src/bin/mls_bench.rs, call for call."""
    creator = client("m0")
    group = creator.create_group(b"bench")
    others = [client(f"m{i}") for i in range(1, members)]
    output = group.commit(add=[c.generate_key_package() for c in others])
    group.apply_pending_commit()
    assert output.welcome is not None
    receiver_client = others[0]
    receiver_state = receiver_client.join_group(output.welcome).to_bytes()
    last_leaf = members - 1
    samples: dict[str, list[float]] = {op: [] for op in OPS}

    for i in range(iterations):
        kp = client(f"new{i}").generate_key_package()
        start = time.perf_counter()
        group.commit(add=[kp])
        samples["commit_add"].append((time.perf_counter() - start) * 1e6)
        group.discard_pending_commit()

    remove_commit = b""
    for _ in range(iterations):
        start = time.perf_counter()
        remove_commit = group.commit(remove=[last_leaf]).commit
        samples["commit_remove"].append((time.perf_counter() - start) * 1e6)
        group.discard_pending_commit()

    for _ in range(iterations):
        receiver = receiver_client.load_group(receiver_state)
        start = time.perf_counter()
        receiver.process_message(remove_commit)
        samples["process_commit"].append((time.perf_counter() - start) * 1e6)

    for i in range(iterations):
        joiner = client(f"joiner{i}")
        welcome = group.commit(add=[joiner.generate_key_package()]).welcome
        group.discard_pending_commit()
        assert welcome is not None
        start = time.perf_counter()
        joiner.join_group(welcome)
        samples["join_welcome"].append((time.perf_counter() - start) * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--iterations", type=int, default=20, help="samples per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating Rust/Python rounds, so both see the same machine noise",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    binary = rust_binary()

    rows, results = [], []
    for members in sizes:
        rust: dict[str, list[float]] = {op: [] for op in OPS}
        python: dict[str, list[float]] = {op: [] for op in OPS}
        for round_ in range(args.rounds):
            print(f"N = {members}: round {round_ + 1}/{args.rounds}", flush=True)
            for op, samples in run_rust(binary, members, args.iterations).items():
                rust[op] += samples
            for op, samples in run_python(members, args.iterations).items():
                python[op] += samples
        for op in OPS:
            r, p = median(rust[op]), median(python[op])
            r_best, p_best = min(rust[op]), min(python[op])
            rows.append(
                [members, op, f"{r / 1000:.3f}", f"{p / 1000:.3f}", f"{p / r:.3f}",
                 f"{r_best / 1000:.3f}", f"{p_best / 1000:.3f}", f"{p_best / r_best:.3f}"]
            )  # fmt: skip
            results.append(
                {
                    "members": members,
                    "op": op,
                    "rust_median_us": r,
                    "python_median_us": p,
                    "ratio": p / r,
                    "rust_best_us": r_best,
                    "python_best_us": p_best,
                    "best_ratio": p_best / r_best,
                }
            )
    table = markdown_table(
        [
            "members",
            "operation",
            "Rust median (ms)",
            "Python median (ms)",
            "ratio",
            "Rust best (ms)",
            "Python best (ms)",
            "ratio (best)",
        ],
        rows,
    )
    print(table)
    path = write_result(
        "native", {"iterations": args.iterations, "rounds": args.rounds, "results": results}
    )
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
