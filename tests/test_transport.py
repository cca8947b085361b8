"""The DS client maps every way a call can end to a typed error: in particular a call cut
by its channel closing is Unavailable (retry), while cancelling the caller still cancels."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from livekit import api

from delivery_service.server import DeliveryServer
from delivery_service.settings import Settings
from mls_provider import mls
from mls_provider.transport import DeliveryClient, Unavailable

KEY, SECRET = "transport-test", secrets.token_urlsafe(40)


@pytest.fixture
async def client() -> AsyncIterator[DeliveryClient]:
    settings = Settings(
        livekit_api_key=KEY,
        livekit_api_secret=SECRET,
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        store="memory://",
    )
    server = DeliveryServer(settings)
    await server.start()
    grants = api.VideoGrants(room_join=True, room="room")
    token = api.AccessToken(KEY, SECRET).with_identity("a").with_grants(grants).to_jwt()
    c = DeliveryClient(f"127.0.0.1:{server.grpc_port}", token)
    await c.join(mls.MlsClient("a", mls.SignatureKeyPair.generate()).generate_key_package())
    yield c
    await c.close()
    await server.stop()


async def read_all(client: DeliveryClient) -> None:
    async for _ in client.subscribe(0):
        pass


async def test_a_stream_cut_by_its_channel_closing_is_unavailable(client: DeliveryClient) -> None:
    reader = asyncio.create_task(read_all(client))
    await asyncio.sleep(0.3)
    await client.close()
    with pytest.raises(Unavailable):
        await reader


async def test_cancelling_the_reader_still_cancels_it(client: DeliveryClient) -> None:
    reader = asyncio.create_task(read_all(client))
    await asyncio.sleep(0.3)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
