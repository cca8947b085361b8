"""Shared fixtures and helpers of the DS tests.

* tokens: :func:`mint_token` (LiveKit access tokens signed with the test API key);
* in-process delivery services on ``127.0.0.1:0`` (:func:`start_ds`), torn down after the test;
* delivery service subprocesses (:class:`DsProcess`, ``python -m delivery_service``) whose
  ports are parsed from the "delivery service ready" log line;
* gRPC test members (:func:`make_member`, see ``members.py``);
* record/log snapshots to prove that a rejected request stored nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest

from delivery_service.limits import Limits
from delivery_service.model import LogEntry, RoomState
from delivery_service.ordering import OrderingConfig
from delivery_service.rooms import RoomManager
from delivery_service.server import DeliveryServer
from delivery_service.settings import Settings
from delivery_service.store import Store
from mls_provider.proto import delivery_pb2_grpc as pb_grpc
from mls_provider.testing.tokens import join_token

from .members import GrpcMember, check_all, converged

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "lkmls-ds-test-key"
# >= 32 bytes: PyJWT warns about shorter HMAC keys, and warnings are errors here
API_SECRET = "ds-test-secret-6f1c0e2b9a4d47c8b3e5a1f0d2c4b6a8"
OTHER_SECRET = "another-deployment-secret-0a1b2c3d4e5f60718293a4b5"

# Deadlines of the in-process test DS: short enough for quick convergence, long enough
# that a loaded CI machine does not hit them by accident.
TEST_ORDERING = OrderingConfig(
    commit_timeout=2.0,
    execute_timeout=2.0,
    create_timeout=5.0,
    batch_quiet=0.02,
    batch_max_wait=0.2,
    update_interval=0.0,  # tests make epochs with update commits; the limit: test_hostile
)
GENEROUS_LIMITS = Limits(rate_per_second=1_000_000.0, burst=1_000_000)
WAIT = 15.0  # default bound of every wait in these tests (seconds)


def mint_token(
    identity: str,
    room: str,
    *,
    api_key: str = API_KEY,
    api_secret: str = API_SECRET,
    ttl: timedelta | None = None,
    room_join: bool = True,
) -> str:
    """A LiveKit access token as a LiveKit deployment would mint it."""
    return join_token(api_key, api_secret, identity, room, ttl=ttl, room_join=room_join)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def make_settings(
    *,
    store: str = "memory://",
    limits: Limits = GENEROUS_LIMITS,
    ordering: OrderingConfig = TEST_ORDERING,
    **overrides: Any,
) -> Settings:
    """Settings of an in-process test DS: loopback, ports picked by the OS."""
    return Settings(
        livekit_api_key=API_KEY,
        livekit_api_secret=API_SECRET,
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        store=store,
        limits=limits,
        ordering=ordering,
        shutdown_grace=overrides.pop("shutdown_grace", 1.0),
        **overrides,
    )


def target(server: DeliveryServer) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def manager_of(server: DeliveryServer) -> RoomManager:
    assert server.manager is not None, "the server is not started"
    return server.manager


async def room_snapshot(store: Store, room: str) -> tuple[RoomState | None, list[LogEntry]]:
    """The stored record and the whole retained log of a room."""
    entries: list[LogEntry] = []
    after = 0
    while True:
        page = await store.read_log(room, after)
        entries.extend(page)
        if len(page) < 500:
            return await store.load(room), entries
        after = page[-1].seq


async def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float = WAIT,
    what: str = "condition",
    check: Callable[[], None] | None = None,
) -> None:
    """Polls ``condition`` until true; ``check`` may raise to stop early (e.g. a crashed
    member). Fails the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


class StartDs(Protocol):
    async def __call__(
        self, *, store: str = ..., limits: Limits = ..., ordering: OrderingConfig = ..., **kw: Any
    ) -> DeliveryServer: ...


class MakeMember(Protocol):
    def __call__(
        self, server: DeliveryServer | str, identity: str, room: str, **kw: Any
    ) -> GrpcMember: ...


async def joined_room(
    ds: DeliveryServer | str, make_member: MakeMember, room: str, *names: str
) -> list[GrpcMember]:
    """Members ``names`` of ``room`` (the first creates the group), joined one after the
    other, following their streams, converged on one epoch."""
    members = [make_member(ds, name, room) for name in names]
    for member in members:
        await member.join()
        member.start()
    await wait_until(
        lambda: converged(members), what=f"{names} in {room}", check=check_all(members)
    )
    return members


