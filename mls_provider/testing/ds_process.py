"""A real delivery service process (``python -m delivery_service``) for tests and demos.

Ports are chosen once and kept across ``kill()``/``start()``, so clients reconnect to the
same address after a crash; the SQLite store lives in the work dir and survives restarts.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mls_provider.authority import IdentityAuthority
from mls_provider.session import SessionConfig
from mls_provider.testing._process import (
    HOST,
    NO_PROXY_OPENER,
    ServerProcess,
    free_port,
    pdeathsig_prefix,
)
from mls_provider.testing.tokens import credential_source, join_token


class DeliveryServiceError(RuntimeError):
    pass


class DeliveryServiceProcess(ServerProcess):
    """``livekit-mls-ds`` as a subprocess on loopback.

    ``store`` defaults to an SQLite file in the work dir (the embedded default); pass a
    ``redis://`` URL to run on Redis. ``extra_args`` are passed to the CLI as is. With an
    ``authority`` (the app's identity authority) the DS runs in authority mode, and
    :meth:`session_config` hands members credentials as the app's backend would.
    """

    name = "delivery service"
    error = DeliveryServiceError

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        workdir: str | os.PathLike[str] | None = None,
        store: str | None = None,
        livekit_url: str = "",
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 20.0,
        authority: IdentityAuthority | None = None,
    ) -> None:
        super().__init__(startup_timeout)
        self.api_key = api_key
        self._api_secret = api_secret
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lkmls-ds-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = store or f"sqlite:///{self.workdir / 'ds.db'}"
        self.livekit_url = livekit_url
        self.extra_args = extra_args
        self.authority = authority
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.public_key: bytes = b""

    def __repr__(self) -> str:
        return f"<DeliveryServiceProcess {self.target} store={self.store.split('@')[-1]}>"

    def token(self, identity: str, room: str) -> str:
        """A join token for ``identity`` in ``room``, signed with the key this DS trusts."""
        return join_token(self.api_key, self._api_secret, identity, room)

    def session_config(self, identity: str, room: str, **overrides: Any) -> SessionConfig:
        """A member's session configuration for this DS: its key pinned and, in authority
        mode, the authority pinned and credentials issued as the app's backend would."""
        options: dict[str, Any] = {"ds_public_key": self.public_key}
        if self.authority is not None:
            options["authority_keys"] = (self.authority.public_key,)
            options["get_credential"] = credential_source(self.authority, identity, room)
        return SessionConfig(**{**options, **overrides})

    @property
    def target(self) -> str:
        """gRPC target for :class:`mls_provider.transport.DeliveryClient` / ``MlsE2EE``."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def webhook_url(self) -> str:
        """Where livekit-server should post its webhooks."""
        return f"http://{HOST}:{self.http_port}/livekit/webhook"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "ds.log"

    def log_lines(self) -> list[dict[str, object]]:
        """The process's JSON log records (all starts)."""
        records = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self._api_secret,
            "LIVEKIT_URL": self.livekit_url,
        }

    def _read_public_key(self) -> bytes:
        # the first start of a store generates the DS key and keeps it there
        args = [
            sys.executable,
            "-m",
            "delivery_service",
            "--store",
            self.store,
            "--print-public-key",
        ]
        out = subprocess.run(args, env=self._env(), capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise DeliveryServiceError(f"cannot read the DS key: {out.stderr.strip()}")
        return bytes.fromhex(out.stdout.strip())

    def start(self) -> DeliveryServiceProcess:
        if not self.public_key and not self.running:
            self.public_key = self._read_public_key()
        return super().start()

    def _spawn(self) -> None:
        args = [
            sys.executable, "-m", "delivery_service",
            "--grpc-listen", self.target,
            "--http-listen", f"{HOST}:{self.http_port}",
            "--store", self.store,
            "--log-format", "json",
            *(["--authority-key", self.authority.public_key.hex()] if self.authority else []),
            *self.extra_args,
        ]  # fmt: skip
        # the DS gets SIGTERM if the thread that started it ends (e.g. a crashed benchmark)
        self._popen([*pdeathsig_prefix("TERM"), *args], env=self._env())

    def _probe(self) -> bool:
        try:
            with NO_PROXY_OPENER.open(f"{self.http_url}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, http.client.HTTPException):  # not listening yet, or not HTTP
            return False
