"""The delivery service never holds a media key.

A room of real client sessions rotates keys several times through a real DS process with
its SQLite store. Afterwards every byte the DS wrote — its database, write-ahead log and
log file — is searched for every member's key material of every epoch and for the AES
frame keys LiveKit would derive from it: none may appear. (The DS relays only public MLS
messages; this catches any change that would make it store or log a secret.)
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path

import pytest

from mls_provider.keys import livekit_frame_key
from mls_provider.session import MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink
from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.transport import DeliveryClient

pytestmark = pytest.mark.timeout(120)

API_KEY = "no-keys-test"
ROOM = "no-keys-room"


def everything_written(workdir: Path) -> bytes:
    """The DS's database, write-ahead log and log file, concatenated."""
    return b"".join(p.read_bytes() for p in workdir.iterdir() if p.is_file())


async def test_no_key_material_in_anything_the_ds_wrote(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(40)
    ds = DeliveryServiceProcess(
        API_KEY, secret, workdir=tmp_path, extra_args=("--log-level", "debug")
    )
    ds.start()
    sessions: dict[str, MlsSession] = {}
    all_keys: set[bytes] = set()

    def token(identity: str) -> str:
        return ds.token(identity, ROOM)

    async def join(identity: str) -> None:
        session = MlsSession(
            DeliveryClient(ds.target, token(identity)),
            identity,
            HeadlessKeySink(),
            SessionConfig(ds_public_key=ds.public_key),
        )
        sessions[identity] = session
        await session.start()

    async def settle() -> None:
        async def check() -> None:
            while True:
                states = {(s.epoch, s.executed_epoch) for s in sessions.values()}
                if len(states) == 1 and len(set(next(iter(states)))) == 1:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(check(), 20)
        for session in sessions.values():  # collect what every member installed so far
            assert isinstance(session.sink, HeadlessKeySink)
            for by_index in session.sink.keys.values():
                all_keys.update(by_index.values())

    try:
        for name in ("alice", "bob", "carol", "dave"):
            await join(name)
            await settle()
        await sessions.pop("bob").stop(leave=True)
        await settle()
        await join("erin")
        await settle()
    finally:
        await asyncio.gather(*(s.stop(leave=False) for s in sessions.values()))
        await asyncio.gather(*(s.ds.close() for s in sessions.values()))
        ds.stop()

    assert len(all_keys) >= 10, "the room must have rotated keys several times"
    secrets_to_find = all_keys | {livekit_frame_key(k) for k in all_keys}
    written = everything_written(tmp_path)
    assert len(written) > 10_000, "the DS wrote its database and log here"

    def encodings(key: bytes) -> list[bytes]:  # how a log line or a JSON record could hold it
        return [key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)]

    leaked = [k.hex()[:16] for k in secrets_to_find if any(e in written for e in encodings(k))]
    assert not leaked, f"key material found in what the DS wrote: {leaked}"
