"""``livekit-mls-ds``: run the delivery service.

Every flag has an environment variable (shown in ``--help``); flags win. The LiveKit API
secret is read from the environment only, so it never shows up in a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from delivery_service.auth import KeyHolderPolicy
from delivery_service.limits import Limits
from delivery_service.ordering import OrderingConfig
from delivery_service.presence import DEFAULT_PRESENCE_TIMEOUT
from delivery_service.server import DeliveryServer
from delivery_service.settings import Settings

ENV_PREFIX = "LIVEKIT_MLS_DS_"


MAX_LOGGED_CHARS = 2000


def _bounded(text: str) -> str:
    """Log fields are cut to a bound: a message may quote what a client sent (aiohttp's
    parser errors quote the request line), and raw bytes from the network must not flood
    or be replayed into the log."""
    if len(text) <= MAX_LOGGED_CHARS:
        return text
    return f"{text[:MAX_LOGGED_CHARS]}... ({len(text) - MAX_LOGGED_CHARS} more characters)"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc), each field bounded."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _bounded(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = _bounded(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def build_parser() -> argparse.ArgumentParser:
    d_limits, d_order = Limits(), OrderingConfig()
    p = argparse.ArgumentParser(
        prog="livekit-mls-ds",
        description="livekit-mls delivery service: orders and relays the MLS handshakes of "
        "LiveKit rooms (gRPC), with LiveKit webhooks and metrics over HTTP.",
        epilog="The LiveKit API key/secret come from LIVEKIT_API_KEY and LIVEKIT_API_SECRET "
        f"(required). Every option also reads {ENV_PREFIX}<OPTION> (e.g. "
        f"{ENV_PREFIX}STORE=sqlite:///data/ds.db).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a(
        "--livekit-url",
        default=os.environ.get("LIVEKIT_URL", ""),
        help="LiveKit server URL (env LIVEKIT_URL); when set, disconnect reports from members "
        "are checked with LiveKit's RoomService before a removal",
    )
    a("--grpc-listen", default=_env("GRPC_LISTEN", "127.0.0.1:50051"), help="gRPC host:port")
    a(
        "--http-listen",
        default=_env("HTTP_LISTEN", "127.0.0.1:8089"),
        help="HTTP host:port for /livekit/webhook, /metrics, /healthz, /readyz",
    )
    a(
        "--store",
        default=_env("STORE", "sqlite:///livekit-mls-ds.db"),
        help="sqlite:///path (embedded default), redis://host:port/db, or memory:// (tests)",
    )
    a(
        "--ds-key-file",
        default=_env("KEY_FILE", ""),
        help="hex file with the DS signature secret key "
        "(default: generated once, kept in the store)",
    )
    a(
        "--print-public-key",
        action="store_true",
        help="print the DS signature public key (hex) for clients to pin, then exit",
    )
    a("--tls-cert", default=_env("TLS_CERT", ""), help="PEM certificate for gRPC TLS")
    a("--tls-key", default=_env("TLS_KEY", ""), help="PEM private key for gRPC TLS")
    a(
        "--tls-client-ca",
        default=_env("TLS_CLIENT_CA", ""),
        help="PEM CA bundle: require client certificates it signed (mTLS)",
    )
    a(
        "--ring-size",
        type=int,
        default=int(_env("RING_SIZE", str(d_order.ring_size))),
        help="LiveKit key ring size handed to clients (2..256)",
    )
    a(
        "--authority-key",
        action="append",
        default=[k for k in _env("AUTHORITY_KEYS", "").split(",") if k],
        metavar="HEX",
        help="authority mode: a public key (hex, from `livekit-mls-authority`) of the app's "
        "identity authority; every member's credential must be signed by one of these keys "
        "(repeat during a rotation). Env: comma-separated",
    )
    a(
        "--credential-margin",
        type=float,
        default=float(_env("CREDENTIAL_MARGIN", str(d_order.credential_margin))),
        help="authority mode: a credential must stay valid this many seconds after Join",
    )
    a(
        "--key-holders",
        choices=[p.value for p in KeyHolderPolicy],
        default=_env("KEY_HOLDERS", KeyHolderPolicy.SUBSCRIBERS.value),
        help="which LiveKit tokens may join the MLS group and so hold every member's media "
        "key: 'subscribers' (canSubscribe not false, not hidden) or 'all' (any roomJoin "
        "token, hidden recorders and agents included)",
    )
    a(
        "--presence-timeout",
        type=float,
        default=float(_env("PRESENCE_TIMEOUT", str(DEFAULT_PRESENCE_TIMEOUT))),
        help="seconds a member's event stream may be gone before the member is removed "
        "(0: never; then only leaves and LiveKit webhooks remove members)",
    )
    a(
        "--commit-timeout",
        type=float,
        default=float(_env("COMMIT_TIMEOUT", str(d_order.commit_timeout))),
        help="seconds the designated committer has before the next member is designated",
    )
    a(
        "--execute-timeout",
        type=float,
        default=float(_env("EXECUTE_TIMEOUT", str(d_order.execute_timeout))),
        help="seconds to wait for ready acks before a transition executes anyway",
    )
    a(
        "--create-timeout",
        type=float,
        default=float(_env("CREATE_TIMEOUT", str(d_order.create_timeout))),
        help="seconds a named creator has to create the group",
    )
    a(
        "--batch-quiet",
        type=float,
        default=float(_env("BATCH_QUIET", str(d_order.batch_quiet))),
        help="Adds are committed once no join came for this long (seconds)",
    )
    a(
        "--burst-quiet",
        type=float,
        default=float(_env("BURST_QUIET", str(d_order.burst_quiet))),
        help="the quiet window while a burst of joins is under way (seconds)",
    )
    a(
        "--batch-max-wait",
        type=float,
        default=float(_env("BATCH_MAX_WAIT", str(d_order.batch_max_wait))),
        help="... or this long after the first pending Add (seconds)",
    )
    a(
        "--update-interval",
        type=float,
        default=float(_env("UPDATE_INTERVAL", str(d_order.update_interval))),
        help="a member may commit without pending proposals (an update) once per this many seconds",
    )
    a(
        "--blame-cooldown",
        type=float,
        default=float(_env("BLAME_COOLDOWN", str(d_order.blame_cooldown))),
        help="seconds a member whose commit others could not process may not join again",
    )
    a(
        "--max-commit-bytes",
        type=int,
        default=int(_env("MAX_COMMIT_BYTES", str(d_limits.commit))),
        help="largest Commit",
    )
    a(
        "--max-welcome-bytes",
        type=int,
        default=int(_env("MAX_WELCOME_BYTES", str(d_limits.welcome))),
        help="largest Welcome",
    )
    a(
        "--max-key-package-bytes",
        type=int,
        default=int(_env("MAX_KEY_PACKAGE_BYTES", str(d_limits.key_package))),
        help="largest KeyPackage",
    )
    a(
        "--rate",
        type=float,
        default=float(_env("RATE", str(d_limits.rate_per_second))),
        help="sustained requests per second per identity",
    )
    a(
        "--burst",
        type=int,
        default=int(_env("BURST", str(d_limits.burst))),
        help="request burst per identity",
    )
    a(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    a("--log-format", default=_env("LOG_FORMAT", "json"), choices=["json", "text"])
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    key = os.environ.get("LIVEKIT_API_KEY", "")
    secret = os.environ.get("LIVEKIT_API_SECRET", "")
    if not key or not secret:
        raise SystemExit(
            "error: set LIVEKIT_API_KEY and LIVEKIT_API_SECRET (the deployment's keys)"
        )
    if not 2 <= args.ring_size <= 256:
        raise SystemExit("error: --ring-size must be 2..256")
    if args.presence_timeout < 0:
        raise SystemExit("error: --presence-timeout must be >= 0")
    try:
        authority_keys = tuple(bytes.fromhex(k) for k in args.authority_key)
    except ValueError as e:
        raise SystemExit(f"error: --authority-key must be hex: {e}") from None
    if any(len(k) != 32 for k in authority_keys):
        raise SystemExit("error: --authority-key must be a 32-byte Ed25519 public key (64 hex)")
    limits = Limits(
        key_package=args.max_key_package_bytes,
        commit=args.max_commit_bytes,
        welcome=args.max_welcome_bytes,
        rate_per_second=args.rate,
        burst=args.burst,
    )
    ordering = OrderingConfig(
        ring_size=args.ring_size,
        commit_timeout=args.commit_timeout,
        execute_timeout=args.execute_timeout,
        create_timeout=args.create_timeout,
        batch_quiet=args.batch_quiet,
        burst_quiet=args.burst_quiet,
        batch_max_wait=args.batch_max_wait,
        update_interval=args.update_interval,
        blame_cooldown=args.blame_cooldown,
        authority_keys=authority_keys,
        credential_margin=args.credential_margin,
    )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    return Settings(
        livekit_api_key=key,
        livekit_api_secret=secret,
        livekit_url=args.livekit_url,
        grpc_listen=args.grpc_listen,
        http_listen=args.http_listen,
        store=args.store,
        ds_key_file=args.ds_key_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        limits=limits,
        ordering=ordering,
        presence_timeout=args.presence_timeout,
        key_holders=KeyHolderPolicy(args.key_holders),
    )


async def serve(settings: Settings) -> None:
    server = DeliveryServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down (draining streams)")
    await server.stop()


async def print_public_key(settings: Settings) -> None:
    server = DeliveryServer(settings)
    await server.store.open()
    try:
        print((await server._signature_key()).public_key.hex())
    finally:
        await server.store.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    settings = settings_from_args(args)
    try:
        asyncio.run(print_public_key(settings) if args.print_public_key else serve(settings))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
