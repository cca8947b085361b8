"""A real ``redis-server`` as a subprocess for tests and benchmarks.

Each instance binds 127.0.0.1 on a free port with its own data directory (config, log,
AOF). The port and the directory are kept across ``kill()``/``stop()`` and ``start()``, so
``restart()`` brings the same server back with whatever it persisted — the way an
operator's Redis restarts. Nothing is left running: ``stop()``/``kill()``/``close()``,
the context managers, an ``atexit`` hook and (Linux) ``setpriv --pdeathsig`` end it.

The binary is ``$LIVEKIT_MLS_REDIS_SERVER`` or ``redis-server`` from ``PATH``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from mls_provider.testing.livekit_server import pdeathsig_prefix

__all__ = ["RedisServer", "RedisServerError", "find_redis_server_binary"]

BINARY_ENV_VAR = "LIVEKIT_MLS_REDIS_SERVER"
_HOST = "127.0.0.1"
_START_ATTEMPTS = 3  # a port taken between our probe and the server's bind is retried
_FSYNC_POLICIES = ("always", "everysec", "no")

_live: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.close()


class RedisServerError(RuntimeError):
    """The binary is missing, or the server failed to start."""


def find_redis_server_binary() -> Path:
    """``$LIVEKIT_MLS_REDIS_SERVER`` or ``redis-server`` on ``PATH``."""
    env = os.environ.get(BINARY_ENV_VAR)
    found = env or shutil.which("redis-server")
    if not found or not (Path(found).is_file() and os.access(found, os.X_OK)):
        where = f"${BINARY_ENV_VAR}={env}" if env else "PATH"
        raise RedisServerError(
            f"redis-server not found ({where}): install redis-server (e.g. `apt-get install "
            f"redis-server`, `brew install redis`) or set {BINARY_ENV_VAR} to its path"
        )
    return Path(found)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """``redis-server`` on loopback. ``appendonly``/``appendfsync`` choose persistence
    (none by default: no AOF, no RDB snapshots); ``config`` adds raw directives.

    Start it from a long-lived thread (the event loop's, or the main thread): with
    ``setpriv --pdeathsig`` the server is killed when the starting thread exits. Use
    ``astart``/``arestart``/``astop`` from async code: they do not block the loop while
    the server starts or stops.
    """

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        config: Mapping[str, str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        if appendfsync not in _FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {', '.join(_FSYNC_POLICIES)}")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.config = dict(config or {})
        self.startup_timeout = startup_timeout
        self._binary = Path(binary) if binary is not None else None
        if workdir is not None:
            self.workdir = Path(workdir)
            self._owns_workdir = False
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="lkmls-redis-"))
            self._owns_workdir = True
        self.port = 0
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url if self.port else '-'} {state}>"

    # -- addresses and files -------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (no password: loopback only)."""
        if not self.port:
            raise RedisServerError("the server was never started: no port yet")
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # -- lifecycle -------------------------------------------------------------------------

    def _write_config(self) -> None:
        directives = {
            "bind": _HOST,
            "port": str(self.port),
            "protected-mode": "no",  # loopback only, no password
            "daemonize": "no",
            "dir": _quote(str(self.workdir)),
            "logfile": _quote(str(self.log_path)),
            "save": '""',  # no RDB snapshots: persistence is the AOF or nothing
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            **self.config,
        }
        self.config_path.write_text("".join(f"{k} {v}\n" for k, v in directives.items()))

    def _spawn(self) -> None:
        binary = self._binary if self._binary is not None else find_redis_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port()
        self._write_config()
        self._log = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - closed in _reap
        self._proc = subprocess.Popen(
            [*pdeathsig_prefix("KILL"), str(binary), str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal must not reach it first
        )
        self.starts += 1
        _live.add(self)

    def _probe(self) -> bool:
        """True once the server answers PING with PONG (not -LOADING while the AOF loads)."""
        try:
            with socket.create_connection((_HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _exited(self) -> tuple[bool, str] | None:
        """None while running; else (retry with another port?, message)."""
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return None
        tail = self.log_tail()
        self._reap()
        # only a first start may move to another port; a restart must keep its address
        retry = "Address already in use" in tail and self.starts == 1
        if retry:
            self.port = 0
            self.starts = 0
        return retry, f"redis-server exited with code {code} during startup:\n{tail}"

    def start(self) -> RedisServer:
        """Starts the server and blocks until it answers PING (raises RedisServerError)."""
        if self.running:
            return self
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._spawn()
            deadline = time.monotonic() + self.startup_timeout
            while True:
                failure = self._exited()
                if failure is not None:
                    if failure[0] and attempt < _START_ATTEMPTS:
                        break
                    raise RedisServerError(failure[1])
                if self._probe():
                    return self
                if time.monotonic() > deadline:
                    self._reap(kill=True)
                    raise RedisServerError(f"redis-server not ready in time:\n{self.log_tail()}")
                time.sleep(0.02)
        raise AssertionError("unreachable")

    async def astart(self) -> RedisServer:
        """``start`` for async code: spawned from the calling thread, polled without blocking."""
        if self.running:
            return self
        loop = asyncio.get_running_loop()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._spawn()
            deadline = loop.time() + self.startup_timeout
            while True:
                failure = self._exited()
                if failure is not None:
                    if failure[0] and attempt < _START_ATTEMPTS:
                        break
                    raise RedisServerError(failure[1])
                if await asyncio.to_thread(self._probe):
                    return self
                if loop.time() > deadline:
                    self._reap(kill=True)
                    raise RedisServerError(f"redis-server not ready in time:\n{self.log_tail()}")
                await asyncio.sleep(0.02)
        raise AssertionError("unreachable")

    def _reap(self, *, kill: bool = False, timeout: float = 10.0) -> int | None:
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            code = proc.returncode
            _live.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (Redis flushes its AOF and exits), SIGKILL after ``timeout``. The port
        and the data directory are kept for a later ``start()``."""
        return self._reap(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as in a crash: only what the AOF already holds survives."""
        self._reap(kill=True)

    def restart(self, *, kill: bool = False) -> RedisServer:
        """Stops (``kill``: SIGKILL) and starts again on the same port and directory."""
        self._reap(kill=kill)
        return self.start()

    async def astop(self, timeout: float = 10.0) -> int | None:
        return await asyncio.to_thread(self._reap, timeout=timeout)

    async def akill(self) -> None:
        await asyncio.to_thread(self._reap, kill=True)

    async def arestart(self, *, kill: bool = False) -> RedisServer:
        await asyncio.to_thread(self._reap, kill=kill)
        return await self.astart()

    def close(self) -> None:
        """Stops the server and removes the data directory if it is a temp dir of ours."""
        self._reap()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._owns_workdir = False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RedisServer:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)
