"""The DS as a process: ``python -m delivery_service`` (the ``livekit-mls-ds`` CLI).

Options and their documentation, configuration errors, the DS key kept in the SQLite
store, health (gRPC health service, /healthz, /readyz), Prometheus metrics, JSON logs, and
clean shutdown on SIGTERM/SIGINT (streams end with UNAVAILABLE, exit code 0), plus a
restart on the same store that keeps the room.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from delivery_service.cli import build_parser
from mls_provider import mls
from mls_provider import transport as tp
from mls_provider.proto import delivery_pb2 as pb
from mls_provider.proto import delivery_pb2_grpc as pb_grpc

from .conftest import (
    API_SECRET,
    WAIT,
    DsProcess,
    MakeMember,
    bearer,
    ds_env,
    mint_token,
    run_cli,
    wait_until,
)
from .members import check_all, converged

StartProcess = Callable[..., Awaitable[DsProcess]]
ROOM = "cli-room"
SERVICE = "livekit.mls.v1.DeliveryService"


def test_help_documents_every_option() -> None:
    """--help exits 0 and lists every option with its help text, the required LiveKit
    environment variables and the LIVEKIT_MLS_DS_ environment prefix."""
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: livekit-mls-ds")
    options = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert len(options) >= 20
    for option in options:
        assert option in text, option
    for needle in (
        "--grpc-listen",
        "--http-listen",
        "--store",
        "--print-public-key",
        "sqlite:///",
        "LIVEKIT_API_KEY",
        "LIVEKIT_API_SECRET",
        "LIVEKIT_MLS_DS_",
        "/healthz",
    ):
        assert needle in text, needle
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("missing", ["LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"])
def test_missing_livekit_credentials_is_a_clear_error(tmp_path: Path, missing: str) -> None:
    """Without the API key or secret the CLI exits non-zero with a one-line error naming
    the variables, before listening or creating a store."""
    env = ds_env()
    del env[missing]
    db = tmp_path / "ds.db"
    result = run_cli(
        "--store", f"sqlite:///{db}", "--grpc-listen", "127.0.0.1:0", env=env, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "LIVEKIT_API_KEY and LIVEKIT_API_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ring-size", "1"], "--ring-size must be 2..256"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--store", "postgres://x"], "unknown store URL"),
        (["--log-format", "xml"], "invalid choice"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    """Invalid settings exit non-zero with an error message and no traceback."""
    result = run_cli(
        "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *args, cwd=tmp_path
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("which", ["--grpc-listen", "--http-listen"])
def test_a_busy_port_is_a_clear_error(tmp_path: Path, which: str) -> None:
    """A listen address in use: exit non-zero with one 'error: ...' line and nothing else."""
    with _busy_port() as sock:
        busy = f"127.0.0.1:{sock.getsockname()[1]}"
        args = {"--grpc-listen": "127.0.0.1:0", "--http-listen": "127.0.0.1:0", which: busy}
        result = run_cli(
            *(x for kv in args.items() for x in kv), "--store", "memory://", cwd=tmp_path
        )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr and "never awaited" not in result.stderr


def test_print_public_key_is_stable_per_store(tmp_path: Path) -> None:
    """--print-public-key prints the same 32-byte hex key for the same SQLite store every
    time, a different one for another store, and the key derived from --ds-key-file."""
    first = [
        run_cli("--print-public-key", "--store", f"sqlite:///{tmp_path / 'a.db'}") for _ in "12"
    ]
    other = run_cli("--print-public-key", "--store", f"sqlite:///{tmp_path / 'b.db'}")
    for result in [*first, other]:
        assert result.returncode == 0, result.stderr
    keys = [r.stdout.strip() for r in first]
    assert re.fullmatch(r"[0-9a-f]{64}", keys[0])
    assert keys[0] == keys[1]
    assert other.stdout.strip() != keys[0]

    secret = mls.SignatureKeyPair.generate().secret_key
    key_file = tmp_path / "ds.key"
    key_file.write_text(secret.hex() + "\n")
    from_file = run_cli(
        "--print-public-key", "--ds-key-file", str(key_file), "--store", "memory://"
    )
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.strip() == mls.SignatureKeyPair.from_secret(secret).public_key.hex()


async def test_running_process_is_healthy_and_observable(ds_process: StartProcess) -> None:
    """A DS process answers gRPC health checks SERVING (overall and for the service),
    /healthz and /readyz with 200, exposes lkmls_ metrics that count requests, logs
    JSON lines to stderr, never logs the API secret, and publishes the key that
    --print-public-key prints for its store."""
    ds = await ds_process()
    async with grpc.aio.insecure_channel(ds.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            answer = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=WAIT
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        stub = pb_grpc.DeliveryServiceStub(channel)
        client = mls.MlsClient("alice", mls.SignatureKeyPair.generate())
        joined = await stub.Join(
            pb.JoinRequest(key_package=client.generate_key_package()),
            metadata=bearer(mint_token("alice", ROOM)),
            timeout=WAIT,
        )
    assert joined.config.ds_public_key.hex() == ds.public_key

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
            async with http.get(ds.http_url + path) as response:
                assert response.status == 200, path
                assert await response.json() == body
        async with http.get(ds.http_url + "/metrics") as response:
            assert response.status == 200
            metrics = await response.text()
    for name in ("lkmls_requests_total", "lkmls_commits_accepted_total", "lkmls_subscribers"):
        assert f"# TYPE {name.removesuffix('_total')}" in metrics, name
    assert 'lkmls_requests_total{code="OK",method="Join"} 1.0' in metrics

    records = ds.log_records()
    assert records and len(records) == len(ds.log_text().splitlines())
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any(r["msg"].startswith("join room=cli-room identity=alice") for r in records)
    assert API_SECRET not in ds.log_text()
    printed = run_cli("--print-public-key", "--store", f"sqlite:///{ds.db}")
    assert printed.stdout.strip() == ds.public_key


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_process_cleanly(
    ds_process: StartProcess, make_member: MakeMember, signum: int
) -> None:
    """SIGTERM/SIGINT: open member streams end with UNAVAILABLE ("shutting down"), the
    process logs its shutdown and exits 0 within a few seconds, and nothing listens any
    more."""
    ds = await ds_process()
    members = [make_member(ds.target, name, ROOM) for name in ("alice", "bob")]
    for member in members:
        await member.join()
        member.start()
    await wait_until(lambda: converged(members), what="2 members", check=check_all(members))
    started = time.monotonic()
    ds.signal(signum)
    assert await ds.wait(timeout=10) == 0, ds.log_text()
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"shutdown took {elapsed:.1f}s"
    for member in members:
        with pytest.raises(tp.Unavailable, match="shutting down"):
            await asyncio.wait_for(member.stop(), WAIT)
    messages = [r["msg"] for r in ds.log_records()]
    assert "shutting down (draining streams)" in messages
    assert messages[-1] == "delivery service stopped"
    assert not any(r["level"] in ("error", "critical") for r in ds.log_records())
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", ds.grpc_port)) != 0


async def test_restart_on_the_same_store_keeps_the_room(
    ds_process: StartProcess, make_member: MakeMember
) -> None:
    """After a stop and a restart on the same SQLite file the DS has the same key, the
    same room log (byte for byte), and continues the group: alice's next commit is
    accepted for the next epoch and bob, resuming from his cursor, applies it."""
    first = await ds_process()
    alice, bob = (make_member(first.target, name, ROOM) for name in ("alice", "bob"))
    for member in (alice, bob):
        await member.join()
        member.start()
    await wait_until(lambda: converged([alice, bob]), what="alice and bob")
    async with tp.DeliveryClient(first.target, mint_token("bob", ROOM)) as client:
        log_before = await asyncio.wait_for(_read_log(client, bob.last_seq), WAIT)
    first.signal(signal.SIGTERM)
    assert await first.wait(timeout=10) == 0
    for member in (alice, bob):
        with pytest.raises(tp.Unavailable):
            await asyncio.wait_for(member.stop(), WAIT)

    second = await ds_process(workdir=first.workdir)
    try:
        assert second.public_key == first.public_key
        async with tp.DeliveryClient(second.target, mint_token("bob", ROOM)) as client:
            log_after = await asyncio.wait_for(_read_log(client, bob.last_seq), WAIT)
        assert log_after == log_before
        for member in (alice, bob):  # same MLS state, new connection, resume from cursor
            await member.unsubscribe()
            await member.client_ds.close()
            member.client_ds.target = second.target
            member.subscribe(member.last_seq)
            member.start()
        epoch = alice.require_group().epoch
        response = await alice.commit()
        assert response.epoch == epoch + 1
        await wait_until(
            lambda: converged([alice, bob], epoch=epoch + 1),
            what="bob applies the commit made after the restart",
            check=check_all([alice, bob]),
        )
    finally:
        second.signal(signal.SIGTERM)
        assert await second.wait(timeout=10) == 0


async def _read_log(client: tp.DeliveryClient, last: int) -> list[bytes]:
    """The caller's stream from the start up to seq ``last``, serialized."""
    events: list[bytes] = []
    async for event in client.subscribe(0):
        events.append(event.SerializeToString())
        if event.seq >= last:
            break
    return events
