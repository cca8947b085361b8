"""Reconnection: how soon clients use a restarted DS, and what a network blip costs.

    .venv/bin/python benchmarks/bench_reconnect.py --clients 10 --restarts 5 --blips 10

1. **DS restart.** A real DS process (SQLite) is SIGKILLed, left down for 1 s or 10 s, and
   started again on the same port and store. Clients keep calling it (Ready every 100 ms,
   retried as the session retries). For each client: from the moment the DS answers
   ``/readyz`` again to the client's first successful call, and how many of its calls
   failed although the DS was serving (the channel was still backing off). Two kinds of
   client in the same run: *before* (gRPC's default reconnect backoff, calls that fail at
   once while the channel is down, the session's old retry backoff of 0.1 s doubling to
   5 s) and *now* (the current ``DeliveryClient``: 100-500 ms reconnect backoff, calls wait
   for the channel, ``SessionConfig`` backoff).
2. **Network blip.** Five ``MlsSession`` members reach the DS (presence timeout 3 s) through
   a TCP proxy that drops every connection and refuses new ones for 1 s, ten times: how
   many members the DS removed (the target is none), and the longest time a member's
   stream took to come back after the blip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, median, write_result

from mls_provider.proto import delivery_pb2_grpc as pb_grpc
from mls_provider.session import MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.transport import (
    MAX_MESSAGE_BYTES,
    DeliveryClient,
    DeliveryServiceError,
    ResourceExhausted,
    Unavailable,
)

API_KEY = "bench-reconnect"
ROOM = "reconnect"


class OldClient(DeliveryClient):
    """The client as it was before: default gRPC reconnect backoff (1 s growing to 120 s)
    and calls that fail at once (no wait_for_ready) while the channel is down."""

    def __init__(self, target: str, token: str) -> None:
        super().__init__(target, token, wait_for_ready=False)

    def connect(self) -> None:
        if self._channel is not None:
            return
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        self._channel = grpc.aio.insecure_channel(self.target, options)
        self._stub = pb_grpc.DeliveryServiceStub(self._channel)


@dataclass
class Caller:
    kind: str
    client: DeliveryClient
    retry_max: float
    successes: list[float] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        """Calls Ready every 100 ms (a read: the DS answers NOT_FOUND to a non-member, which
        counts as reaching it); on failure backs off like the session."""
        delay = 0.1
        while not stop.is_set():
            try:
                await self.client.ready(0)
            except (Unavailable, ResourceExhausted):
                self.failures.append(time.monotonic())
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            except DeliveryServiceError:
                pass  # answered
            self.successes.append(time.monotonic())
            delay = 0.1
            await asyncio.sleep(0.1)


def ready_at(ds: DeliveryServiceProcess, timeout: float = 30.0) -> float:
    """Polls /readyz every 5 ms; the monotonic time it first answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{ds.http_url}/readyz", timeout=0.5) as response,
        ):
            if response.status == 200:
                return time.monotonic()
        time.sleep(0.005)
    raise RuntimeError("the DS did not come back")


async def restarts(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(40)
    ds = DeliveryServiceProcess(API_KEY, secret, workdir=workdir / "restart")
    ds.start()
    callers = []
    for kind, factory, retry_max in (("before", OldClient, 5.0), ("now", DeliveryClient, 1.0)):
        for i in range(args.clients):
            identity = f"{kind}{i}"
            client = factory(ds.target, ds.token(identity, ROOM))
            callers.append(Caller(kind, client, retry_max))
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(c.run(stop)) for c in callers]
    samples: dict[tuple[str, float], dict[str, list[float]]] = {}
    try:
        await asyncio.sleep(1.0)
        for outage in (1.0, 10.0):
            for _ in range(args.restarts):
                await ds.akill()
                await asyncio.sleep(outage)
                spawn = asyncio.ensure_future(ds.astart())
                back = await asyncio.to_thread(ready_at, ds)
                await spawn
                for _ in range(600):  # until every client got through (the old ones back off)
                    if all(any(t > back for t in c.successes) for c in callers):
                        break
                    await asyncio.sleep(0.1)
                for c in callers:
                    first = min((t for t in c.successes if t > back), default=None)
                    if first is None:
                        continue
                    entry = samples.setdefault((c.kind, outage), {"ready": [], "failed": []})
                    entry["ready"].append(first - back)
                    # calls that failed although the DS was serving again
                    entry["failed"].append(sum(1 for t in c.failures if back < t < first))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in callers:
            await c.client.close()
        ds.stop()
    rows = []
    for (kind, outage), entry in sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ready = entry["ready"]
        rows.append(
            {
                "client": kind,
                "outage_s": outage,
                "samples": len(ready),
                "ready_to_success_p50_ms": round(median(ready) * 1000, 1),
                "ready_to_success_max_ms": round(max(ready) * 1000, 1),
                "calls_failed_while_serving": sum(entry["failed"]),
            }
        )
    return {"clients_per_kind": args.clients, "restarts_per_outage": args.restarts, "rows": rows}


