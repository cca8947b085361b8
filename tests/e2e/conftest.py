"""Fixtures for end-to-end tests against a real livekit-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mls_provider.testing import LiveKitServer


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    """One started livekit-server for the whole session (own key, own free ports).

    The work dir (config + ``livekit-server.log``) is under pytest's basetemp, so the log of a
    failing run is kept for inspection.
    """
    server = LiveKitServer(workdir=tmp_path_factory.mktemp("livekit-server"))
    with server:
        yield server
