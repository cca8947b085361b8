"""``python -m mls_provider.demo`` (``make demo``): a live LiveKit room with MLS keys.

Starts a real livekit-server and the delivery service (embedded SQLite store) on loopback,
then: alice, bob, carol and dave join one by one, each publishing a tone (an A major
chord); carol leaves; dave's process is killed (no goodbye); dave joins again. Every change
of membership rotates every participant's media key; the terminal shows who is in, the
epoch, each rotation with its latency, the verification code, and who hears whom. The killed
participant is removed once its stream to the delivery service has been gone for 3 s (the
DS's presence timeout). It ends by itself (~30 s; ``--fast`` or ``LIVEKIT_MLS_DEMO_FAST=1``:
~20 s) with exit status 0, or 1 if a check failed.

The demo is a built-in scenario (:mod:`mls_provider.testing.scenario`) run by
:mod:`mls_provider.testing.runner`, with a friendlier presentation; ``livekit-mls-harness``
runs any other.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table

from mls_provider.testing.harness_cli import (
    configure_logging,
    hears_matrix_lines,
    hears_table,
    make_view,
    output_files,
)
from mls_provider.testing.livekit_server import LiveKitServerError, find_livekit_server_binary
from mls_provider.testing.report import format_ms
from mls_provider.testing.runner import Interrupted, run_scenario
from mls_provider.testing.scenario import Scenario, Step

FAST_ENV = "LIVEKIT_MLS_DEMO_FAST"
TONES = {"alice": 440.0, "bob": 554.0, "carol": 659.0, "dave": 880.0}  # A major


def demo_scenario(fast: bool = False) -> Scenario:
    """The demo's steps; ``fast`` shortens the pauses meant for human eyes."""
    pause = Step("wait", seconds=0.2 if fast else 1.5)

    def join(name: str) -> Step:
        return Step("join", (name,), (TONES[name],))

    steps = [
        join("alice"),
        pause,
        join("bob"),
        pause,
        join("carol"),
        pause,
        join("dave"),  # killed later: runs in its own process
        pause,
        Step("check"),
        Step("leave", ("carol",)),
        pause,
        Step("kill", ("dave",)),
        Step("wait", converged=True, timeout=45),
        join("dave"),
        pause,
        Step("check", expect_members=("alice", "bob", "dave")),
    ]
    return Scenario("demo", tuple(steps), "livekit", "livekit-mls-demo", "mls_provider.demo")


INTRO = """\
[bold]livekit-mls demo[/]: end-to-end encryption keys for a LiveKit room, agreed with MLS.

A real livekit-server and the delivery service run on this machine. Four participants
join one by one, each publishing a tone; carol leaves, dave's process is [red]killed[/] (no
goodbye) and dave comes back. Every change of membership [bold]rotates every participant's
media key[/]: the table shows each one's epoch, the key index it sends with, how many of the
others it hears (their tones decrypted and decoded) and the verification code people
could compare. A killed participant is removed once its connection to the delivery
service has been gone for 3 s (LiveKit itself would notice only after ~20 s).
"""