class BlipProxy:
    """A TCP proxy that can drop every connection and refuse new ones for a while."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def blip(self, seconds: float) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            transport = writer.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()  # RST: like a network path that went away
        self._writers.clear()
        await asyncio.sleep(seconds)
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()


async def blips(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(40)
    ds = DeliveryServiceProcess(API_KEY, secret, workdir=workdir / "blip")
    ds.start()
    proxy = BlipProxy(ds.grpc_port)
    await proxy.start()
    sessions: list[MlsSession] = []
    resumed: list[float] = []
    try:
        for i in range(5):
            identity = f"m{i}"
            client = DeliveryClient(f"127.0.0.1:{proxy.port}", ds.token(identity, ROOM))
            config = SessionConfig(ds_public_key=ds.public_key)
            session = MlsSession(client, identity, HeadlessKeySink(), config)
            await session.start()
            sessions.append(session)

        async def converged(count: int) -> int:
            while True:
                states = {(s.epoch, s.executed_epoch, len(s.members)) for s in sessions}
                if len(states) == 1:
                    epoch, executed, members = states.pop()
                    if epoch is not None and epoch == executed and members == count:
                        return epoch
                await asyncio.sleep(0.02)

        epoch = await asyncio.wait_for(converged(5), 60)
        removed_before = removals(ds)
        for _ in range(args.blips):
            await proxy.blip(1.0)
            back = time.monotonic()
            manager_streams = await asyncio.to_thread(stream_count_after, ds, back)
            resumed.append(manager_streams)
            await asyncio.sleep(3.0)
        final = await asyncio.wait_for(converged(5), 30)
        removed = removals(ds) - removed_before
    finally:
        for s in sessions:
            await s.stop(leave=False)
            await s.ds.close()
        await proxy.close()
        ds.stop()
    return {
        "members": 5,
        "blips": args.blips,
        "blip_s": 1.0,
        "removals": removed,
        "epochs_changed": final - epoch,
        "streams_back_p50_ms": round(median(resumed) * 1000, 1),
        "streams_back_max_ms": round(max(resumed) * 1000, 1),
    }


def removals(ds: DeliveryServiceProcess) -> int:
    return sum(1 for r in ds.log_lines() if str(r.get("msg", "")).startswith("vanished"))


def stream_count_after(ds: DeliveryServiceProcess, since: float, members: int = 5) -> float:
    """Seconds after ``since`` until the DS has ``members`` open streams again (/metrics)."""
    deadline = since + 20
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{ds.http_url}/metrics", timeout=0.5) as response,
        ):
            for line in response.read().decode().splitlines():
                if line.startswith("lkmls_subscribers ") and float(line.split()[1]) >= members:
                    return time.monotonic() - since
        time.sleep(0.005)
    return float("inf")


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    restart = await restarts(args, workdir)
    blip = await blips(args, workdir)
    headers = ["client", "outage", "restarts x clients", "DS serving -> first success p50 / max",
               "calls that failed while the DS was serving"]  # fmt: skip
    print(
        markdown_table(
            headers,
            [
                [
                    r["client"],
                    f"{r['outage_s']:g} s",
                    r["samples"],
                    f"{r['ready_to_success_p50_ms']} / {r['ready_to_success_max_ms']} ms",
                    r["calls_failed_while_serving"],
                ]
                for r in restart["rows"]
            ],
        )
    )
    print(
        f"\n{blip['blips']} blips of {blip['blip_s']:g} s with {blip['members']} members: "
        f"{blip['removals']} removals, {blip['epochs_changed']} epochs changed; streams back "
        f"after p50 {blip['streams_back_p50_ms']} ms, max {blip['streams_back_max_ms']} ms"
    )
    path = write_result("reconnect", {"restart": restart, "blip": blip})
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="clients of each kind")
    parser.add_argument("--restarts", type=int, default=5, help="restarts per outage length")
    parser.add_argument("--blips", type=int, default=10)
    parser.add_argument("--workdir", default="benchmarks/results/reconnect")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
