"""A real ``livekit-server`` (``--dev``, single node, no Redis) as a subprocess for tests.

Each instance gets its own API key/secret, its own free ports and its own work directory
(config + log), so several servers and several test runs can coexist on one host. All
traffic stays on this host: signalling binds ``127.0.0.1``, the node IP advertised to
clients is ``127.0.0.1`` and the ICE/UDP mux binds ``127.0.0.1`` only (see
docs/livekit-e2e-notes.md for the network details).
"""

from __future__ import annotations

import datetime
import os
import secrets
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mls_provider.testing._process import (
    HOST,
    NO_PROXY_OPENER,
    ServerProcess,
    free_port,
    pdeathsig_prefix,
)
from mls_provider.testing.tokens import join_token

__all__ = [
    "LiveKitServer",
    "LiveKitServerError",
    "find_livekit_server_binary",
]

LIVEKIT_VERSION = "v1.13.5"
BINARY_ENV_VAR = "LIVEKIT_MLS_LIVEKIT_SERVER"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SERVER_FLAG_ENV = frozenset({"NODE_IP", "UDP_PORT"})


class LiveKitServerError(RuntimeError):
    """The server binary is missing, or the server failed to start."""


def find_livekit_server_binary() -> Path:
    """Path of the livekit-server binary: ``$LIVEKIT_MLS_LIVEKIT_SERVER`` or the make cache."""
    env = os.environ.get(BINARY_ENV_VAR)
    path = Path(env) if env else _REPO_ROOT / ".cache" / "bin" / f"livekit-server-{LIVEKIT_VERSION}"
    if not (path.is_file() and os.access(path, os.X_OK)):
        source = f"${BINARY_ENV_VAR}" if env else "the default location"
        raise LiveKitServerError(
            f"livekit-server binary not found at {path} ({source}); "
            "run `make livekit-server` to build it"
        )
    return path


def _pick_ports() -> tuple[int, int, int]:
    """HTTP, ICE/TCP and ICE/UDP ports, three distinct numbers. Probed on the wildcard
    address: the ICE/TCP listener binds all interfaces (the server may still lose a race
    for a port, which start() retries)."""
    while True:
        ports = (
            free_port(socket.SOCK_STREAM, ""),
            free_port(socket.SOCK_STREAM, ""),
            free_port(socket.SOCK_DGRAM, ""),
        )
        if len(set(ports)) == 3:
            return ports


def _server_env() -> dict[str, str]:
    """The caller's environment minus variables the server reads as flags.

    ``LIVEKIT_*`` (e.g. LIVEKIT_KEYS, LIVEKIT_CONFIG), REDIS_HOST or UDP_PORT from a developer's
    shell would silently override the config file written here.
    """
    return {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("LIVEKIT_", "REDIS_")) or k in _SERVER_FLAG_ENV)
    }


