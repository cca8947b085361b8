"""``livekit-mls-harness``: run a join/leave/kill scenario on a real LiveKit + DS stack.

    livekit-mls-harness --scenario scenarios/leave-and-kill.yaml --plot reports/lk.png
    livekit-mls-harness --participants 4 --duration 30 --join-rate 4 --leave-rate 2 --seed 7
    livekit-mls-harness --participants 50 --duration 20 --join-rate 30 --kill-rate 10 --headless

Also ``python -m mls_provider.testing.harness_cli``. The views here (a live ``rich`` table
on a terminal, plain progress lines otherwise) are shared with ``python -m mls_provider.demo``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from mls_provider.testing.report import (
    CheckResult,
    EventRecord,
    RunReport,
    default_report_path,
    format_ms,
    plot_report,
    write_report,
)
from mls_provider.testing.runner import Interrupted, MemberRow, ScenarioRunner, run_scenario
from mls_provider.testing.scenario import (
    Scenario,
    ScenarioError,
    Step,
    load_scenario,
    random_scenario,
)

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_LIVEKIT_PARTICIPANTS = 16  # every participant decodes everyone else's audio, here
MAX_TABLE_ROWS = 24

EPILOG = """\
scenario files (YAML; full format in mls_provider/testing/scenario.py, example in
scenarios/leave-and-kill.yaml):
  name: my-scenario
  mode: livekit            # or headless
  steps:
    - join: alice          # a name or a list (concurrent joins)
      tone: 440            # Hz; omitted: automatic; false: silent
    - wait: 2              # seconds, or "converged" (with optional timeout:)
    - leave: alice         # graceful
    - kill: bob            # SIGKILL of bob's process
    - check: {expect_members: [carol], expect_epoch: 4, hear: true, timeout: 45}

what is measured, per join/leave/kill: the epoch it produced; rotation latency (request ->
every remaining member executed the epoch); for removals the exposure window (the DS
accepted the removing commit -> every remaining sender switched) and how long until the DS
learned of it (a killed participant: the DS's 3 s presence timeout); decrypt failures (MISSING_KEY /
DECRYPTION_FAILED between members that should hear each other). The final check: all
members converge on one epoch, roster and verification code, hold identical keys, and
(livekit mode) everyone hears everyone's tone.

exit status: 0 every check passed; 1 a check failed (or a step did); 2 usage error (bad
flags, invalid scenario file, livekit-server not built: `make livekit-server`); 130/143
interrupted by Ctrl-C/SIGTERM (everything is torn down first).
"""


# ---- views ------------------------------------------------------------------------------


def short_code(code: str | None, groups: int = 2) -> str:
    """The first groups of a verification code (enough to compare at a glance)."""
    if not code:
        return "-"
    parts = code.split()
    return " ".join(parts[:groups]) + ("…" if len(parts) > groups else "")


def _duration(seconds: float | None) -> str:
    return format_ms(None if seconds is None else seconds * 1000)


def _names(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names) if len(names) <= limit else f"{len(names)} members"


def describe_rotation(event: EventRecord) -> str:
    """``epoch 5 <- kill dave: alice, bob | rotation 21.79 s | ...`` (one line)."""
    text = f"epoch {event.epoch} <- {event.kind} {event.identity}: {_names(sorted(event.members))}"
    text += f" | rotation {_duration(event.latency)}"
    if event.kind == "kill" and event.detection is not None:
        text += f" (the DS learned of it after {_duration(event.detection)})"
    if event.exposure is not None:
        text += f" | exposure {_duration(event.exposure)}"
    return text + f" | code {short_code(event.verification_code)}"


def describe_check(result: CheckResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    if not result.converged:
        return f"check: {verdict}: " + "; ".join(result.problems)
    heard, pairs = result.hears_count
    parts = [f"epoch {result.epoch}", f"{len(result.members)} members"]
    if result.keys_agree:
        parts.append(f"same keys ({len(result.keys_compared_by)} key providers compared)")
    parts.append(f"code {result.verification_code}")
    if pairs:
        parts.append(f"hears {heard}/{pairs} pairs")
    text = f"check: {verdict}: " + ", ".join(parts)
    if result.problems:
        text += " | " + "; ".join(result.problems)
    return text


def _hears_cells(
    hears: dict[str, dict[str, bool]], yes: str, no: str, me: str
) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The hears matrix's names (sorted) and, per listener, its cells: ``me`` for itself,
    ``yes``/``no`` for a speaker it was checked against, ``""`` for others."""
    names = sorted(set(hears) | {s for row in hears.values() for s in row})

    def cell(listener: str, speaker: str) -> str:
        if speaker == listener:
            return me
        heard = hears.get(listener, {})
        if speaker in heard:
            return yes if heard[speaker] else no
        return ""

    return names, [(lis, [cell(lis, spk) for spk in names]) for lis in names]


