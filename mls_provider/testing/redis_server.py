"""A real ``redis-server`` as a subprocess for tests and benchmarks.

Each instance binds 127.0.0.1 on a free port with its own data directory (config, log,
AOF). The port and the directory are kept across ``kill()``/``stop()`` and ``start()``, so
``restart()`` brings the same server back with whatever it persisted — the way an
operator's Redis restarts. Nothing is left running: ``stop()``/``kill()``/``close()``,
the context managers, an ``atexit`` hook and (Linux) ``setpriv --pdeathsig`` end it.

The binary is ``$LIVEKIT_MLS_REDIS_SERVER`` or ``redis-server`` from ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mls_provider.testing._process import HOST, ServerProcess, free_port, pdeathsig_prefix

__all__ = ["RedisServer", "RedisServerError", "find_redis_server_binary"]

BINARY_ENV_VAR = "LIVEKIT_MLS_REDIS_SERVER"
_FSYNC_POLICIES = ("always", "everysec", "no")


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


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer(ServerProcess):
    """``redis-server`` on loopback. ``appendonly``/``appendfsync`` choose persistence
    (none by default: no AOF, no RDB snapshots); ``config`` adds raw directives.

    Start it from a long-lived thread (the event loop's, or the main thread): with
    ``setpriv --pdeathsig`` the server is killed when the starting thread exits. Use
    ``astart``/``arestart``/``astop`` from async code: they do not block the loop while
    the server starts or stops.
    """

    name = "redis-server"
    error = RedisServerError
    poll_interval = 0.02

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
        super().__init__(startup_timeout)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.config = dict(config or {})
        self._binary = Path(binary) if binary is not None else None
        if workdir is not None:
            self.workdir = Path(workdir)
            self._owns_workdir = False
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="lkmls-redis-"))
            self._owns_workdir = True
        self.port = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url if self.port else '-'} {state}>"

    # -- addresses and files -------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (no password: loopback only)."""
        if not self.port:
            raise RedisServerError("the server was never started: no port yet")
        return f"redis://{HOST}:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    # -- lifecycle -------------------------------------------------------------------------

    def _write_config(self) -> None:
        directives = {
            "bind": HOST,
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
            self.port = free_port()
        self._write_config()
        self._popen(
            [*pdeathsig_prefix("KILL"), str(binary), str(self.config_path)],
            output=self.workdir / "stdout.log",  # the server itself logs to log_path
            start_new_session=True,  # Ctrl-C in the terminal must not reach it first
        )

    def _probe(self) -> bool:
        """True once the server answers PING with PONG (not -LOADING while the AOF loads)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _bind_race(self, log_tail: str) -> bool:
        # only a first start may move to another port; a restart must keep its address
        if "Address already in use" in log_tail and self.starts == 1:
            self.port = 0
            self.starts = 0
            return True
        return False

    def close(self) -> None:
        """Stops the server and removes the data directory if it is a temp dir of ours."""
        self._reap()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._owns_workdir = False
