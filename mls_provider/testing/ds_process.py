"""A real delivery service process (``python -m delivery_service``) for tests and demos.

Ports are chosen once and kept across ``kill()``/``start()``, so clients reconnect to the
same address after a crash; the SQLite store lives in the work dir and survives restarts.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from mls_provider.testing.livekit_server import pdeathsig_prefix
from mls_provider.testing.tokens import join_token

_HOST = "127.0.0.1"


class DeliveryServiceError(RuntimeError):
    pass


_handed_out: set[int] = set()


def _free_port() -> int:
    """A port free now and not given to another DS of this process: a DS keeps its ports
    across restarts, so the kernel may offer one of them again while it is down."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((_HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class DeliveryServiceProcess:
    """``livekit-mls-ds`` as a subprocess on loopback.

    ``store`` defaults to an SQLite file in the work dir (the embedded default); pass a
    ``redis://`` URL to run on Redis. ``extra_args`` are passed to the CLI as is.
    """

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
    ) -> None:
        self.api_key = api_key
        self._api_secret = api_secret
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lkmls-ds-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = store or f"sqlite:///{self.workdir / 'ds.db'}"
        self.livekit_url = livekit_url
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.grpc_port = _free_port()
        self.http_port = _free_port()
        self.public_key: bytes = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"<DeliveryServiceProcess {self.target} store={self.store.split('@')[-1]}>"

    def token(self, identity: str, room: str) -> str:
        """A join token for ``identity`` in ``room``, signed with the key this DS trusts."""
        return join_token(self.api_key, self._api_secret, identity, room)

    @property
    def target(self) -> str:
        """gRPC target for :class:`mls_provider.transport.DeliveryClient` / ``MlsE2EE``."""
        return f"{_HOST}:{self.grpc_port}"

    @property
    def webhook_url(self) -> str:
        """Where livekit-server should post its webhooks."""
        return f"http://{_HOST}:{self.http_port}/livekit/webhook"

    @property
    def http_url(self) -> str:
        return f"http://{_HOST}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "ds.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

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
        if self.running:
            return self
        if not self.public_key:
            self.public_key = self._read_public_key()
        args = [
            sys.executable, "-m", "delivery_service",
            "--grpc-listen", self.target,
            "--http-listen", f"{_HOST}:{self.http_port}",
            "--store", self.store,
            "--log-format", "json",
            *self.extra_args,
        ]  # fmt: skip
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        # the DS gets SIGTERM if the thread that started it ends (e.g. a crashed benchmark)
        self._proc = subprocess.Popen(
            [*pdeathsig_prefix("TERM"), *args], env=self._env(), stdout=self._log, stderr=self._log
        )
        self.starts += 1
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise DeliveryServiceError(
                    f"delivery service exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with opener.open(f"{self.http_url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, http.client.HTTPException):  # not listening yet, or not HTTP
                pass
            time.sleep(0.05)
        self.kill()
        raise DeliveryServiceError(f"delivery service did not start in time:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful: streams drained), then SIGKILL after ``timeout``."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._finish()

    def kill(self) -> None:
        """``kill -9``: no shutdown at all, as in a crash."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._finish()

    def _finish(self) -> int | None:
        code = None if self._proc is None else self._proc.returncode
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def restart(self) -> DeliveryServiceProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> DeliveryServiceProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