def hears_matrix_lines(hears: dict[str, dict[str, bool]], *, unicode: bool) -> list[str]:
    """The hears matrix as text: rows listen, columns speak."""
    names, rows = _hears_cells(hears, *(("✔", "✘", "·") if unicode else ("Y", "N", ".")))
    if not names:
        return []
    width = max(len(n) for n in names) + 2
    lines = [" " * width + "".join(n[: width - 1].rjust(width) for n in names)]
    for listener, cells in rows:
        lines.append(listener.ljust(width) + "".join(c.rjust(width) for c in cells))
    return lines


class PlainView:
    """Progress as plain lines (not a terminal: CI logs, pipes)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.runner: ScenarioRunner | None = None

    def line(self, text: str) -> None:
        elapsed = self.runner.elapsed() if self.runner is not None else 0.0
        print(f"[{elapsed:6.1f}s] {text}", file=self.stream, flush=True)

    def started(self, runner: ScenarioRunner) -> None:
        self.runner = runner
        s = runner.scenario
        stack = "the delivery service" if runner.headless else "livekit-server + delivery service"
        self.line(f"scenario {s.name!r} ({s.mode} mode), room {runner.room}: {stack} up")

    def step(self, index: int, step: Step) -> None:
        if step.action in ("join", "leave", "kill") or step.converged:
            headless = self.runner is not None and self.runner.headless
            text = step.describe(tones=not headless)
            if step.action == "kill":
                text += " (stops without a word)" if headless else " (SIGKILL, no goodbye)"
            self.line(text)

    def rotation(self, event: EventRecord) -> None:
        self.line(describe_rotation(event))

    def message(self, text: str) -> None:
        self.line(text)

    def checked(self, result: CheckResult) -> None:
        self.line(describe_check(result))
        for row in hears_matrix_lines(result.hears, unicode=False):
            print("          " + row, file=self.stream, flush=True)

    def tick(self) -> None:
        pass

    def finished(self, report: RunReport) -> None:
        pass

    def close(self) -> None:
        pass


_STATUS_STYLE = {
    "in group": "green",
    "joining": "yellow",
    "rejoining": "yellow",
    "leaving": "dim",
    "left": "dim",
    "killed": "red",
    "exited": "red",
    "failed": "bold red",
}


class LiveView:
    """A live table (``rich.Live``) of every participant, with a scrolling log above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.runner: ScenarioRunner | None = None
        self.live: Live | None = None
        self.unicode = (self.console.encoding or "").lower().startswith("utf")

    def started(self, runner: ScenarioRunner) -> None:
        self.runner = runner
        self.live = Live(
            self.render(), console=self.console, auto_refresh=False, redirect_stdout=False
        )
        self.live.start()
        s = runner.scenario
        stack = "delivery service" if runner.headless else "livekit-server + delivery service"
        self.log(f"[bold]{s.name}[/] ({s.mode} mode) in room {runner.room}: {stack} up")

    def log(self, markup: str) -> None:
        elapsed = self.runner.elapsed() if self.runner is not None else 0.0
        self.console.print(f"[dim]{elapsed:6.1f}s[/]  {markup}", highlight=False)

    def step(self, index: int, step: Step) -> None:
        tones = self.runner is None or not self.runner.headless
        if step.action == "join":
            self.log(f"[green]→ {step.describe(tones=tones)}[/]")
        elif step.action == "leave":
            self.log(f"[yellow]← {step.describe()}[/] (graceful)")
        elif step.action == "kill":
            how = "stops without a word" if not tones else "SIGKILL: no goodbye"
            self.log(f"[red]✖ {step.describe()}[/] ({how})")
        elif step.converged:
            self.log("[dim]waiting until every member runs the same epoch[/]")

    def rotation(self, event: EventRecord) -> None:
        colour = {"join": "green", "leave": "yellow", "kill": "red"}.get(event.kind, "white")
        self.log(f"[{colour}]{'🔑' if self.unicode else '*'}[/] {escape(describe_rotation(event))}")

    def message(self, text: str) -> None:
        self.log(f"[dim]{escape(text)}[/]")

    def checked(self, result: CheckResult) -> None:
        style = "bold green" if result.passed else "bold red"
        self.log(f"[{style}]{escape(describe_check(result))}[/]")
        if result.hears:
            self.console.print(hears_table(result.hears, unicode=self.unicode))

    def tick(self) -> None:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)

    def finished(self, report: RunReport) -> None:
        self.close()  # the table keeps its last state from before the teardown

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def render(self) -> Table:
        runner = self.runner
        title = "livekit-mls harness"
        if runner is not None:
            title = f"{runner.scenario.name} · room {runner.room} · {runner.elapsed():.0f} s"
        wide = self.console.width >= 100  # full headers; abbreviated ones on 80 columns
        table = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            caption=None
            if wide
            else "exec: executed epoch · key: key index · fail: decrypt failures",
            caption_justify="left",
        )
        table.add_column("participant", overflow="fold")
        table.add_column("status", no_wrap=True)
        table.add_column("epoch", justify="right")
        table.add_column("executed" if wide else "exec", justify="right")
        table.add_column("key index" if wide else "key", justify="right")
        table.add_column("hears", justify="right", no_wrap=True)
        table.add_column("decrypt failures" if wide else "fail", justify="right")
        table.add_column("verification code" if wide else "code", no_wrap=True)
        rows: list[MemberRow] = runner.rows() if runner is not None else []
        for row in rows[:MAX_TABLE_ROWS]:
            hears = "-"
            if row.hears_of:
                colour = "green" if row.hears == row.hears_of else "yellow"
                hears = f"[{colour}]{row.hears}/{row.hears_of}[/]"
            failures = f"[red]{row.decrypt_failures}[/]" if row.decrypt_failures else "0"
            table.add_row(
                row.identity,
                f"[{_STATUS_STYLE.get(row.status, 'white')}]{row.status}[/]",
                "-" if row.epoch is None else str(row.epoch),
                "-" if row.executed < 0 else str(row.executed),
                "-" if row.key_index is None else str(row.key_index),
                hears,
                failures,
                short_code(row.verification_code),
            )
        if len(rows) > MAX_TABLE_ROWS:
            table.add_row(f"… {len(rows) - MAX_TABLE_ROWS} more", *[""] * 7)
        return table