def rotations_table(report: dict[str, Any]) -> Table:
    table = Table(title="key rotations", title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (
        ("event", "left"),
        ("epoch", "right"),
        ("members after", "left"),
        ("rotation", "right"),
        ("exposure", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for e in report["events"]:
        table.add_row(
            f"{e['kind']} {e['identity']}",
            "-" if e["epoch"] is None else str(e["epoch"]),
            ", ".join(sorted(e["members"])),
            format_ms(e["rotation_latency_ms"]),
            format_ms(e["exposure_ms"]),
        )
    return table


ROTATIONS_LEGEND = (
    "rotation: request -> every remaining participant sends with the new key\n"
    "exposure: the removing commit accepted -> every remaining sender switched"
)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The demo's closing statement (plain text; the tests read it)."""
    lines = []
    final = report["checks"][-1] if report["checks"] else None
    if final is not None and final["hears"]:
        pairs = final["hears_pairs"]
        names = ", ".join(final["members"])
        if final["everyone_hears_everyone"]:
            lines.append(
                f"everyone heard everyone: {names} ({pairs['heard']}/{pairs['total']} pairs)"
            )
        else:
            missing = [
                f"{listener} does not hear {speaker}"
                for listener, row in final["hears"].items()
                for speaker, ok in row.items()
                if not ok
            ]
            lines.append(f"NOT everyone heard everyone: {'; '.join(missing)}")
    if final is not None and final["converged"]:
        keys = "the same keys" if final["keys_agree"] else "DIFFERENT keys"
        lines.append(
            f"all {len(final['members'])} agree on epoch {final['epoch']}, {keys} and "
            f"verification code {final['verification_code']}"
        )
    latency = report["summary"]["rotation_latency"]
    exposure = report["summary"]["exposure"]
    timed = [e for e in report["events"] if e["rotation_latency_ms"] is not None]
    slowest = ""
    if timed:
        worst = max(timed, key=lambda e: e["rotation_latency_ms"])
        slowest = f" ({worst['kind']} {worst['identity']})"
    lines.append(
        f"{report['summary']['rotations']} key rotations: median {format_ms(latency['p50_ms'])}, "
        f"slowest {format_ms(latency['max_ms'])}{slowest}, exposure window at most "
        f"{format_ms(exposure['max_ms'])}; {report['decrypt_failures']} decrypt failures"
    )
    problems = [p for check in report["checks"] for p in check["problems"]]
    lines += [f"problem: {p}" for p in dict.fromkeys(problems)]
    if report["error"]:
        lines.append(f"problem: {report['error']}")
    lines.append("demo passed" if report["passed"] else "demo FAILED")
    return lines


def print_summary(report: dict[str, Any], out: IO[str], *, rich_output: bool) -> None:
    final = report["checks"][-1] if report["checks"] else None
    if rich_output:
        console = Console(file=out)
        console.print()
        console.print(rotations_table(report))
        console.print(f"[dim]{ROTATIONS_LEGEND}[/]\n")
        if final is not None and final["hears"]:
            console.print(hears_table(final["hears"]))
        style = "bold green" if report["passed"] else "bold red"
        for line in summary_lines(report):
            console.print(f"[{style}]{line}[/]", highlight=False)
        return
    print("\nkey rotations:", file=out)
    for e in report["events"]:
        print(
            f"  {e['kind']:5} {e['identity']:6} -> epoch {e['epoch']}: "
            f"{', '.join(sorted(e['members']))}; rotation {format_ms(e['rotation_latency_ms'])}, "
            f"exposure {format_ms(e['exposure_ms'])}",
            file=out,
        )
    if final is not None and final["hears"]:
        print("who hears whom (row: listener, column: speaker):", file=out)
        for row in hears_matrix_lines(final["hears"], unicode=False):
            print("  " + row, file=out)
    for line in summary_lines(report):
        print(line, file=out)
    out.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mls_provider.demo",
        description="A live LiveKit room with MLS-agreed, rotating end-to-end encryption "
        "keys: livekit-server and the delivery service on this machine, four participants "
        "with tones joining, leaving, being killed and coming back.",
        epilog=f"Needs `make native` and `make livekit-server`. {FAST_ENV}=1 is --fast.",
    )
    parser.add_argument("--fast", action="store_true", help="short pauses (for tests)")
    parser.add_argument("--report", metavar="PATH", help="also write the JSON report")
    parser.add_argument("--plot", metavar="PATH", help="also draw the PNG timeline")
    parser.add_argument("--workdir", metavar="DIR", help="keep the servers' config and logs here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fast = args.fast or os.environ.get(FAST_ENV, "") not in ("", "0")
    try:
        find_livekit_server_binary()
    except LiveKitServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging()
    out = sys.stdout
    rich_output = out.isatty()
    if rich_output:
        Console(file=out).print(INTRO)
    else:
        print(Console(file=out, no_color=True).render_str(INTRO).plain, file=out)
    view = make_view(stream=out)
    try:
        report = run_scenario(demo_scenario(fast), observer=view, workdir=args.workdir)
    except Interrupted as e:
        view.close()  # before the message (closing again in finally does nothing)
        print(
            "\ninterrupted: livekit-server, the delivery service and every participant "
            "were stopped",
            file=out,
            flush=True,
        )
        return 128 + e.signum
    finally:
        view.close()
    print_summary(report.to_dict(), out, rich_output=rich_output)
    for line in output_files(report, args.report, args.plot):
        print(line, file=out)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