@pytest.fixture
async def start_ds() -> AsyncIterator[StartDs]:
    """Starts in-process delivery services (``make_settings`` keywords); stops them after."""
    servers: list[DeliveryServer] = []

    async def start(**kw: Any) -> DeliveryServer:
        server = DeliveryServer(make_settings(**kw))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await asyncio.wait_for(server.stop(), WAIT)


@pytest.fixture
async def ds(start_ds: StartDs) -> DeliveryServer:
    """One in-process DS with a memory store."""
    return await start_ds()


@pytest.fixture
async def make_member() -> AsyncIterator[MakeMember]:
    """Creates gRPC test members (not yet joined) of an in-process DS or a gRPC target;
    closes them after the test."""
    members: list[GrpcMember] = []

    def make(server: DeliveryServer | str, identity: str, room: str, **kw: Any) -> GrpcMember:
        token = kw.pop("token", None) or mint_token(identity, room)
        address = server if isinstance(server, str) else target(server)
        member = GrpcMember(identity, room, address, token, **kw)
        members.append(member)
        return member

    yield make
    await asyncio.wait_for(asyncio.gather(*(m.close() for m in members)), WAIT)


@contextlib.asynccontextmanager
async def raw_channel(server_target: str) -> AsyncIterator[pb_grpc.DeliveryServiceStub]:
    """A plain stub (no client-side error translation), for status-code assertions."""
    async with grpc.aio.insecure_channel(server_target) as channel:
        yield pb_grpc.DeliveryServiceStub(channel)


# ---- subprocess ----------------------------------------------------------------------

READY_RE = re.compile(
    r"delivery service ready grpc=(?P<ghost>\S+):(?P<gport>\d+) "
    r"http=(?P<hhost>\S+):(?P<hport>\d+) .*ds_public_key=(?P<key>[0-9a-f]+)"
)


def ds_env(**extra: str) -> dict[str, str]:
    """The environment of a DS subprocess: ours minus every LIVEKIT_* variable, plus the
    test API key and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    env.update(LIVEKIT_API_KEY=API_KEY, LIVEKIT_API_SECRET=API_SECRET, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m delivery_service ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "delivery_service", *args],
        env=ds_env() if env is None else env,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class DsProcess:
    """``python -m delivery_service`` with a SQLite store in ``workdir``; stderr (JSON log)
    goes to ``workdir/ds.log`` so the pipe never fills up."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.db = workdir / "ds.db"
        self.log_path = workdir / "ds.log"
        self.args = args
        self.env = ds_env() if env is None else env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0  # where this process's output starts in the (shared) log file
        self.grpc_port = 0
        self.http_port = 0
        self.public_key = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self, timeout: float = 30.0) -> None:
        argv = [
            sys.executable,
            "-m",
            "delivery_service",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{self.db}",
            *self.args,
        ]
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # Popen returns as soon as the child is forked: it does not block the loop
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            match = READY_RE.search(self.log_text())
            if match:
                self.grpc_port = int(match["gport"])
                self.http_port = int(match["hport"])
                self.public_key = match["key"]
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"DS exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"DS not ready after {timeout}s:\n{self.log_text()}")
            await asyncio.sleep(0.05)

    def log_text(self) -> str:
        """This process's output (a restart in the same directory appends to the file)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (other lines, e.g. tracebacks, are skipped)."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """The exit code; fails if the process is still running after ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"DS still running after {timeout}s:\n{self.log_text()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


@pytest.fixture
def ds_process(tmp_path: Path) -> Iterator[Callable[..., Awaitable[DsProcess]]]:
    """Starts DS subprocesses (each in its own directory under tmp_path); kills leftovers."""
    procs: list[DsProcess] = []

    async def start(
        *args: str, env: dict[str, str] | None = None, workdir: Path | None = None
    ) -> DsProcess:
        """``workdir``: restart on an earlier process's directory (same store)."""
        if workdir is None:
            workdir = tmp_path / f"ds{len(procs)}"
            workdir.mkdir()
        proc = DsProcess(workdir, *args, env=env)
        procs.append(proc)
        await proc.start()
        return proc

    yield start
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(timeout=10)
        proc.kill()