def hears_table(hears: dict[str, dict[str, bool]], *, unicode: bool = True) -> Table:
    """The hears matrix as a rich table: rows listen, columns speak."""
    marks = ("[green]✔[/]", "[bold red]✘[/]", "[dim]·[/]") if unicode else ("Y", "N", ".")
    names, rows = _hears_cells(hears, *marks)
    table = Table(
        title="who hears whom",
        title_justify="left",
        caption="rows hear columns",
        caption_justify="left",
    )
    table.add_column("")
    for name in names:
        table.add_column(name, justify="center")
    for listener, cells in rows:
        table.add_row(listener, *cells)
    return table


class QuietView(PlainView):
    """Nothing while running (``--quiet``)."""

    def line(self, text: str) -> None:
        pass

    def checked(self, result: CheckResult) -> None:
        pass


def make_view(quiet: bool = False, stream: IO[str] | None = None) -> PlainView | LiveView:
    """A live table on a terminal, plain lines otherwise, nothing with ``quiet``."""
    out = stream or sys.stdout
    if quiet:
        return QuietView(out)
    if out.isatty():
        return LiveView(Console(file=out))
    return PlainView(out)


def verdict(report: RunReport) -> str:
    """One line: PASS/FAIL/INTERRUPTED with the essentials."""
    if report.interrupted:
        return "INTERRUPTED: everything was torn down"
    summary = report.summary
    latency = summary["rotation_latency"]
    exposure = summary["exposure"]
    text = (
        f"{summary['rotations']} rotations, latency p50 {latency['p50_ms']} ms "
        f"max {latency['max_ms']} ms"
    )
    if exposure["count"]:
        text += f", exposure max {exposure['max_ms']} ms"
    text += f", {report.decrypt_failures} decrypt failures"
    if report.passed:
        return f"PASS: {text}"
    problems = [p for c in report.checks for p in c["problems"]]
    if report.error:
        problems.insert(0, report.error)
    return f"FAIL: {'; '.join(problems) or 'no check ran'} ({text})"


