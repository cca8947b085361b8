"""Wires one delivery service process: store, MLS observer, ordering, gRPC and HTTP."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from livekit import api

from delivery_service.api import DeliveryServicer, register
from delivery_service.auth import Authenticator
from delivery_service.fanout import Hub
from delivery_service.http import make_app
from delivery_service.metrics import Metrics
from delivery_service.ordering import CommitOrdering
from delivery_service.presence import LiveKitPresence, StreamPresence
from delivery_service.rooms import RoomManager
from delivery_service.settings import DS_IDENTITY, Settings
from delivery_service.store import Store, open_store
from mls_provider import mls
from mls_provider.proto import delivery_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class DeliveryServer:
    """A running DS. ``start()`` binds (port 0 picks a free port), ``stop()`` drains."""

    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.store, log_retention=settings.log_retention)
        self.metrics = Metrics()
        self.hub = Hub(settings.stream_queue_size)
        self.grpc_port = 0
        self.http_port = 0
        self.observer: mls.ExternalObserver | None = None
        self.manager: RoomManager | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._health = health_aio.HealthServicer()
        self._ready = False
        self._presence: LiveKitPresence | None = None
        self._store_open = False
        self._stopped = asyncio.Event()

    async def _signature_key(self) -> mls.SignatureKeyPair:
        suite = self.settings.ordering.cipher_suite
        if self.settings.ds_key_file:
            text = await asyncio.to_thread(Path(self.settings.ds_key_file).read_text)
            secret = bytes.fromhex(text.strip())
            return mls.SignatureKeyPair.from_secret(secret, suite)
        fresh = mls.SignatureKeyPair.generate(suite).secret_key
        # the first process to start stores its key; every later start reuses it
        return mls.SignatureKeyPair.from_secret(await self.store.ds_key(fresh), suite)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.tls_cert:
            return None
        client_ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def start(self) -> None:
        """Opens the store and binds both listeners; on any failure, undoes what it did."""
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise

    async def _start(self) -> None:
        s = self.settings
        await self.store.open()
        self._store_open = True
        key = await self._signature_key()
        keys = list(s.ordering.authority_keys)
        authority = mls.Authority(keys) if keys else None
        self.observer = mls.ExternalObserver(DS_IDENTITY, key, authority=authority)
        ordering = CommitOrdering(self.observer, s.ordering)
        presence = (
            StreamPresence(self.store, s.presence_timeout) if s.presence_timeout > 0 else None
        )
        self.manager = RoomManager(self.store, ordering, self.hub, self.metrics, presence=presence)
        await self.manager.start()

        authenticator = Authenticator(s.livekit_api_key, s.livekit_api_secret)
        options = [
            ("grpc.max_receive_message_length", s.limits.grpc_message),
            ("grpc.max_send_message_length", s.limits.grpc_message),
            # Members keep a stream open for a whole call and ping every 10 s to keep NATs
            # and proxies open; gRPC's default server policy would answer such pings on an
            # idle stream with GOAWAY (too many pings) and cancel every call on it.
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # and the server pings every member's connection each second, so that a member
            # whose network is gone loses its stream (and, after the presence timeout, its
            # place in the group) within seconds, not minutes
            ("grpc.keepalive_time_ms", 1_000),
            ("grpc.keepalive_timeout_ms", 2_000),
        ]
        self._grpc = grpc.aio.server(options=options)
        if s.livekit_url:
            self._presence = LiveKitPresence(s.livekit_url, s.livekit_api_key, s.livekit_api_secret)
        register(
            self._grpc,
            DeliveryServicer(
                self.manager,
                authenticator,
                s.limits,
                self.metrics,
                self._presence,
                s.key_holders,
            ),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        host, port = _split(s.grpc_listen)
        credentials = self._credentials()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.grpc_port = (
                self._grpc.add_secure_port(address, credentials)
                if credentials is not None
                else self._grpc.add_insecure_port(address)
            )
        except RuntimeError as e:  # grpcio's way of saying the address is taken
            raise OSError(f"cannot listen on {s.grpc_listen} (gRPC): {e}") from e
        await self._grpc.start()

        receiver = api.WebhookReceiver(api.TokenVerifier(s.livekit_api_key, s.livekit_api_secret))
        app = make_app(self.manager, receiver, self.metrics, lambda: self._ready)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        http_host, http_port = _split(s.http_listen)
        site = web.TCPSite(self._http, http_host, http_port)
        try:
            await site.start()
        except OSError as e:
            raise OSError(f"cannot listen on {s.http_listen} (HTTP): {e.strerror or e}") from e
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else http_port

        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        log.info(
            "delivery service ready grpc=%s:%d http=%s:%d store=%s ds_public_key=%s",
            host,
            self.grpc_port,
            http_host,
            self.http_port,
            s.store.split("@")[-1],
            key.public_key.hex(),
        )

    async def stop(self) -> None:
        """Stops accepting calls, ends streams (clients resume elsewhere), drains."""
        if not self._ready:
            return
        self._ready = False
        await self._health.enter_graceful_shutdown()
        self.hub.close_all()
        await self._teardown()
        log.info("delivery service stopped")

    async def _teardown(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace)
            self._grpc = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self.manager is not None:
            await self.manager.stop()
        if self._presence is not None:
            await self._presence.close()
            self._presence = None
        if self._store_open:
            await self.store.close()
            self._store_open = False
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
