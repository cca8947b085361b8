"""The DS's HTTP side (aiohttp): LiveKit webhooks, Prometheus metrics, health.

* ``POST /livekit/webhook`` — LiveKit's signed webhooks; ``participant_left`` and
  ``participant_connection_aborted`` remove that identity from the room's group. The
  signature (JWT over the body's SHA-256) is checked with ``livekit.api.WebhookReceiver``;
  anything unsigned or tampered is answered 401, a body that is not UTF-8 400, and a
  webhook whose event id was seen already (a replay, or LiveKit's retry) changes nothing.
* ``GET /metrics`` — Prometheus exposition.
* ``GET /healthz`` — the process is up; ``GET /readyz`` — it serves requests.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web
from livekit import api
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from delivery_service.metrics import Metrics
from delivery_service.rooms import RoomManager

log = logging.getLogger(__name__)

LEAVE_EVENTS = ("participant_left", "participant_connection_aborted")
WEBHOOK_PATH = "/livekit/webhook"
MAX_WEBHOOK_BYTES = 1024 * 1024
SEEN_EVENTS = 10_000  # event ids remembered against replays (LiveKit drops events > 30 s)


class SeenEvents:
    """The ids of the newest webhook events handled, oldest forgotten first."""

    def __init__(self, size: int = SEEN_EVENTS) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first_time(self, event_id: str) -> bool:
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


def make_app(
    manager: RoomManager,
    receiver: api.WebhookReceiver,
    metrics: Metrics,
    is_ready: Callable[[], bool],
) -> web.Application:
    seen = SeenEvents()

    async def webhook(request: web.Request) -> web.Response:
        try:
            body = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            metrics.webhooks.labels("unknown", "rejected").inc()
            log.warning("webhook rejected: the body is not UTF-8")
            return web.json_response({"error": "the body is not UTF-8 JSON"}, status=400)
        auth = request.headers.get("Authorization", "")
        try:
            event = receiver.receive(body, auth)
        except Exception as e:  # the receiver raises plain Exceptions for bad hashes
            metrics.webhooks.labels("unknown", "rejected").inc()
            reason = f"{type(e).__name__}: {str(e)[:200]}"  # never the body itself
            log.warning("webhook rejected: %s", reason)
            return web.json_response({"error": f"invalid webhook: {reason}"}, status=401)
        kind = event.event
        if event.id and not seen.first_time(event.id):
            metrics.webhooks.labels(kind, "duplicate").inc()
            log.info("webhook %s id=%s ignored: seen already", kind, event.id)
            return web.json_response({"status": "duplicate"})
        if kind not in LEAVE_EVENTS:
            metrics.webhooks.labels(kind, "ignored").inc()
            return web.json_response({"status": "ignored"})
        room, identity = event.room.name, event.participant.identity
        if not room or not identity:
            metrics.webhooks.labels(kind, "rejected").inc()
            return web.json_response({"error": "event names no room or participant"}, status=400)
        # created_at is whole seconds: a leave in the same second as the join must count
        left_at = float(event.created_at) + 1.0 if event.created_at else None
        removed = await manager.leave(room, identity, left_at=left_at)
        metrics.webhooks.labels(kind, "removed" if removed else "noop").inc()
        log.info("webhook %s room=%s identity=%s removed=%s", kind, room, identity, removed)
        return web.json_response({"status": "removed" if removed else "noop"})

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
    app.router.add_post(WEBHOOK_PATH, webhook)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
