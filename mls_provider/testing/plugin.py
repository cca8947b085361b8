"""pytest plugin ``livekit_mls`` (registered as a ``pytest11`` entry point).

Fixtures (import nothing: installing livekit-mls makes them available):

* ``livekit_server`` — a real ``livekit-server --dev`` on loopback (session);
* ``delivery_service`` — a real delivery service process on its embedded SQLite store,
  receiving the server's webhooks (session);
* ``room_name`` — a fresh room per test;
* ``participants`` — a factory: ``await participants.join("alice", tone_hz=440)``;
  everything it created is closed after the test.

Helpers for assertions live in :mod:`mls_provider.testing.assertions`. See
``examples/test_e2ee_example.py`` for a complete test an app team can copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from mls_provider.testing.ds_process import DeliveryServiceProcess
from mls_provider.testing.livekit_server import LiveKitServer
from mls_provider.testing.stack import Stack, start_stack

if TYPE_CHECKING:
    from mls_provider.session import SessionConfig
    from mls_provider.testing.participant import Participant


@pytest.fixture(scope="session")
def livekit_mls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(str(tmp_path_factory.mktemp("livekit-mls")))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def livekit_server(livekit_mls_stack: Stack) -> LiveKitServer:
    return livekit_mls_stack.livekit


@pytest.fixture(scope="session")
def delivery_service(livekit_mls_stack: Stack) -> DeliveryServiceProcess:
    return livekit_mls_stack.ds


_rooms = itertools.count(1)


@pytest.fixture
def room_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:40]}-{next(_rooms)}"


@dataclass
class ParticipantFactory:
    livekit: LiveKitServer
    ds: DeliveryServiceProcess
    room: str
    created: list[Participant] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    async def join(
        self,
        identity: str,
        *,
        tone_hz: float | None = None,
        tone_buffer_ms: int = 100,
        mls: bool = True,
        encrypted: bool = True,
        subscribe: bool = True,
        room: str | None = None,
        config: SessionConfig | None = None,
    ) -> Participant:
        """A connected participant; with ``mls`` it is in the group when this returns."""
        participant = self.new(
            identity,
            tone_hz=tone_hz,
            tone_buffer_ms=tone_buffer_ms,
            mls=mls,
            encrypted=encrypted,
            subscribe=subscribe,
            room=room,
            config=config,
        )
        await participant.join()
        return participant

    def new(
        self,
        identity: str,
        *,
        tone_hz: float | None = None,
        tone_buffer_ms: int = 100,
        mls: bool = True,
        encrypted: bool = True,
        subscribe: bool = True,
        room: str | None = None,
        config: SessionConfig | None = None,
    ) -> Participant:
        from mls_provider.testing.participant import Participant

        room = room or self.room
        participant = Participant(
            identity,
            livekit_url=self.livekit.url,
            token=self.livekit.token(identity, room),
            ds_target=self.ds.target,
            ds_public_key=self.ds.public_key,
            tone_hz=tone_hz,
            tone_buffer_ms=tone_buffer_ms,
            mls=mls,
            encrypted=encrypted,
            subscribe=subscribe,
            config=self._config(identity, room, config),
        )
        self.created.append(participant)
        return participant

    async def spawn(self, identity: str, *, tone_hz: float | None = None) -> subprocess.Popen[str]:
        """A participant in its own process (to be killed); returns once it is in the group."""
        from mls_provider.testing.participant import spawn_participant

        proc = spawn_participant(
            identity,
            livekit_url=self.livekit.url,
            token=self.livekit.token(identity, self.room),
            ds_target=self.ds.target,
            ds_public_key=self.ds.public_key,
            authority=self.ds.authority,
            tone_hz=tone_hz,
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        if not line.startswith("READY"):
            proc.kill()
            raise RuntimeError(f"participant process {identity} failed to join: {line!r}")
        return proc

    def _config(self, identity: str, room: str, config: SessionConfig | None) -> SessionConfig:
        """``config`` with what the app's backend provides: in authority mode the pinned
        authority and this participant's credentials."""
        base = self.ds.session_config(identity, room)
        if config is None:
            return base
        return dataclasses.replace(
            config, authority_keys=base.authority_keys, get_credential=base.get_credential
        )

    async def close_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        await asyncio.gather(*(p.close() for p in self.created), return_exceptions=True)


@pytest.fixture
async def participants(
    livekit_server: LiveKitServer, delivery_service: DeliveryServiceProcess, room_name: str
) -> AsyncIterator[ParticipantFactory]:
    factory = ParticipantFactory(livekit_server, delivery_service, room_name)
    try:
        yield factory
    finally:
        await factory.close_all()