class LiveKitServer(ServerProcess):
    """A ``livekit-server --dev`` subprocess bound to loopback with its own key and ports.

    Use as ``with LiveKitServer() as srv:`` or ``async with LiveKitServer() as srv:``, or call
    ``start()``/``astart()`` and ``stop()`` yourself. ``stop()`` is idempotent and is also run
    at interpreter exit. On Linux the server also gets SIGTERM when the *thread* that started
    it exits (``setpriv --pdeathsig``), so start it from a long-lived thread (main/event loop).
    """

    name = "livekit-server"
    error = LiveKitServerError
    stop_timeout = 5.0

    def __init__(
        self,
        *,
        webhook_urls: Sequence[str] = (),
        api_key: str = "mls-test-key",
        binary: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        log_level: str = "info",
    ) -> None:
        """Configure (but do not start) a server.

        ``workdir`` holds ``livekit.yaml`` and ``livekit-server.log``; when omitted a temp dir
        is created at start and removed by ``stop()``. ``webhook_urls`` are signed with
        ``api_key``/``api_secret``. ``log_level="debug"`` gives pion/ICE details.
        """
        super().__init__(startup_timeout)
        self.api_key = api_key
        # >= 32 bytes: shorter HS256 secrets make PyJWT warn (an error under `-W error`).
        self.api_secret = secrets.token_urlsafe(48)
        self.webhook_urls = list(webhook_urls)
        self.log_level = log_level
        self._binary = Path(binary) if binary is not None else None
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._workdir: Path | None = None
        self._owns_workdir = False
        self.port = 0
        self.rtc_tcp_port = 0
        self.rtc_udp_port = 0

    def __repr__(self) -> str:  # never show the secret
        state = "running" if self.running else "stopped"
        return f"<LiveKitServer {self.url if self.port else '-'} key={self.api_key} {state}>"

    # -- addresses and files -------------------------------------------------------------

    @property
    def url(self) -> str:
        """WebSocket URL for ``rtc.Room.connect``."""
        return f"ws://{HOST}:{self.port}"

    @property
    def http_url(self) -> str:
        """HTTP URL (Twirp API for ``livekit.api.LiveKitAPI``, health check on ``/``)."""
        return f"http://{HOST}:{self.port}"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise LiveKitServerError("server was not started")
        return self._workdir

    @property
    def config_path(self) -> Path:
        return self.workdir / "livekit.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "livekit-server.log"

    # -- tokens ----------------------------------------------------------------------------

    def token(
        self,
        identity: str,
        room: str,
        *,
        ttl: datetime.timedelta = datetime.timedelta(hours=1),
        can_publish: bool = True,
        can_subscribe: bool = True,
        can_publish_data: bool = True,
        name: str | None = None,
    ) -> str:
        """A join token for ``identity`` in ``room``, signed with this server's key."""
        return join_token(
            self.api_key,
            self.api_secret,
            identity,
            room,
            ttl=ttl,
            name=name if name is not None else identity,
            can_publish=can_publish,
            can_subscribe=can_subscribe,
            can_publish_data=can_publish_data,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "port": self.port,
            "bind_addresses": [HOST],
            "keys": {self.api_key: self.api_secret},
            "logging": {"level": self.log_level},
            "rtc": {
                "tcp_port": self.rtc_tcp_port,
                "udp_port": self.rtc_udp_port,
                "node_ip": HOST,
                "use_external_ip": False,
                # Without these two the UDP mux binds only the host's non-loopback addresses
                # while the IPv4 candidate advertised is 127.0.0.1 (nothing listens there), so
                # ICE picks another candidate, e.g. the host's IPv6 address. With them the mux
                # binds 127.0.0.1 only. (The ICE/TCP listener binds all interfaces regardless.)
                "enable_loopback_candidate": True,
                "ips": {"includes": ["127.0.0.1/32"]},
            },
        }
        if self.webhook_urls:
            config["webhook"] = {"api_key": self.api_key, "urls": list(self.webhook_urls)}
        return config

    def _spawn(self) -> None:
        binary = self._binary if self._binary is not None else find_livekit_server_binary()
        if self._workdir is None:
            if self._workdir_arg is not None:
                self._workdir_arg.mkdir(parents=True, exist_ok=True)
                self._workdir = self._workdir_arg
            else:
                self._workdir = Path(tempfile.mkdtemp(prefix="livekit-server-"))
                self._owns_workdir = True
        self.port, self.rtc_tcp_port, self.rtc_udp_port = _pick_ports()
        # The config holds the secret: keep it private to this user.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self._config(), f, sort_keys=False)
        cmd = [
            *pdeathsig_prefix(),
            str(binary),
            "--dev",
            "--bind",
            HOST,
            "--node-ip",
            HOST,
            "--config",
            str(self.config_path),
        ]
        with open(self.log_path, "a") as log:
            log.write(f"### {' '.join(cmd)}\n")
        self._popen(
            cmd,
            env=_server_env(),
            start_new_session=True,  # Ctrl-C in the terminal must not reach it before stop()
        )

    def _probe(self) -> bool:
        """True once the HTTP port answers (the server's health check is ``GET /``)."""
        try:
            with NO_PROXY_OPENER.open(self.http_url + "/", timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _bind_race(self, log_tail: str) -> bool:
        return "address already in use" in log_tail

    def _abort_start(self) -> None:
        """Kill a server that failed to start; its work dir (config, log) is kept for debugging."""
        self._owns_workdir = False
        self._reap()

    def stop(self, timeout: float | None = None) -> int | None:
        """Stops the server; removes the work dir only if it was a temp dir created by us."""
        code = self._reap(timeout=timeout)
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._owns_workdir = False
        return code