# ---- the command --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livekit-mls-harness",
        description="Run participants through joins, leaves and kills on a real\n"
        "livekit-server and delivery service (started here, on loopback, and always torn\n"
        "down); time every key rotation and check that everyone ends up hearing everyone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("what to run (a scenario file, or one built from rates)")
    source.add_argument("--scenario", metavar="FILE.yaml", help="a YAML scenario file")
    source.add_argument(
        "--participants",
        type=int,
        metavar="N",
        help="participants joining one by one at the start (default 4)",
    )
    source.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds of random joins/leaves/kills after that (default 30)",
    )
    for kind, what in (
        ("join", "new participants join"),
        ("leave", "a random participant leaves gracefully"),
        ("kill", "a random participant's process is SIGKILLed"),
    ):
        source.add_argument(
            f"--{kind}-rate",
            type=float,
            metavar="PER_MIN",
            help=f"how often {what}, per minute (default 0)",
        )
    source.add_argument("--seed", type=int, help="random seed: same seed, same scenario")
    parser.add_argument(
        "--headless",
        action="store_true",
        help="MlsSession members on the delivery service only (no LiveKit, no media): for "
        "large rooms; overrides a scenario file's mode",
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="where to write the JSON report (default: reports/harness-<name>-<time>.json)",
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="also draw a PNG timeline (epochs, events, latencies)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no live table or progress, only the verdict"
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep the servers' config and logs here (default: a temp dir, removed after a "
        "passing run, kept after a failing one)",
    )
    return parser


def scenario_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Scenario:
    """The scenario the flags describe (``parser.error`` -> exit 2 on a usage error)."""
    rate_flags = ("participants", "duration", "join_rate", "leave_rate", "kill_rate", "seed")
    if args.scenario:
        given = [f"--{f.replace('_', '-')}" for f in rate_flags if getattr(args, f) is not None]
        if given:
            parser.error(f"--scenario cannot be combined with {', '.join(given)}")
        scenario = load_scenario(args.scenario)
        return scenario.with_mode("headless") if args.headless else scenario
    participants = 4 if args.participants is None else args.participants
    if not args.headless and participants > MAX_LIVEKIT_PARTICIPANTS:
        parser.error(
            f"--participants {participants}: livekit mode runs every participant on this "
            f"machine (at most {MAX_LIVEKIT_PARTICIPANTS}); use --headless for large rooms"
        )
    return random_scenario(
        participants=participants,
        duration=30.0 if args.duration is None else args.duration,
        join_rate=args.join_rate or 0.0,
        leave_rate=args.leave_rate or 0.0,
        kill_rate=args.kill_rate or 0.0,
        seed=0 if args.seed is None else args.seed,
        mode="headless" if args.headless else "livekit",
    )


def configure_logging() -> None:
    """Library and SDK logs never go over the live table: the runner writes them to
    ``harness.log`` in its work dir; outside a run they go nowhere."""
    root = logging.getLogger()
    root.handlers[:] = [logging.NullHandler()]
    root.setLevel(logging.INFO)


def execute(
    scenario: Scenario,
    *,
    view: PlainView | LiveView,
    report_path: str | Path | None,
    plot_path: str | Path | None,
    workdir: str | None,
    out: IO[str],
) -> tuple[int, RunReport | None]:
    """Runs ``scenario`` and writes its report/plot; returns (exit status, report)."""
    if scenario.mode == "livekit":
        from mls_provider.testing.livekit_server import (
            LiveKitServerError,
            find_livekit_server_binary,
        )

        try:
            find_livekit_server_binary()
        except LiveKitServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE, None
    status = EXIT_FAILED
    report: RunReport | None = None
    try:
        report = run_scenario(scenario, observer=view, workdir=workdir)
        status = EXIT_PASSED if report.passed else EXIT_FAILED
    except Interrupted as e:
        report = e.report
        status = 128 + e.signum
    finally:
        view.close()
    if report is not None:
        lines = [verdict(report)]
        lines += output_files(report, report_path or default_report_path(scenario), plot_path)
        for line in lines:
            print(line, file=out, flush=True)
    return status, report


def output_files(
    report: RunReport, report_path: str | Path | None, plot_path: str | Path | None
) -> list[str]:
    """Writes the JSON report and the PNG plot where asked; the lines that say where they
    are (and where the logs of a failed run are)."""
    lines = []
    if report_path is not None:
        lines.append(f"report: {write_report(report, report_path)}")
    if plot_path is not None:
        try:
            lines.append(f"plot: {plot_report(report, plot_path)}")
        except ImportError:
            lines.append("plot: matplotlib is missing (pip install 'livekit-mls[plot]')")
    if not report.passed and not report.interrupted and Path(report.workdir).exists():
        lines.append(f"logs: {report.workdir}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scenario = scenario_from_args(args, parser)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging()
    view = make_view(args.quiet)
    started = time.monotonic()
    status, _ = execute(
        scenario,
        view=view,
        report_path=args.report,
        plot_path=args.plot,
        workdir=args.workdir,
        out=sys.stdout,
    )
    if not args.quiet:
        print(f"done in {time.monotonic() - started:.1f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
